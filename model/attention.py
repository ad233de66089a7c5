"""Key-masked attention for training-mode pruning, and the CLS-attention scores AS-ViT needs.

Training keeps every token in the sequence and removes dropped tokens as attention *keys*
(DynamicViT): row i of the attention is softmax_j(P_ij + log(G_ij + eps)), with P = q k^T / sqrt(d)
and G_ij = D_j + (1 - D_j) [i == j] (a token always sees itself). Every implementation below gives
the keep mask D a gradient (a boolean mask would not) and agrees with DynamicViT's explicit fp32
formula to O(eps) (`tests/test_attention_candidates.py` holds each to that):

- ``bias`` (default): the additive float bias log(G + eps) [B, 1, N', N'] handed to timm's own block,
  so SDPA runs. A float mask that needs a gradient rules out flash and cuDNN: CUDA runs the
  memory-efficient kernel and materialises a [B, H, N', N'] bias gradient; CPU runs the math kernel.
- ``fold``: the per-key term log(D_j + eps) folded into extra q/k channels, plus one *sentinel* key
  that gives each row i the missing weight exp(P_ii) (1 - D_i + eps) on its own value (the diagonal
  of G). Attention is then maskless, so flash or cuDNN can run; the mask's gradient comes back through dK.
- ``flex``: FlexAttention with a score_mod that adds log(D_j + eps) off the diagonal. CUDA only for
  training (FlexAttention has no CPU backward); compiled on first use; no attention dropout.
- ``chunked``: the same softmax over query-row tiles of at most CHUNK_ELEMENTS fp32 scores, recomputed
  in the backward (a custom autograd function): nothing N' x N' is kept for the backward, the matmuls
  run in half precision with fp32 results (a score tile is split hi + lo), and the mask gradient is
  summed in fp32 from fp32 score gradients.
- ``reference``: DynamicViT's explicit fp32 N' x N' softmax (also what ``attn.fused_attn = False``
  selects). The anchor of the tests; it keeps about five fp32 [B, H, N', N'] tensors per block.

fp16 runs ``chunked`` when ``bias`` or ``fold`` is asked for: a dropped key's weight is O(eps) = 1e-6,
subnormal in fp16, so a half-precision kernel's score gradients flush and the mask gradient of the
dropped tokens is off by up to 4e-2 (bias) or 3e-1 (fold) in the tests, against 2e-4 for ``chunked``.
bf16 has fp32's exponent range and keeps the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.gate_types import ATTENTION_IMPLS

MASK_EPS = 1e-6  # DynamicViT's eps: dropped keys keep a tiny weight, so no row is ever all-masked
# The chunked path's score tiles: at most this many [B, H, rows, N'] fp32 elements each (128 MiB).
CHUNK_ELEMENTS = 1 << 25
_FOLD_CHANNELS = 4  # q: [c, c, s_hi, s_lo]; k: [b_hi, b_lo, 0, 0]; the sentinel key: [0, 0, 1, 1]


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


def check_attention(name: str) -> str:
    """`name` if it is one of ATTENTION_IMPLS, else a ValueError listing them."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {name!r}")
    return name


# Each core maps q, k, v [B, H, N', D] (after q/k norm), the keep mask [B, N'] (float {0,1}, prefix
# tokens 1) and the softmax scale to the context [B, H, N', D] in v's dtype.
Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def reference_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_full: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """DynamicViT's explicit masked softmax, all in fp32 (N' x N' scores, probabilities and their grads)."""
    with fp32_region(q.device.type):
        scores = (q.float() * scale) @ k.float().transpose(-2, -1)
        probs = masked_softmax(scores, keep_full)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return (probs @ v.float()).to(v.dtype)


def bias_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_full: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """SDPA with the additive bias log(G + eps) in q's dtype: what timm's block runs under ``bias``."""
    bias = keep_bias(keep_full, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def _hi_lo(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 t [...] as [..., 2] in `dtype`: hi + lo equals t to about twice dtype's mantissa. The
    gradient reaches t through hi only (lo is a constant correction)."""
    hi = t.to(dtype)
    return torch.stack([hi, (t.detach() - hi.detach().float()).to(dtype)], dim=-1)


class _RowDot(torch.autograd.Function):
    """(q * k).sum(-1) with fp32 products and result, saving q and k as they are (no fp32 copies)."""

    @staticmethod
    def forward(ctx, q, k):  # noqa: ANN001, ANN205
        ctx.save_for_backward(q, k)
        return (q.float() * k.float()).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        q, k = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        return (grad * k.float()).to(q.dtype), (grad * q.float()).to(k.dtype)


def fold_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_full: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """Masked attention as one maskless SDPA call over extended q/k/v (see the module docstring).

    Per key j, extra channels add log(D_j + eps) to every score: that is log(G_ij + eps) everywhere
    except on the diagonal of a dropped row. A sentinel key (score s_i, value e_d in an extra value
    channel) adds weight exp(s_i) with s_i = P_ii + log(1 - D_i + eps) to row i, and its value is then
    mixed in as a_i v_i. Row i's own key thus gets exp(P_ii)(1 + 2 eps) in total, as G_ii = 1 asks
    (to O(eps)), with no gradient to D_i: the fold and sentinel terms cancel, as dG_ii / dD_i = 0.
    hi/lo channel pairs keep the log terms to ~16 bits in bf16. The head dim grows to a multiple
    of 8 (flash and cuDNN need it), the key count by one.
    """
    b, h, n, d = q.shape
    dtype = q.dtype
    width = -(-(d + _FOLD_CHANNELS) // 8) * 8
    pad = width - d - _FOLD_CHANNELS
    with fp32_region(q.device.type):
        keep = keep_full.float()
        key_term = torch.log(keep + MASK_EPS) / scale  # [B, N']; x q's constant 1 x scale = log(D_j + eps)
        own = _RowDot.apply(q, k) * scale  # P_ii [B, H, N'] as the kernel sums it (exact products, fp32)
        sentinel = (own + torch.log(1.0 - keep + MASK_EPS)[:, None, :]) / scale
    # Concatenation, not slice assignment: cat's backward only slices the gradient (no copies).
    fill = lambda t, value, *shape: t.new_full((), value).expand(*shape)  # noqa: E731
    sentinel_key = k.new_zeros(width)
    sentinel_key[d + 2 : d + 4] = 1.0
    sentinel_value = v.new_zeros(width)
    sentinel_value[d] = 1.0
    q_ext = torch.cat([q, fill(q, 1.0, b, h, n, 2), _hi_lo(sentinel, dtype), fill(q, 0.0, b, h, n, pad)], -1)
    key_cols = _hi_lo(key_term, dtype)[:, None].expand(b, h, n, 2)
    k_ext = torch.cat([k, key_cols, fill(k, 0.0, b, h, n, 2 + pad)], -1)
    k_ext = torch.cat([k_ext, sentinel_key.expand(b, h, 1, width)], 2)
    v_ext = torch.cat([torch.cat([v, fill(v, 0.0, b, h, n, width - d)], -1), sentinel_value.expand(b, h, 1, width)], 2)
    out = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, dropout_p=dropout_p, scale=scale)
    return torch.addcmul(out[..., :d], out[..., d : d + 1], v)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_full: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """FlexAttention adding log(D_j + eps) to every score off the diagonal (the gradient reaches D
    through the captured tensor). Training needs CUDA; on CPU only a forward without grad runs (eager)."""
    if dropout_p > 0:
        raise ValueError("attention='flex' has no attention dropout; use 'fold' or 'bias'")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, keep_full))
    if q.device.type != "cuda" and needs_grad:
        raise RuntimeError("attention='flex' trains on CUDA only (FlexAttention has no CPU backward)")
    key_term = torch.log(keep_full.float() + MASK_EPS)
    own = math.log1p(MASK_EPS)

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:
        return score + torch.where(q_idx == kv_idx, own, key_term[b, kv_idx])

    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, score_mod=score_mod, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # "called without torch.compile": eager is what a CPU check wants
        warnings.filterwarnings("ignore", message=".*without torch.compile", category=UserWarning)
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale)


_BMM_OUT_DTYPE = [True]  # CUDA torch.bmm(..., out_dtype=fp32) works (set False on the first failure)


def _mm_half(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for half-precision a, b with an fp32 result: exact products, fp32 sums (tensor-core numerics).
    On CUDA one half-precision bmm with fp32 output; elsewhere an fp32 matmul of the same values."""
    if a.is_cuda and _BMM_OUT_DTYPE[0]:
        lead = a.shape[:-2]
        try:
            out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
            return out.reshape(*lead, *out.shape[-2:])
        except (RuntimeError, TypeError):
            _BMM_OUT_DTYPE[0] = False
    return a.float() @ b.float()


def _mm32(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in fp32 with half-precision matmuls when `dtype` is half: b is rounded to `dtype`; an fp32
    `a` (a score tile) is split into hi + lo in `dtype` (two matmuls), so it keeps ~2x dtype's mantissa."""
    if dtype == torch.float32:
        return a.float() @ b.float()
    b = b.to(dtype)
    if a.dtype != torch.float32:
        return _mm_half(a.to(dtype), b)
    hi = a.to(dtype)
    return _mm_half(hi, b).add_(_mm_half((a - hi.float()).to(dtype), b))


def _chunk_scores(
    q: torch.Tensor, k: torch.Tensor, key_term: torch.Tensor, own_fix: torch.Tensor, start: int, stop: int,
    scale: float,
) -> torch.Tensor:
    """fp32 scores P_ij + log(G_ij + eps) of query rows start:stop, [B, H, rows, N']."""
    scores = _mm32(q[:, :, start:stop], k.transpose(-2, -1), q.dtype).mul_(scale)
    scores += key_term[:, None, None, :]
    rows = torch.arange(stop - start, device=q.device)
    scores[:, :, rows, rows + start] += own_fix[:, None, start:stop]
    return scores


def chunk_rows(batch: int, heads: int, tokens: int) -> int:
    """Query rows per chunk so one fp32 score tile holds at most CHUNK_ELEMENTS elements."""
    return max(1, min(tokens, CHUNK_ELEMENTS // max(1, batch * heads * tokens)))


class _ChunkedMaskedAttention(torch.autograd.Function):
    """softmax(P + log(G + eps)) V over query-row chunks; scores, probabilities and score gradients are
    fp32 tiles that are never kept (the backward recomputes them from q, k and the row log-sum-exp).
    The mask gradient sums fp32 score gradients over rows, leaving out the diagonal (dG_ii/dD_i = 0)."""

    @staticmethod
    def forward(ctx, q, k, v, keep_full, scale, rows):  # noqa: ANN001, ANN205
        keep = keep_full.float()
        key_term = torch.log(keep + MASK_EPS)
        own_fix = math.log1p(MASK_EPS) - key_term  # G_ii = 1 whatever D_i
        n = q.shape[2]
        out = torch.empty_like(v)
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            scores = _chunk_scores(q, k, key_term, own_fix, start, stop, scale)
            lse[:, :, start:stop] = scores.logsumexp(dim=-1)
            probs = scores.sub_(lse[:, :, start:stop, None]).exp_()
            out[:, :, start:stop] = _mm32(probs, v, v.dtype).to(v.dtype)
        ctx.save_for_backward(q, k, v, keep, lse)
        ctx.scale, ctx.rows, ctx.keep_dtype = scale, rows, keep_full.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, keep, lse = ctx.saved_tensors
        scale, rows, n = ctx.scale, ctx.rows, q.shape[2]
        key_term = torch.log(keep + MASK_EPS)
        own_fix = math.log1p(MASK_EPS) - key_term
        grad_out = grad_out.to(v.dtype)
        dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        d_key_term = torch.zeros_like(keep)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            probs = _chunk_scores(q, k, key_term, own_fix, start, stop, scale)
            probs = probs.sub_(lse[:, :, start:stop, None]).exp_()
            g = grad_out[:, :, start:stop]
            dv += _mm32(probs.transpose(-2, -1), g, v.dtype)
            d_probs = _mm32(g, v.transpose(-2, -1), v.dtype)
            # sum_j p_ij dp_ij = dO_i . O_i, but from fp32 probabilities rather than the rounded output.
            delta = (d_probs * probs).sum(dim=-1, keepdim=True)
            d_scores = d_probs.sub_(delta).mul_(probs)
            # The mask's gradient leaves the diagonal out. Zeroed, not subtracted: a dropped column's
            # O(1) diagonal would swamp its O(eps) off-diagonal terms in the sum.
            local = torch.arange(stop - start, device=q.device)
            diagonal = d_scores[:, :, local, local + start].clone()
            d_scores[:, :, local, local + start] = 0.0
            d_key_term += d_scores.sum(dim=(1, 2))
            d_scores[:, :, local, local + start] = diagonal
            d_scores.mul_(scale)
            dq[:, :, start:stop] = _mm32(d_scores, k, q.dtype)
            dk += _mm32(d_scores.transpose(-2, -1), q[:, :, start:stop], q.dtype)
        d_keep = (d_key_term / (keep + MASK_EPS)).to(ctx.keep_dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_keep, None, None


def chunked_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_full: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """The masked softmax in fp32 tiles of at most CHUNK_ELEMENTS scores (the reference when dropout is on)."""
    if dropout_p > 0:
        return reference_core(q, k, v, keep_full, scale, dropout_p)
    with fp32_region(q.device.type):
        return _ChunkedMaskedAttention.apply(q, k, v, keep_full, scale, chunk_rows(*q.shape[:3]))


CORES: dict[str, Core] = {
    "bias": bias_core, "fold": fold_core, "flex": flex_core, "chunked": chunked_core, "reference": reference_core,
}


def masked_attention(attn: nn.Module, x: torch.Tensor, keep_full: torch.Tensor, impl: str) -> torch.Tensor:
    """timm Attention.forward with dropped tokens masked as keys by the core `impl` (see CORES)."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _split_qkv(attn, attn.qkv(x))
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = CORES[impl](q, k, v, keep_full, attn.scale, dropout_p)
    out = out.transpose(1, 2).reshape(b, n, -1)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def reference_attention(attn: nn.Module, x: torch.Tensor, keep_full: torch.Tensor) -> torch.Tensor:
    """timm Attention.forward with the softmax swapped for DynamicViT's exact fp32 masked softmax."""
    return masked_attention(attn, x, keep_full, "reference")


_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def has_reference_path(blk: nn.Module) -> bool:
    """True for timm's pre-norm Block with the standard fused-qkv Attention."""
    attn = getattr(blk, "attn", None)
    return all(hasattr(blk, p) for p in _BLOCK_PARTS) and all(hasattr(attn, p) for p in _ATTN_PARTS)


def block_attention(blk: nn.Module, attention: str, dtype: torch.dtype) -> str:
    """The implementation a masked block runs when `attention` is asked for and q/k/v have `dtype`.

    Blocks other than timm's standard one can only take the bias (through their own forward);
    ``attn.fused_attn = False`` asks for the reference; fp16 turns ``bias`` and ``fold`` into
    ``chunked`` (their half-precision score gradients flush the O(eps) weights of dropped keys).
    """
    if not has_reference_path(blk):
        return "bias"
    if not getattr(blk.attn, "fused_attn", True):
        return "reference"
    if dtype == torch.float16 and attention in ("bias", "fold"):
        return "chunked"
    return attention


def run_block(
    blk: nn.Module,
    x: torch.Tensor,
    keep_full: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    attention: str = "bias",
) -> torch.Tensor:
    """One timm block with dropped tokens masked as keys (no mask: timm's block unchanged).

    `bias` is keep_bias(keep_full, dtype) when the caller has it already (one per stage); it is built
    here when the block needs one and none was given.
    """
    if keep_full is None:
        return blk(x)
    dtype = attention_dtype(x)
    impl = block_attention(blk, attention, dtype)
    if impl == "bias":
        return blk(x, attn_mask=keep_bias(keep_full, dtype) if bias is None else bias)
    # Same two residual lines as timm's Block.forward, with the masked attention inside.
    x = x + blk.drop_path1(blk.ls1(masked_attention(blk.attn, blk.norm1(x), keep_full, impl)))
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

