"""Mixed precision: gate decisions and masked softmax stay fp32, nothing overflows in fp16 or bf16."""

import pytest
import torch
import torch.nn.functional as F

from model import TINY_ARCH, TINY_VIT_KWARGS, create_student

# (attention option, blk.attn.fused_attn): every masked path, and timm's flag selecting the reference
PATHS = [("bias", True), ("fold", True), ("chunked", True), ("bias", False)]


def tiny(gate: str, attention: str = "bias") -> torch.nn.Module:
    torch.manual_seed(0)
    student = create_student(TINY_ARCH, gate=gate, attention=attention, **TINY_VIT_KWARGS)
    if gate == "asvit":
        with torch.no_grad():  # thresholds inside the score range, so masks are neither all-0 nor all-1
            for gate_module in student.gates:
                gate_module.threshold.fill_(1.0 / 17)
    return student


def check_train_step(student: torch.nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None) -> None:
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = student(x)
        loss = F.cross_entropy(out.logits.float(), torch.arange(x.shape[0]) % 10) + out.gmacs.mean()
    loss.backward()
    for mask in out.keep_masks:
        assert mask.dtype == torch.float32 and torch.all((mask == 0) | (mask == 1))
    assert out.gmacs.dtype == torch.float32
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.tokens).all() and torch.isfinite(loss)
    for name, p in student.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.gates.parameters())


@pytest.mark.parametrize(("attention", "fused"), PATHS)
@pytest.mark.parametrize("gate", ["dynamicvit", "asvit"])
def test_bf16_autocast_train_and_eval_are_finite(gate: str, attention: str, fused: bool) -> None:
    student = tiny(gate, attention).train()
    for blk in student.vit.blocks:
        blk.attn.fused_attn = fused
    x = torch.randn(4, 3, 32, 32)
    check_train_step(student, x, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        assert torch.isfinite(student.eval()(x)).all()


@pytest.mark.parametrize(("attention", "fused"), PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate", ["dynamicvit", "asvit"])
def test_half_precision_modules_train_and_eval_are_finite(
    gate: str, dtype: torch.dtype, attention: str, fused: bool
) -> None:
    # DeepSpeed casts the whole module (model.half() / .bfloat16()); gates must still decide in fp32.
    student = tiny(gate, attention).to(dtype).train()
    for blk in student.vit.blocks:
        blk.attn.fused_attn = fused
    x = (torch.randn(4, 3, 32, 32) * 4).to(dtype)
    for _ in range(3):  # several Gumbel draws
        student.zero_grad()
        check_train_step(student, x, None)
    with torch.inference_mode():
        logits = student.eval()(x)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert student.last_keep_counts is not None
