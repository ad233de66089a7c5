"""Key-masked attention: every implementation of a block (bias, fold, chunked) agrees with DynamicViT's
exact masked softmax; tests/test_attention_candidates.py measures each one's error in detail."""

import pytest
import torch
from timm.models.vision_transformer import Block

from model.attention import (
    cls_attention_scores,
    keep_bias,
    masked_softmax,
    reference_attention,
    run_block,
    tap_attention,
)


def make_block(dim: int = 32, heads: int = 4) -> Block:
    torch.manual_seed(0)
    return Block(dim, heads, qkv_bias=True).eval()


def random_keep(batch: int, tokens: int, prefix: int = 1) -> torch.Tensor:
    keep = (torch.rand(batch, tokens, generator=torch.Generator().manual_seed(2)) > 0.4).float()
    keep[:, :prefix] = 1.0  # CLS is never dropped
    return keep


def test_masked_softmax_rows_sum_to_one_and_hide_dropped_keys_but_keep_the_diagonal() -> None:
    logits = torch.randn(2, 3, 9, 9)
    keep = random_keep(2, 9)
    probs = masked_softmax(logits, keep)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 9))
    dropped_b, dropped_j = torch.nonzero(keep == 0, as_tuple=True)
    for b, j in zip(dropped_b.tolist(), dropped_j.tolist(), strict=True):
        column = probs[b, :, :, j]  # [H, Nq]: how much each query attends to dropped key j
        assert column[:, torch.arange(9) != j].max() < 1e-5
        assert column[:, j].min() > 1e-3  # a dropped token still attends to itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_softmax_is_fp32_whatever_the_input(dtype: torch.dtype) -> None:
    probs = masked_softmax(torch.randn(1, 1, 5, 5).to(dtype) * 30, torch.ones(1, 5))
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()


@pytest.mark.parametrize("attention", ["bias", "fold", "chunked", "flex"])
def test_every_path_and_reference_softmax_agree_in_value_and_gradient(attention: str) -> None:
    blk = make_block()
    x = torch.randn(2, 9, 32)
    keep = random_keep(2, 9).requires_grad_(True)
    outputs, grads = [], []
    for fused in (True, False):  # fused_attn = False selects the reference whatever is asked
        blk.attn.fused_attn = fused
        keep.grad = None
        if attention == "flex" and fused:  # no CPU backward: the forward only
            with torch.no_grad():
                outputs.append(run_block(blk, x, keep.detach(), None, attention))
            grads.append(None)
            continue
        out = run_block(blk, x, keep, keep_bias(keep, x.dtype) if attention == "bias" else None, attention)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        outputs.append(out.detach())
        grads.append(keep.grad.clone())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    if grads[0] is not None:
        assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0  # both reach the keep mask
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("attention", ["bias", "fold"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_gradient_of_dropped_keys_survives_half_precision(dtype: torch.dtype, attention: str) -> None:
    # fp16 routes to the chunked fp32-tile softmax (its O(1e-6) weights are subnormal in fp16);
    # bf16 keeps the kernel path asked for. Either way the gradient matches fp32.
    x = torch.randn(2, 9, 32)
    keep = random_keep(2, 9)
    grads = []
    for blk, dt in ((make_block(), torch.float32), (make_block().to(dtype), dtype)):
        k = keep.clone().requires_grad_(True)
        out = run_block(blk, x.to(dt), k, None, attention)
        (out.float() * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append(k.grad)
    dropped = keep == 0
    error = (grads[1] - grads[0])[dropped].norm() / grads[0][dropped].norm()
    assert error < 0.02


def test_reference_attention_with_nothing_dropped_equals_timm_attention() -> None:
    blk = make_block()
    x = torch.randn(2, 9, 32)
    expected = blk.attn(x)
    actual = reference_attention(blk.attn, x, torch.ones(2, 9))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_cls_scores_match_the_full_attention_matrix(with_mask: bool) -> None:
    blk = make_block()
    blk.attn.fused_attn = True
    x = torch.randn(2, 9, 32)
    keep = random_keep(2, 9) if with_mask else None
    bias = keep_bias(keep, x.dtype) if with_mask else None
    with tap_attention(blk.attn) as tap:
        run_block(blk, x, keep, bias)
    scores = cls_attention_scores(blk.attn, tap, keep, num_prefix=1)

    # Brute force: the whole attention matrix and per-head contexts, as in the AS-ViT paper.
    attn = blk.attn
    q, k, v = attn.qkv(blk.norm1(x)).reshape(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    probs = masked_softmax(logits, keep) if with_mask else logits.softmax(-1)
    heads = (probs @ v).norm(dim=-1)  # [B, H, N]
    weights = heads / (heads.sum(dim=1, keepdim=True) + 1e-8)
    expected = (weights * probs[:, :, 0, :]).sum(dim=1)[:, 1:]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_tap_hooks_are_removed_after_the_call() -> None:
    blk = make_block()
    with tap_attention(blk.attn):
        blk(torch.randn(1, 5, 32))
    assert not blk.attn.qkv._forward_hooks and not blk.attn.proj._forward_pre_hooks
