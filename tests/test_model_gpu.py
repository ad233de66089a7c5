"""CUDA checks of the masked attention (skipped without a GPU): fused kernels still pass gradient."""

import pytest
import torch
import torch.nn.functional as F

from model import TINY_ARCH, TINY_VIT_KWARGS, create_student

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gated_step_is_finite_and_fused_matches_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    student = create_student(TINY_ARCH, gate="dynamicvit", **TINY_VIT_KWARGS).cuda().train()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    masks = [(torch.rand(4, 16, device="cuda") > p).float() for p in (0.3, 0.5, 0.7)]
    masks = [masks[0], masks[0] * masks[1], masks[0] * masks[1] * masks[2]]
    logits = []
    for fused in (True, False):
        for blk in student.vit.blocks:
            blk.attn.fused_attn = fused
        with torch.autocast("cuda", dtype=dtype):
            out = student.forward_masked(x, keep_masks=masks)
        logits.append(out.logits.float())
    torch.testing.assert_close(logits[0], logits[1], rtol=0.05, atol=0.05)
    for blk in student.vit.blocks:
        blk.attn.fused_attn = True
    with torch.autocast("cuda", dtype=dtype):
        out = student(x)
        loss = F.cross_entropy(out.logits.float(), torch.arange(4, device="cuda"))
    loss.backward()
    grads = [p.grad for p in student.gates.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
