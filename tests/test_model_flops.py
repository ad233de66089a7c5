"""The analytic MACs counter reproduces the paper tables and matches the live-token FLOPs of training."""

import pytest
import torch

from model import TINY_ARCH, TINY_VIT_KWARGS, count_flops, create_student, create_teacher


def on_meta(arch: str, gate: str, img_size: int) -> torch.nn.Module:
    with torch.device("meta"):
        return create_student(arch, gate=gate, img_size=img_size)


@pytest.mark.parametrize(
    ("arch", "size", "dense", "pruned"),
    [
        ("deit_small_patch16_224", 224, 4.6, 2.9),
        ("deit_base_patch16_224", 224, 17.6, 11.4),
        ("deit_base_patch16_384", 384, 55.5, 35.4),
    ],
)
def test_dense_and_dynamicvit_gmacs_match_the_reference_table(
    arch: str, size: int, dense: float, pruned: float
) -> None:
    student = on_meta(arch, "dynamicvit", size)
    assert count_flops(student.vit, size) == pytest.approx(dense, abs=0.05)
    assert count_flops(student, size) == pytest.approx(pruned, abs=0.1)  # includes the predictors' cost


def test_flops_count_12_n_c2_plus_2_n2_c_per_block() -> None:
    student = on_meta("deit_small_patch16_224", "none", 224)
    n, c = 197, 384
    expected = 12 * (12 * n * c * c + 2 * n * n * c) + 196 * 16 * 16 * 3 * c + c * 1000
    assert count_flops(student, 224) == pytest.approx(expected / 1e9, rel=1e-12)


def test_dense_gate_none_student_teacher_and_plain_timm_count_the_same() -> None:
    student = create_student(TINY_ARCH, gate="none", **TINY_VIT_KWARGS)
    teacher = create_teacher(TINY_ARCH, **TINY_VIT_KWARGS)
    assert count_flops(student, 32) == count_flops(student.vit, 32) == count_flops(teacher, 32)


def test_eval_students_report_the_kept_counts_of_their_last_forward() -> None:
    student = create_student(TINY_ARCH, gate="asvit", **TINY_VIT_KWARGS).eval()
    with torch.no_grad():
        for gate in student.gates:
            gate.threshold.fill_(1.0 / 16)
    before = count_flops(student, 32)  # what the thresholds give on a fixed synthetic image
    assert student.last_keep_counts is None  # the probe leaves no trace
    student(torch.randn(4, 3, 32, 32))
    counts = student.last_keep_counts
    assert count_flops(student, 32) == pytest.approx(count_flops(student, 32, keep_counts=counts))
    dense = count_flops(student.vit, 32)
    assert 0 < before < dense + 0.001


def test_untrained_asvit_deit_s_keeps_what_its_thresholds_give() -> None:
    # An untrained model has near-uniform attention (scores ~ 1/197 > 1e-3..3e-3): it keeps almost
    # everything, so its count is close to dense plus the (tiny) scoring cost. Training to f = 0.65
    # is what brings it to ~3.0 GMACs.
    torch.manual_seed(0)
    student = create_student("deit_small_patch16_224", gate="asvit")
    gmacs = count_flops(student, 224)
    dense = count_flops(student.vit, 224)
    assert 0.65 * dense < gmacs <= dense + 0.01
    assert count_flops(student, 224, keep_counts=[196, 196, 196]) == pytest.approx(dense, abs=0.01)


@pytest.mark.parametrize("gate", ["dynamicvit", "asvit"])
def test_training_flops_per_sample_equal_the_eval_count_for_the_same_keep_decision(gate: str) -> None:
    torch.manual_seed(0)
    student = create_student(TINY_ARCH, gate=gate, **TINY_VIT_KWARGS).eval()
    x = torch.randn(2, 3, 32, 32)
    student(x)
    masks = []
    for index in student.last_keep_indices:
        masks.append(torch.zeros(2, 16).scatter_(1, index, 1.0))
    out = student.forward_masked(x, keep_masks=masks)
    expected = count_flops(student, 32)
    torch.testing.assert_close(out.gmacs, torch.full((2,), expected), rtol=1e-6, atol=0)
    assert out.dense_gmacs == pytest.approx(count_flops(student.vit, 32))


def test_training_flops_carry_gradient_to_the_asvit_thresholds() -> None:
    torch.manual_seed(0)
    student = create_student(TINY_ARCH, gate="asvit", **TINY_VIT_KWARGS).train()
    with torch.no_grad():
        for gate in student.gates:
            gate.threshold.fill_(1.0 / 17)
    out = student(torch.randn(8, 3, 32, 32))
    budget_loss = (out.gmacs.mean() - student.flops_budget * out.dense_gmacs).abs()
    budget_loss.backward()
    assert any(g.threshold.grad.abs().item() > 0 for g in student.gates)


def test_asvit_calibration_sets_thresholds_that_meet_the_flops_budget() -> None:
    torch.manual_seed(0)
    student = create_student(TINY_ARCH, gate="asvit", flops_budget=0.6, **TINY_VIT_KWARGS)
    for batch in (1, 6):
        x = torch.randn(batch, 3, 32, 32)
        counts = student.calibrate_thresholds(x)
        assert counts == student.budget_keep_counts(16)
        assert student.training  # mode restored
        student.eval()(x)  # the thresholds alone now reproduce the calibrated counts on this batch
        assert student.last_keep_counts == counts
        student.train()
    dense = count_flops(student.vit, 32)
    assert count_flops(student, 32) == pytest.approx(0.6 * dense, rel=0.1)
