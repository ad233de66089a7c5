"""Loss terms: zero exactly where they should be, fp32 and finite from half inputs, gradients flow."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from trainer.loop.losses import (
    LossWeights,
    compute_losses,
    flops_budget_loss,
    keep_ratio_loss,
    logit_kd_loss,
    soft_target_ce,
    token_kd_loss,
)

B, N, C, K = 4, 20, 8, 10
RHO = 0.7
S = 3  # stages of the fake student
DENSE = 4.6  # GMACs per image of the dense model


@dataclass
class FakeStudentOutput:
    """Same fields and shapes as model.StudentOutput in training mode."""

    logits: torch.Tensor
    tokens: torch.Tensor
    keep_masks: list[torch.Tensor] = field(default_factory=list)
    gmacs: torch.Tensor | None = None
    keep_ratios: torch.Tensor | None = None


@dataclass
class FakeTeacherOutput:
    logits: torch.Tensor
    tokens: torch.Tensor


def masks_keeping(counts: list[int], batch: int = B, n: int = N) -> list[torch.Tensor]:
    """Cumulative {0,1} masks keeping the first counts[s] tokens of every sample at stage s."""
    out = []
    for c in counts:
        m = torch.zeros(batch, n)
        m[:, :c] = 1.0
        out.append(m)
    return out


def student(gate: str = "dynamicvit", seed: int = 0, dtype: torch.dtype = torch.float32,
            counts: list[int] | None = None, gmacs: float = 3.0) -> FakeStudentOutput:
    """Fake training output; by default every stage keeps a fraction off its rho^s target."""
    g = torch.Generator().manual_seed(seed)
    masks = [] if gate == "none" else masks_keeping(counts or [12, 9, 5])
    return FakeStudentOutput(
        logits=torch.randn(B, K, generator=g).to(dtype),
        tokens=torch.randn(B, N, C, generator=g).to(dtype),
        keep_masks=[m.to(dtype) for m in masks],
        gmacs=torch.full((B,), gmacs, dtype=dtype),
    )


def rho_powers(rho: float, stages: int) -> list[float]:
    """DynamicViT's keep targets rho^(s+1) (what PrunedViT.target_keep_ratios gives)."""
    return [rho ** (s + 1) for s in range(stages)]


def soft_targets(seed: int = 1) -> torch.Tensor:
    return torch.softmax(torch.randn(B, K, generator=torch.Generator().manual_seed(seed)), dim=-1)


def teacher_like(out: FakeStudentOutput) -> FakeTeacherOutput:
    return FakeTeacherOutput(out.logits.detach().clone(), out.tokens.detach().clone())


def test_ce_equals_timm_soft_target_cross_entropy():
    logits, targets = torch.randn(B, K), soft_targets()
    assert torch.allclose(soft_target_ce(logits, targets), SoftTargetCrossEntropy()(logits, targets))


def test_ce_accepts_integer_labels_as_one_hot_targets():
    logits, labels = torch.randn(B, K), torch.tensor([0, 3, 9, 2])
    expected = SoftTargetCrossEntropy()(logits, F.one_hot(labels, K).float())
    assert torch.allclose(soft_target_ce(logits, labels), expected)


def test_ratio_is_zero_when_kept_fractions_equal_rho_powers():
    # rho = 0.5 on 16 tokens: 8, 4, 2 kept are exactly rho^1, rho^2, rho^3.
    masks = masks_keeping([8, 4, 2], n=16)
    assert keep_ratio_loss(masks, rho_powers(0.5, 3)).item() == 0.0


def test_ratio_matches_dynamicvit_formula_per_sample_then_batch_then_stage_mean():
    masks = [torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]]), torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0]])]
    rho = 0.5
    stage1 = ((0.75 - rho) ** 2 + (0.25 - rho) ** 2) / 2
    stage2 = ((0.5 - rho**2) ** 2 + (0.0 - rho**2) ** 2) / 2
    expected = (stage1 + stage2) / 2
    assert keep_ratio_loss(masks, rho_powers(rho, 2)).item() == pytest.approx(expected)


def test_kd_is_zero_when_student_equals_teacher_and_positive_otherwise():
    logits = torch.randn(B, K)
    assert logit_kd_loss(logits, logits.clone()).abs().item() < 1e-6
    assert logit_kd_loss(logits, torch.randn(B, K)).item() > 0


def test_kd_temperature_scales_by_t_squared():
    s, t = torch.randn(B, K), torch.randn(B, K)
    manual = F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="batchmean") * 16
    assert logit_kd_loss(s, t, temperature=4.0).item() == pytest.approx(manual.item(), rel=1e-5)


def test_tok_is_zero_when_tokens_equal_and_counts_only_kept_tokens():
    s, t = torch.randn(B, N, C), torch.randn(B, N, C)
    keep = masks_keeping([5])[0]
    assert token_kd_loss(s, s.clone(), keep).item() == 0.0
    # Differences on dropped tokens do not count: the loss equals the plain MSE over kept ones.
    t_dropped_differ = s.clone()
    t_dropped_differ[:, 5:] = t[:, 5:]
    assert token_kd_loss(s, t_dropped_differ, keep).item() == 0.0
    assert token_kd_loss(s, t, keep).item() == pytest.approx(F.mse_loss(s[:, :5], t[:, :5]).item(), rel=1e-6)


def test_tok_is_zero_not_nan_when_no_token_is_kept():
    s, t = torch.randn(B, N, C), torch.randn(B, N, C)
    assert token_kd_loss(s, t, torch.zeros(B, N)).item() == 0.0


def test_flops_is_zero_at_exact_budget():
    for form in ("absolute", "normalized"):
        at_budget = flops_budget_loss(torch.full((B,), 0.65 * DENSE), 0.65, DENSE, form)
        assert at_budget.item() == pytest.approx(0.0, abs=1e-6)


def test_flops_loss_in_absolute_gmacs_by_hand():
    # DeiT-S/224 by the official formula: dense 4.6 GMACs, budget 0.65 -> target 2.99 GMACs. A batch at
    # 3.2 and 3.6 GMACs (mean 3.4) is 0.41 GMACs over: the official |mean - f dense| = 0.41.
    gmacs = torch.tensor([3.2, 3.6])
    assert flops_budget_loss(gmacs, 0.65, 4.6).item() == pytest.approx(0.41, rel=1e-5)
    assert flops_budget_loss(gmacs, 0.65, 4.6, "absolute").item() == pytest.approx(0.41, rel=1e-5)
    # Normalised: 0.41 / 4.6. Scale-free: DeiT-B/384 (12x the GMACs) gives the same normalised value and
    # a 12x larger absolute one.
    assert flops_budget_loss(gmacs, 0.65, 4.6, "normalized").item() == pytest.approx(0.41 / 4.6, rel=1e-5)
    assert flops_budget_loss(gmacs * 12, 0.65, 4.6 * 12, "normalized").item() == pytest.approx(0.41 / 4.6, rel=1e-4)
    assert flops_budget_loss(gmacs * 12, 0.65, 4.6 * 12).item() == pytest.approx(0.41 * 12, rel=1e-4)
    with pytest.raises(ValueError, match="form"):
        flops_budget_loss(gmacs, 0.65, 4.6, "relative")


def test_dynamicvit_with_teacher_reports_ce_ratio_kd_tok_and_weighted_total():
    out = student("dynamicvit")
    teacher = FakeTeacherOutput(torch.randn(B, K), torch.randn(B, N, C))
    w = LossWeights(w_ratio=5.0, w_kd=0.3, w_tok=0.2)
    terms = compute_losses(out, soft_targets(), teacher, w, "dynamicvit", keep_targets=rho_powers(RHO, S))
    assert set(terms) == {"ce", "ratio", "kd", "tok", "total"}
    for name, value in terms.items():
        assert value.dtype == torch.float32 and value.ndim == 0 and torch.isfinite(value), name
        assert value.item() > 0, name
    expected = terms["ce"] + 5.0 * terms["ratio"] + 0.3 * terms["kd"] + 0.2 * terms["tok"]
    assert torch.allclose(terms["total"], expected)


def test_asvit_reports_flops_and_no_ratio_or_tok():
    out = student("asvit", gmacs=3.5)
    teacher = FakeTeacherOutput(torch.randn(B, K), torch.randn(B, N, C))
    terms = compute_losses(out, soft_targets(), teacher, LossWeights(), "asvit", flops_budget=0.65,
                           dense_gmacs=DENSE)
    assert set(terms) == {"ce", "flops", "kd", "total"}
    assert terms["flops"].item() == pytest.approx(abs(3.5 - 0.65 * DENSE), rel=1e-6)  # GMACs, the default
    assert torch.allclose(terms["total"], terms["ce"] + 2.0 * terms["flops"] + 0.5 * terms["kd"])
    normalized = compute_losses(out, soft_targets(), teacher, LossWeights(), "asvit", flops_budget=0.65,
                                dense_gmacs=DENSE, flops_loss="normalized")
    assert normalized["flops"].item() == pytest.approx(abs(3.5 / DENSE - 0.65), rel=1e-6)


def test_total_equals_ce_when_every_other_term_is_at_its_optimum():
    out = student("dynamicvit", counts=[10, 5])  # rho = 0.5 on 20 tokens: exactly rho^1, rho^2
    terms = compute_losses(out, soft_targets(), teacher_like(out), gate_type="dynamicvit",
                           keep_targets=rho_powers(0.5, 2))
    assert terms["ratio"].item() == 0.0 and terms["tok"].item() == 0.0 and abs(terms["kd"].item()) < 1e-6
    assert terms["total"].item() == pytest.approx(terms["ce"].item(), abs=1e-6)


def test_absent_terms_when_no_teacher_no_gates_or_zero_weight():
    assert set(compute_losses(student("none"), soft_targets(), None, gate_type="none")) == {"ce", "total"}
    out = student("dynamicvit")
    assert set(compute_losses(out, soft_targets(), None, gate_type="dynamicvit",
                           keep_targets=rho_powers(RHO, S))) == {"ce", "ratio", "total"}
    terms = compute_losses(out, soft_targets(), teacher_like(out), LossWeights(w_kd=0.0, w_tok=0.0),
                           gate_type="dynamicvit",
                           keep_targets=rho_powers(RHO, S))
    assert set(terms) == {"ce", "ratio", "total"}


def test_terms_are_fp32_and_finite_from_bf16_and_fp16_inputs():
    for dtype in (torch.bfloat16, torch.float16):
        out = student("dynamicvit", dtype=dtype)
        teacher = FakeTeacherOutput(torch.randn(B, K).to(dtype) * 30, torch.randn(B, N, C).to(dtype))
        out.logits = out.logits * 30  # large logits: half-precision softmax would lose the tail
        terms = compute_losses(out, soft_targets(), teacher, gate_type="dynamicvit",
                           keep_targets=rho_powers(RHO, S))
        for name, value in terms.items():
            assert value.dtype == torch.float32 and torch.isfinite(value), (dtype, name)


def test_gradients_reach_logits_tokens_masks_and_flops():
    out = student("dynamicvit")
    out.logits.requires_grad_(True)
    out.tokens.requires_grad_(True)
    for m in out.keep_masks:
        m.requires_grad_(True)
    teacher = FakeTeacherOutput(torch.randn(B, K), torch.randn(B, N, C))
    compute_losses(out, soft_targets(), teacher, gate_type="dynamicvit",
                           keep_targets=rho_powers(RHO, S))["total"].backward()
    assert out.logits.grad.abs().sum() > 0 and out.tokens.grad.abs().sum() > 0
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in out.keep_masks)

    out = student("asvit", gmacs=4.0)
    out.gmacs.requires_grad_(True)
    compute_losses(out, soft_targets(), None, gate_type="asvit", dense_gmacs=DENSE)["total"].backward()
    assert out.gmacs.grad.abs().sum() > 0


def test_teacher_outputs_from_inference_mode_are_usable():
    out = student("dynamicvit")
    out.logits.requires_grad_(True)
    with torch.inference_mode():
        teacher = FakeTeacherOutput(torch.randn(B, K), torch.randn(B, N, C))
    compute_losses(out, soft_targets(), teacher, gate_type="dynamicvit",
                           keep_targets=rho_powers(RHO, S))["total"].backward()
    assert out.logits.grad is not None


def test_invalid_weights_and_setups_fail_with_a_named_value():
    with pytest.raises(ValueError, match="kd"):
        LossWeights(w_kd=-0.1)
    with pytest.raises(ValueError, match="tok"):
        LossWeights(w_tok=float("nan"))
    with pytest.raises(ValueError, match="kd_temperature"):
        LossWeights(kd_temperature=0.0)
    with pytest.raises(ValueError, match="dense GMACs"):
        compute_losses(student("asvit"), soft_targets(), gate_type="asvit")
    with pytest.raises(ValueError, match="keep mask"):
        compute_losses(student("none"), soft_targets(), gate_type="dynamicvit",
                           keep_targets=rho_powers(RHO, S))
    out = student("dynamicvit")
    wrong_width = FakeTeacherOutput(torch.randn(B, K), torch.randn(B, N, 2 * C))
    with pytest.raises(ValueError, match="same width"):
        compute_losses(out, soft_targets(), wrong_width, gate_type="dynamicvit",
                           keep_targets=rho_powers(RHO, S))


@pytest.mark.parametrize("gate", ["dynamicvit", "asvit", "none"])
def test_real_tiny_student_and_teacher_give_finite_terms_and_gate_gradients(gate):
    model = pytest.importorskip("model")
    kwargs = dict(img_size=32, num_classes=K, depth=4, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    stud = model.create_student("vit_tiny_patch16_224", gate=gate, patch_size=8, **kwargs).train()
    teach = model.create_teacher("vit_tiny_patch16_224", patch_size=8, **kwargs)
    images = torch.randn(2, 3, 32, 32)
    out = stud(images)
    with torch.inference_mode():
        t_out = teach(images)
    targets = torch.softmax(torch.randn(2, K), dim=-1)
    terms = compute_losses(out, targets, t_out, LossWeights(), stud.gate_type, stud.target_keep_ratios,
                           stud.flops_budget, dense_gmacs=model.count_flops(teach, 32))
    expected = {"dynamicvit": {"ratio", "tok"}, "asvit": {"flops"}, "none": set()}[gate]
    assert set(terms) == {"ce", "kd", "total"} | expected
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    gate_params = [p for n, p in stud.named_parameters() if n.startswith("gates.")]
    assert all(p.grad is not None for p in gate_params)
