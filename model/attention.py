"""Key-masked attention for training-mode pruning, and the CLS-attention scores AS-ViT needs.

Training keeps every token in the sequence and removes dropped tokens as attention *keys*
(DynamicViT). Two implementations of the same masked softmax live here:

- the fast path: an additive float bias ``log(G + eps)`` handed to timm's own block, so timm's
  fused ``scaled_dot_product_attention`` runs (its kernels keep the softmax in fp32 internally);
- the reference path: DynamicViT's explicit fp32 formula, used when a block has
  ``attn.fused_attn = False``, and under fp16: a dropped key's attention weight is O(eps) = 1e-6,
  subnormal in fp16, so the fused kernel's fp16 bias gradient loses ~8% on exactly the tokens the
  gate is learning about (bf16 has fp32's exponent range and is fine).

Both pass gradient to the keep mask; a boolean mask would not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

MASK_EPS = 1e-6  # DynamicViT's eps: dropped keys keep a tiny weight, so no row is ever all-masked


def fp32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Context in which autocast is off, so explicitly fp32 tensors stay fp32."""
    return torch.autocast(device_type=device_type, enabled=False)


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype q/k/v will have inside a block: the autocast dtype if autocast is on, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def pair_gate(keep_full: torch.Tensor) -> torch.Tensor:
    """G[b, i, j] = D_j + (1 - D_j) * [i == j]: key j is visible if kept, every token sees itself."""
    n = keep_full.shape[-1]
    eye = torch.eye(n, device=keep_full.device, dtype=keep_full.dtype)
    d = keep_full[:, None, :]
    return d + (1.0 - d) * eye


def keep_bias(keep_full: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive SDPA bias [B, 1, N', N'] equal to log(G + eps), built in fp32 from a {0,1} mask.

    softmax(P + log(G + eps)) matches DynamicViT's masked softmax to O(eps), and the log keeps a
    finite gradient to the mask: d/dD_j of log(D_j + eps) is 1/eps where the attention weight is
    O(eps), so their product is O(1).
    """
    bias = torch.log(pair_gate(keep_full.float()) + MASK_EPS)
    return bias.unsqueeze(1).to(dtype)


def masked_softmax(logits: torch.Tensor, keep_full: torch.Tensor, diagonal: bool = True) -> torch.Tensor:
    """DynamicViT's exact masked softmax in fp32 over the last dim of logits [B, H, Nq, N'].

    A_ij = (exp(P_ij - max_k P_ik) G_ij + eps/N') / (sum_k exp(P_ik - max_k P_ik) G_ik + eps).
    With diagonal=False, G_ij = D_j (for a single query row of a token that is always kept, e.g. CLS).
    """
    logits = logits.float()
    n = logits.shape[-1]
    gate = pair_gate(keep_full.float()) if diagonal else keep_full.float()[:, None, :]
    gate = gate.unsqueeze(1)
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    weights = shifted.exp() * gate
    return (weights + MASK_EPS / n) / (weights.sum(dim=-1, keepdim=True) + MASK_EPS)


def _split_qkv(attn: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split timm's fused qkv projection output [B, N, 3*A] into q, k, v [B, H, N, D] (q/k normed)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def reference_attention(attn: nn.Module, x: torch.Tensor, keep_full: torch.Tensor) -> torch.Tensor:
    """timm Attention.forward with the softmax swapped for DynamicViT's exact fp32 masked softmax."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _split_qkv(attn, attn.qkv(x))
    with fp32_region(x.device.type):
        scores = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
        probs = attn.attn_drop(masked_softmax(scores, keep_full))
        out = (probs @ v.float()).to(v.dtype)
    out = out.transpose(1, 2).reshape(b, n, -1)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def has_reference_path(blk: nn.Module) -> bool:
    """True for timm's pre-norm Block with the standard fused-qkv Attention."""
    attn = getattr(blk, "attn", None)
    return all(hasattr(blk, p) for p in _BLOCK_PARTS) and all(hasattr(attn, p) for p in _ATTN_PARTS)


def run_block(
    blk: nn.Module, x: torch.Tensor, keep_full: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """One timm block with dropped tokens masked as keys (no mask: timm's block unchanged)."""
    if keep_full is None:
        return blk(x)
    fused = getattr(blk.attn, "fused_attn", True) and bias is not None and bias.dtype != torch.float16
    if fused or not has_reference_path(blk):
        return blk(x, attn_mask=bias)
    # Same two residual lines as timm's Block.forward, with the reference attention inside.
    x = x + blk.drop_path1(blk.ls1(reference_attention(blk.attn, blk.norm1(x), keep_full)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


@dataclass
class AttentionTap:
    """What a block's attention produced, captured by temporary hooks: qkv output and pre-proj context."""

    qkv: torch.Tensor | None = None
    context: torch.Tensor | None = None


@contextlib.contextmanager
def tap_attention(attn: nn.Module) -> Iterator[AttentionTap]:
    """Capture attn.qkv's output and attn.proj's input for the duration of one block call.

    Hooks are added and removed around the call (not kept on the model), so deep copies (EMA) and
    direct calls of the timm model never see them. Capturing costs nothing: both tensors exist anyway.
    """
    tap = AttentionTap()

    def on_qkv(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        tap.qkv = output

    def on_proj(_module: nn.Module, inputs: tuple) -> None:
        tap.context = inputs[0]

    handles = [attn.qkv.register_forward_hook(on_qkv), attn.proj.register_forward_pre_hook(on_proj)]
    try:
        yield tap
    finally:
        for handle in handles:
            handle.remove()


def cls_attention_scores(
    attn: nn.Module, tap: AttentionTap, keep_full: torch.Tensor | None, num_prefix: int
) -> torch.Tensor:
    """AS-ViT token scores S(i) = sum_h R_h(i) A_h[cls, i] for patch tokens, fp32 [B, N].

    Only the CLS row of A is computed (q_cls . k: N*A MACs); H_h(i) = ||(A_h V_h)[i]|| comes from the
    context the block already computed (the input of attn.proj).
    """
    b, n, _ = tap.context.shape
    with fp32_region(tap.qkv.device.type):
        q, k, _ = _split_qkv(attn, tap.qkv)
        cls_logits = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # [B, H, 1, N']
        if keep_full is None:
            cls_row = cls_logits.softmax(dim=-1)
        else:
            cls_row = masked_softmax(cls_logits, keep_full, diagonal=False)
        cls_row = cls_row[:, :, 0, num_prefix:]  # [B, H, N]
        head_norms = tap.context.float().reshape(b, n, attn.num_heads, -1).norm(dim=-1)[:, num_prefix:]
        head_weights = head_norms / (head_norms.sum(dim=-1, keepdim=True) + 1e-8)  # R_h(i): [B, N, H]
        return (head_weights.transpose(1, 2) * cls_row).sum(dim=1)

