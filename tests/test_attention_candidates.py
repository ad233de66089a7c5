"""Every masked-attention implementation against DynamicViT's exact fp32 softmax (issue 14, items 2 and 3).

The cores of `model.attention` take q, k, v [B, H, N', D] and a hard {0,1} keep mask [B, N'] that needs
a gradient. The loss weights *every* output row, dropped rows included (their outputs flow on through
the later blocks of the stage, and into later values v_j that the mask gradient reads).

- fp32: the forward on kept rows within 1e-5 of `masked_softmax` (DynamicViT's formula), and the
  gradients to the mask (all tokens, and the dropped ones alone) and to q, k, v within 1e-3 relative.
  Against the fp64 log-bias softmax (the formula the fast paths compute), every row within 1e-5.
- half precision: the reference is the fp32 softmax on the same (rounded) q, k, v. "Today" is what the
  default path ran before these candidates: the bias through SDPA in bf16, the explicit fp32 softmax
  in fp16. On CPU today's bias runs SDPA's math kernel, which upcasts to fp32 inside; a kernel that
  computes in half precision (flash, as `fold` runs it) adds its own rounding, the same as it does on
  unmasked attention, so `fold`'s forward and q/k/v gradients are held to the larger of today's error
  and the flash kernel's error on the unmasked problem, and its mask gradient to 1.5x today's: it does
  NOT always meet "at least as close as today" on CPU (see the test). `chunked` (the fp16 path) is held
  to today's on everything, and to 1e-2 on the mask. The gpu-marked test holds every candidate to
  today's path on the same GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import model.attention as attention
from model.attention import CORES, block_attention, masked_softmax, pair_gate, reference_core

B, H, N, D = 2, 2, 97, 64
SCALE = D**-0.5


def problem(seed: int = 0, logit_scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """q, k, v, a hard keep mask (CLS kept, ~30% dropped) and the loss weights W."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * logit_scale
    k = torch.randn(B, H, N, D, generator=g) * logit_scale
    v = torch.randn(B, H, N, D, generator=g)
    keep = (torch.rand(B, N, generator=g) > 0.3).float()
    keep[:, 0] = 1.0
    return q, k, v, keep, torch.randn(B, H, N, D, generator=g)


def run(core, q, k, v, keep, weights, dtype=torch.float32, upcast=False) -> dict[str, torch.Tensor]:
    """Output and gradients of sum(core(q, k, v) * W), q/k/v rounded to dtype (upcast: then fp32)."""
    leaves = [t.to(dtype) for t in (q, k, v)]
    if upcast:
        leaves = [t.float() for t in leaves]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    mask = keep.clone().requires_grad_(True)
    out = core(*leaves, mask, SCALE, 0.0)
    (out.float() * weights).sum().backward()
    grads = {name: t.grad.float() for name, t in zip("qkv", leaves, strict=True)}
    return {"out": out.detach().float(), "mask": mask.grad, **grads}


def errors(got: dict, ref: dict, keep: torch.Tensor) -> dict[str, float]:
    """Max abs forward error on kept rows; relative L2 errors of the gradients."""
    kept, dropped = keep.bool(), keep == 0
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    err = {
        "fwd_kept": (got["out"] - ref["out"]).abs().transpose(1, 2)[kept].max().item(),
        **{name: rel(got[name], ref[name]) for name in "qkv"},
    }
    if ref["mask"] is not None:  # (unmasked attention has no mask gradient)
        err["mask"] = rel(got["mask"], ref["mask"])
        err["mask_dropped"] = rel(got["mask"][dropped], ref["mask"][dropped])
    return err


def log_bias_softmax64(q, k, v, keep, scale, dropout_p=0.0):
    """softmax(q k^T scale + log(G + eps)) v in fp64: what bias, fold, flex and chunked compute."""
    bias = torch.log(pair_gate(keep.double()) + attention.MASK_EPS).unsqueeze(1)
    return ((q.double() @ k.double().transpose(-2, -1)) * scale + bias).softmax(-1) @ v.double()


def today(q, k, v, keep, scale, dropout_p=0.0):
    """The default path before issue 14: bias through SDPA, except fp16 took the explicit fp32 softmax."""
    return (reference_core if q.dtype == torch.float16 else CORES["bias"])(q, k, v, keep, scale, dropout_p)


def unmasked_kernel(q, k, v, keep, scale, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


@pytest.fixture(params=["bias", "fold", "chunked", "chunked-tiles"])
def candidate(request, monkeypatch) -> str:
    if request.param == "chunked-tiles":  # 13 query rows per tile: 8 tiles, the last one ragged
        monkeypatch.setattr(attention, "CHUNK_ELEMENTS", B * H * N * 13)
        assert attention.chunk_rows(B, H, N) == 13
        return "chunked"
    return request.param


def test_fp32_matches_dynamicvit_softmax(candidate: str) -> None:
    q, k, v, keep, weights = problem()
    ref = run(reference_core, q, k, v, keep, weights)
    got = run(CORES[candidate], q, k, v, keep, weights)
    err = errors(got, ref, keep)
    assert err["fwd_kept"] <= 1e-5, err
    for name in ("mask", "mask_dropped", "q", "k", "v"):
        assert err[name] <= 1e-3, (name, err)
    assert got["mask"][keep == 0].abs().min() > 0  # every dropped token gets a gradient


def test_fp32_computes_the_log_bias_softmax_in_every_row(candidate: str) -> None:
    # Wider logits (std ~2.25): DynamicViT's eps/N form and the log-bias form part by O(eps e^dP) here,
    # so the candidates are checked against the formula they compute, dropped rows included.
    q, k, v, keep, weights = problem(seed=1, logit_scale=1.5)
    ref = run(log_bias_softmax64, q, k, v, keep, weights.double(), dtype=torch.float64)
    got = run(CORES[candidate], q, k, v, keep, weights)
    assert (got["out"].double() - ref["out"]).abs().max() <= 1e-5
    for name in ("mask", "q", "k", "v"):
        assert ((got[name].double() - ref[name]).norm() / ref[name].norm()).item() <= 1e-5, name


def half_errors(core, dtype: torch.dtype, seed: int) -> dict[str, float]:
    q, k, v, keep, weights = problem(seed)
    ref_core = unmasked_kernel if core is unmasked_kernel else reference_core
    mask = torch.ones_like(keep) if core is unmasked_kernel else keep
    ref = run(ref_core, q, k, v, mask, weights, dtype, upcast=True)
    return errors(run(core, q, k, v, mask, weights, dtype), ref, mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_fold_is_as_close_as_today_or_as_the_kernel_itself(seed: int) -> None:
    fold = half_errors(CORES["fold"], torch.bfloat16, seed)
    now = half_errors(today, torch.bfloat16, seed)
    kernel = half_errors(unmasked_kernel, torch.bfloat16, seed)
    assert fold["fwd_kept"] <= 1.25 * max(now["fwd_kept"], kernel["fwd_kept"]), (fold, now, kernel)
    for name in "qkv":
        assert fold[name] <= 1.1 * max(now[name], kernel[name]), (name, fold, now, kernel)
    # The mask gradient has no unmasked counterpart. fold's is NOT always as close as today's on CPU
    # (measured 0.9x-1.4x today's, about bf16's unit roundoff 2^-8): two O(1) terms of the diagonal, one
    # through dK and one through the sentinel's dQ, each rounded to bf16 by the kernel, cancel in it.
    for name in ("mask", "mask_dropped"):
        assert fold[name] <= min(2**-7, 1.5 * now[name]), (name, fold, now)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_is_as_close_as_today_in_half_precision(dtype: torch.dtype) -> None:
    chunked = half_errors(CORES["chunked"], dtype, 0)
    now = half_errors(today, dtype, 0)
    for name, value in chunked.items():
        assert value <= 1.05 * now[name], (name, chunked, now)


def test_fp16_mask_gradient_of_the_default_path_is_within_1e_2_on_dropped_tokens() -> None:
    # Item 3: fp16 runs `chunked` (bounded fp32 tiles, half-precision matmuls), not the N'xN' fp32 path.
    blk = Block(D * H, H)
    for name in ("bias", "fold"):
        assert block_attention(blk, name, torch.float16) == "chunked"
        assert block_attention(blk, name, torch.bfloat16) == name
    err = half_errors(CORES["chunked"], torch.float16, 2)
    assert err["mask"] <= 1e-2 and err["mask_dropped"] <= 1e-2, err
    # The half-precision kernels themselves would not do: the O(eps) weights of dropped keys are
    # subnormal in fp16 and their score gradients flush (measured 3e-2 to 3e-1 on the mask).
    assert half_errors(CORES["fold"], torch.float16, 2)["mask_dropped"] > 1e-2


def test_chunked_tiles_bound_the_fp32_scores(monkeypatch) -> None:
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 1 << 12)
    assert attention.chunk_rows(2, 2, 97) == 10
    assert attention.chunk_rows(64, 12, 577) == 1  # never zero rows
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 1 << 25)
    assert attention.chunk_rows(64, 12, 577) == 75  # DeiT-B/384 at batch 64: 8 tiles of 128 MiB, not 1 GiB x 5


def test_flex_forward_matches_on_cpu_and_refuses_cpu_training() -> None:
    q, k, v, keep, _ = problem()
    with torch.no_grad():
        torch.testing.assert_close(CORES["flex"](q, k, v, keep, SCALE), CORES["bias"](q, k, v, keep, SCALE))
    with pytest.raises(RuntimeError, match="CUDA only"):
        CORES["flex"](q.requires_grad_(True), k, v, keep, SCALE)


def test_masked_softmax_reference_is_unchanged() -> None:
    # The anchor itself: rows sum to one, dropped keys get O(eps) except on their own row.
    q, k, _, keep, _ = problem()
    probs = masked_softmax((q @ k.transpose(-2, -1)) * SCALE, keep)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, N))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["fold", "flex", "chunked"])
def test_cuda_candidates_match_the_reference(impl: str) -> None:
    """On a GPU: fp32 exactness as on CPU, and bf16/fp16 no farther than today's path on the same GPU
    (there today's bias runs a half-precision kernel too). fold must reach flash or cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, keep, weights = (t.cuda() for t in problem())
    ref = run(reference_core, q, k, v, keep, weights)
    got = run(CORES[impl], q, k, v, keep, weights)
    err = errors(got, ref, keep)
    assert err["fwd_kept"] <= 1e-5, err
    for name in ("mask", "mask_dropped", "q", "k", "v"):
        assert err[name] <= 1e-3, (name, err)
    for dtype in (torch.bfloat16, torch.float16):
        if impl == "fold" and dtype == torch.float16:
            continue  # fp16 never runs fold (block_attention routes it to chunked)
        ref = run(reference_core, q, k, v, keep, weights, dtype, upcast=True)
        cand = errors(run(CORES[impl], q, k, v, keep, weights, dtype), ref, keep)
        now = errors(run(today, q, k, v, keep, weights, dtype), ref, keep)
        floor = 1e-2 if dtype == torch.float16 else 0.0
        for name in ("mask", "mask_dropped"):
            assert cand[name] <= max(1.05 * now[name], floor), (dtype, name, cand, now)
        if dtype == torch.bfloat16:
            ones = torch.ones_like(keep)
            plain = run(unmasked_kernel, q, k, v, ones, weights, dtype)
            kernel = errors(plain, run(unmasked_kernel, q, k, v, ones, weights, dtype, upcast=True), ones)
            for name in "qkv":
                assert cand[name] <= 1.1 * max(now[name], kernel[name]), (name, cand, now, kernel)
    if impl == "fold":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            run(CORES["fold"], q, k, v, keep, weights, torch.bfloat16)  # raises if neither kernel can run


# --- the whole student: the option, and every implementation giving the same step -------------------


def replayed_step(attention_name: str, checkpointing: bool = False, gate: str = "dynamicvit") -> dict:
    """Logits, the gradients to replayed keep masks and to the backbone, for one attention option."""
    from model import TINY_ARCH, TINY_VIT_KWARGS, create_student

    torch.manual_seed(0)
    student = create_student(TINY_ARCH, gate=gate, attention=attention_name, **TINY_VIT_KWARGS).train()
    student.vit.set_grad_checkpointing(checkpointing)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g)
    masks = [(torch.rand(2, 16, generator=g) > 0.35).float().requires_grad_(True) for _ in student.locations]
    out = student.forward_masked(images, keep_masks=masks)
    (out.logits * torch.linspace(-1, 1, 10)).sum().backward()
    return {"logits": out.logits.detach(), "masks": [m.grad for m in masks],
            "qkv": student.vit.blocks[-1].attn.qkv.weight.grad}


@pytest.mark.parametrize("name", ["fold", "chunked", "reference"])
def test_every_option_gives_the_default_training_step(name: str) -> None:
    expected, got = replayed_step("bias"), replayed_step(name)
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
    for g, e in zip(got["masks"], expected["masks"], strict=True):
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got["qkv"], expected["qkv"], rtol=1e-3, atol=1e-6)


def test_fold_under_activation_checkpointing_and_asvit_scores() -> None:
    plain, checkpointed = replayed_step("fold"), replayed_step("fold", checkpointing=True)
    torch.testing.assert_close(checkpointed["masks"][0], plain["masks"][0])
    # AS-ViT reads the CLS row from the block's taps (attn.qkv, attn.proj): fold calls both.
    from model import TINY_ARCH, TINY_VIT_KWARGS, create_student

    outputs = []
    for name in ("bias", "fold"):
        torch.manual_seed(0)
        student = create_student(TINY_ARCH, gate="asvit", attention=name, **TINY_VIT_KWARGS).train()
        with torch.no_grad():
            for gate_module in student.gates:
                gate_module.threshold.fill_(1.0 / 17)
        torch.manual_seed(1)
        outputs.append(student(torch.randn(2, 3, 32, 32)))
    for a, b in zip(outputs[0].keep_masks, outputs[1].keep_masks, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=1e-5, atol=1e-5)


def test_unknown_attention_is_refused() -> None:
    from model import TINY_ARCH, TINY_VIT_KWARGS, create_student

    with pytest.raises(ValueError, match="attention must be one of"):
        create_student(TINY_ARCH, attention="sparse", **TINY_VIT_KWARGS)


def test_train_step_bench_times_the_candidates_side_by_side() -> None:
    from model.bench import bench_train_step

    out = bench_train_step(arch="vit_tiny_patch16_224", img_size=32, batch_size=2, warmup=0, iters=1,
                           attention=["bias", "fold", "chunked"])
    assert out["attention"] == "bias"
    assert set(out["attention_candidates"]) == {"bias", "fold", "chunked"}
    assert out["attention_candidates"]["bias"]["step_s"] == out["gated_step_s"]
    assert all(c["overhead"] > 0 for c in out["attention_candidates"].values())
