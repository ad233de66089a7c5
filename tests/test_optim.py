"""Optimizer groups (gate/backbone x decay/no-decay) and the LR as a pure function of the step."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from trainer.loop.optim import LRSchedule, apply_lr, build_optimizer, group_lr, lr_at, param_groups

GROUP_NAMES = {"gate_decay", "gate_no_decay", "gate_threshold", "backbone_decay", "backbone_no_decay"}


class ThresholdGate(nn.Module):
    """AS-ViT-like gate: one learnable scalar threshold (0-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(1e-3))


class FakeStudent(nn.Module):
    """Same parameter layout as model.PrunedViT: a timm ViT under `vit.`, gates under `gates.`."""

    def __init__(self, gates: str = "mixed") -> None:
        super().__init__()
        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                     embed_dim=16, depth=2, num_heads=2, num_classes=5, reg_tokens=2)
        predictor = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 2))
        self.gates = nn.ModuleList([] if gates == "none" else [predictor, ThresholdGate()])


def names_by_group(model: nn.Module, groups: list[dict]) -> dict[str, list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}


def test_groups_partition_trainable_params_exactly_once_and_skip_frozen():
    model = FakeStudent()
    model.vit.patch_embed.requires_grad_(False)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(trainable)
    assert {g["name"] for g in groups} == GROUP_NAMES


def test_no_decay_on_norms_biases_embeddings_tokens_and_thresholds():
    model = FakeStudent()
    groups = param_groups(model, lr=1e-3, weight_decay=0.05)
    by_name = names_by_group(model, groups)
    no_decay = set(by_name["gate_no_decay"] + by_name["backbone_no_decay"] + by_name["gate_threshold"])
    for name in ("vit.pos_embed", "vit.cls_token", "vit.reg_token", "vit.norm.weight", "vit.norm.bias",
                 "vit.blocks.0.norm1.weight", "vit.blocks.0.attn.qkv.bias", "vit.head.bias",
                 "gates.1.threshold", "gates.0.0.weight", "gates.0.1.bias"):
        assert name in no_decay, name
    decay = by_name["gate_decay"] + by_name["backbone_decay"]
    assert all(dict(model.named_parameters())[n].ndim >= 2 for n in decay)
    assert "vit.blocks.0.attn.qkv.weight" in decay and "gates.0.1.weight" in decay
    wd = {g["name"]: g["weight_decay"] for g in groups}
    assert wd == {"gate_decay": 0.05, "gate_no_decay": 0.0, "backbone_decay": 0.05, "backbone_no_decay": 0.0,
                  "gate_threshold": 0.0}


def test_gates_and_backbone_are_separate_groups_with_their_lr_scale_and_freeze():
    model = FakeStudent()
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.01, backbone_frozen_until=7)
    for name, members in names_by_group(model, groups).items():
        assert all(n.startswith("gates.") == name.startswith("gate_") for n in members), name
    for g in groups:
        is_gate = g["name"].startswith("gate_")
        assert g["lr_scale"] == (1.0 if is_gate else 0.01)
        assert g["frozen_until"] == (0 if is_gate else 7)
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])


def test_empty_groups_are_dropped_for_a_student_without_gates():
    groups = param_groups(FakeStudent(gates="none"), lr=1e-3, weight_decay=0.05)
    assert {g["name"] for g in groups} == {"backbone_decay", "backbone_no_decay"}


def test_gate_weight_decay_can_differ_from_backbone():
    groups = param_groups(FakeStudent(), lr=1e-3, weight_decay=0.05, gate_weight_decay=0.0)
    assert {g["name"]: g["weight_decay"] for g in groups}["gate_decay"] == 0.0


def test_real_student_params_are_grouped_by_gate_and_decay():
    model_pkg = pytest.importorskip("model")
    for gate in ("dynamicvit", "asvit"):
        student = model_pkg.create_student("vit_tiny_patch16_224", gate=gate, img_size=32, patch_size=8,
                                           num_classes=5, depth=4, embed_dim=32, num_heads=2)
        groups = param_groups(student, lr=1e-3, weight_decay=0.05)
        by_name = names_by_group(student, groups)
        assert sum(len(v) for v in by_name.values()) == len(list(student.parameters()))
        assert "vit.pos_embed" in by_name["backbone_no_decay"]
        if gate == "asvit":
            assert by_name["gate_threshold"] == [f"gates.{s}.threshold" for s in range(len(student.gates))]
            assert "gate_decay" not in by_name and "gate_no_decay" not in by_name


def test_schedule_endpoints_and_shape():
    base, lo, warm, total = 1e-3, 1e-5, 10, 100
    assert lr_at(0, base, warm, total, lo) == 0.0
    assert lr_at(warm, base, warm, total, lo) == pytest.approx(base)
    assert lr_at(total, base, warm, total, lo) == pytest.approx(lo)
    assert lr_at(total + 50, base, warm, total, lo) == pytest.approx(lo)
    mid = (warm + total) // 2
    halfway = lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * 0.5))
    assert lr_at(mid, base, warm, total, lo) == pytest.approx(halfway)
    up = [lr_at(s, base, warm, total, lo) for s in range(warm + 1)]
    down = [lr_at(s, base, warm, total, lo) for s in range(warm, total + 1)]
    assert all(a < b for a, b in zip(up[:-1], up[1:], strict=True))
    assert all(a >= b for a, b in zip(down[:-1], down[1:], strict=True))


def test_schedule_without_warmup_starts_at_base_lr():
    assert lr_at(0, 1e-3, 0, 10) == pytest.approx(1e-3)
    assert lr_at(10, 1e-3, 0, 10) == 0.0


def test_frozen_group_is_zero_before_unfreezing_then_joins_the_common_schedule():
    # DynamicViT: warm-up over epochs 0-5, backbone frozen for the same 5, then 0.01 x the scheduled LR.
    sched = LRSchedule(base_lr=1e-3, total_steps=120, warmup_steps=20, min_lr=1e-5)
    assert all(group_lr(s, sched, 0.01, frozen_until=20) == 0.0 for s in range(20))
    assert group_lr(20, sched, 0.01, frozen_until=20) == pytest.approx(1e-5)  # the peak x 0.01, no new warm-up
    after = [group_lr(s, sched, 0.01, frozen_until=20) for s in range(20, 121)]
    assert after == pytest.approx([0.01 * lr_at(s, 1e-3, 20, 120, 1e-5) for s in range(20, 121)])
    assert after[-1] == pytest.approx(1e-7)


def test_apply_lr_writes_what_it_returns_into_every_group():
    model = FakeStudent()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, backbone_frozen_until=20)
    sched = LRSchedule(base_lr=1e-3, total_steps=100, warmup_steps=5)
    for step in (0, 3, 19, 20, 25, 60, 100):
        written = apply_lr(opt.param_groups, step, sched)
        assert written == {g["name"]: g["lr"] for g in opt.param_groups}
        assert written["gate_decay"] == pytest.approx(lr_at(step, 1e-3, 5, 100))
        if step < 20:
            assert written["backbone_decay"] == 0.0


def test_apply_lr_reaches_the_inner_optimizer_through_a_wrapper():
    class Wrapper:  # what DeepSpeed's and Accelerate's optimizers do: expose the inner group dicts
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.inner = inner

        @property
        def param_groups(self) -> list[dict]:
            return self.inner.param_groups

    inner = build_optimizer(FakeStudent(), lr=1e-3)
    written = apply_lr(Wrapper(inner).param_groups, 50, LRSchedule(base_lr=1e-3, total_steps=100))
    assert [g["lr"] for g in inner.param_groups] == list(written.values())


def test_frozen_backbone_does_not_move_while_gates_do():
    torch.manual_seed(0)
    model = FakeStudent()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05, backbone_frozen_until=3)
    sched = LRSchedule(base_lr=1e-2, total_steps=10, warmup_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        apply_lr(opt.param_groups, step, sched)
        opt.zero_grad()
        out = model.vit(torch.randn(2, 3, 32, 32)).sum() + model.gates[0](torch.randn(2, 16)).sum()
        (out + model.gates[1].threshold).backward()
        opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == name.startswith("gates."), name


def test_schedule_rejects_inconsistent_values():
    with pytest.raises(ValueError):
        LRSchedule(base_lr=1e-3, total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError):
        LRSchedule(base_lr=1e-3, total_steps=10, min_lr=1e-2)
    with pytest.raises(ValueError):
        lr_at(-1, 1e-3, 0, 10)


def test_asvit_thresholds_step_at_their_own_small_lr():
    model = FakeStudent()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.05, threshold_lr_scale=0.02)}
    assert groups["gate_threshold"]["lr"] == pytest.approx(2e-5) and groups["gate_threshold"]["weight_decay"] == 0
    assert groups["gate_no_decay"]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="threshold_lr_scale"):
        param_groups(model, lr=1e-3, weight_decay=0.05, threshold_lr_scale=-1)


def test_frozen_params_leave_the_optimizer_and_a_typo_is_an_error():
    from model import TINY_ARCH, TINY_VIT_KWARGS, create_student
    from trainer.loop.build import TrainingError, freeze_params

    student = create_student(TINY_ARCH, gate="dynamicvit", **TINY_VIT_KWARGS)
    frozen = freeze_params(student, ["cls_token", "pos_embed"])
    assert frozen == ["vit.cls_token", "vit.pos_embed"]
    grouped = {id(p) for g in param_groups(student, lr=1e-3, weight_decay=0.05) for p in g["params"]}
    assert id(student.vit.cls_token) not in grouped and id(student.vit.pos_embed) not in grouped
    with pytest.raises(TrainingError, match="'pos_embd' matches no parameter"):
        freeze_params(student, ["pos_embd"])


def test_schedule_scales_lr_by_the_reference_batch_and_warms_up_in_epochs():
    from trainer.config import load_config
    from trainer.loop.build import build_schedule

    cfg = load_config(None, ["data.batch_size=128", "optim.lr=2e-5", "optim.lr_reference_batch=512",
                             "optim.warmup_epochs=5", "optim.min_lr=2e-6"])
    schedule = build_schedule(cfg, steps=3000, steps_per_epoch=100.0)  # one rank: global batch 128
    assert schedule.base_lr == pytest.approx(2e-5 * 128 / 512) and schedule.warmup_steps == 500
    cfg.optim.warmup_epochs = -1.0
    assert build_schedule(cfg, steps=3000, steps_per_epoch=100.0).warmup_steps == 150  # 5% of the run
