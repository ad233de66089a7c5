"""AdamW parameter groups for the pruned student, and the LR as a pure function of the step.

Groups: gate vs backbone (parameters named "gates.*" are gate parameters, everything else is
backbone), each split into decay / no-decay. Every group carries the keys `apply_lr` reads:
`name`, `lr_scale` (1 for gates, backbone_lr_scale for the backbone) and `frozen_until` (the step
before which its LR is 0: DynamicViT keeps the backbone still for the first ~1/6 of training while
the gates learn). There is no scheduler object: `apply_lr` writes each group's LR every step, so
nothing needs checkpointing and every backend (DeepSpeed, Accelerate, plain torch) behaves the same.
"""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch
from torch import nn

GATE_PREFIX = "gates."
# Learned tokens and position embeddings are not weights to shrink; timm's ViT lists most of them in
# no_weight_decay(), this catches the same names on models that do not.
NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that every `no_weight_decay()` in the module tree (timm convention) lists."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names.update(f"{prefix}.{n}" if prefix else n for n in listed())
    return names


def is_no_decay(name: str, param: torch.Tensor, listed: AbstractSet[str] = frozenset()) -> bool:
    """No weight decay on 1-D/scalar params (norms, biases, thresholds), biases, embeddings and tokens."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or name in listed
        or name.rsplit(".", 1)[-1] in NO_DECAY_SUFFIXES
    )


def param_groups(
    student: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_scale: float = 0.01,
    backbone_frozen_until: int = 0,
    gate_weight_decay: float | None = None,
    threshold_lr_scale: float = 1.0,
) -> list[dict]:
    """AdamW groups {gate,backbone}_{decay,no_decay} (+ gate_threshold) with name/lr_scale/frozen_until.

    Empty groups are dropped. gate_weight_decay defaults to weight_decay (DynamicViT's code decays the
    predictor's weights too). AS-ViT thresholds get their own group at lr * threshold_lr_scale: they
    live on the attention-mass scale (~1/N, 1e-3 at 196 patches) while Adam moves a parameter by ~lr
    per step, so at the gates' lr they swing past every score within a few steps and saturate.
    The initial `lr` of each group is lr * lr_scale; `apply_lr` overwrites it every step.
    """
    if lr < 0 or weight_decay < 0 or backbone_lr_scale < 0 or backbone_frozen_until < 0:
        raise ValueError("lr, weight_decay, backbone_lr_scale and backbone_frozen_until must be >= 0")
    gate_wd = weight_decay if gate_weight_decay is None else gate_weight_decay
    if gate_wd < 0:
        raise ValueError(f"gate_weight_decay must be >= 0, got {gate_wd}")
    if threshold_lr_scale < 0:
        raise ValueError(f"threshold_lr_scale must be >= 0, got {threshold_lr_scale}")
    listed = _no_decay_names(student)
    spec = {
        "gate_decay": (1.0, 0, gate_wd),
        "gate_no_decay": (1.0, 0, 0.0),
        "gate_threshold": (threshold_lr_scale, 0, 0.0),
        "backbone_decay": (backbone_lr_scale, backbone_frozen_until, weight_decay),
        "backbone_no_decay": (backbone_lr_scale, backbone_frozen_until, 0.0),
    }
    members: dict[str, list[nn.Parameter]] = {name: [] for name in spec}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        part = "gate" if name.startswith(GATE_PREFIX) else "backbone"
        if part == "gate" and name.endswith(".threshold"):
            members["gate_threshold"].append(param)
            continue
        kind = "no_decay" if is_no_decay(name, param, listed) else "decay"
        members[f"{part}_{kind}"].append(param)
    return [
        {"params": members[name], "name": name, "lr": lr * scale, "lr_scale": scale,
         "frozen_until": frozen, "weight_decay": wd}
        for name, (scale, frozen, wd) in spec.items()
        if members[name]
    ]


def build_optimizer(
    student: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    backbone_lr_scale: float = 0.01,
    backbone_frozen_until: int = 0,
    gate_weight_decay: float | None = None,
    threshold_lr_scale: float = 1.0,
    fused: bool = False,
) -> torch.optim.AdamW:
    """torch AdamW over param_groups(student, ...): the default foreach implementation, or the fused one
    (which can skip a step on the device, given a `found_inf` flag)."""
    groups = param_groups(
        student, lr, weight_decay, backbone_lr_scale, backbone_frozen_until, gate_weight_decay, threshold_lr_scale
    )
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=True if fused else None)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up from 0 to base_lr over warmup_steps, then cosine to min_lr at total_steps."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        finite = math.isfinite(self.base_lr) and math.isfinite(self.min_lr)
        if not finite or not 0 <= self.min_lr <= self.base_lr:
            raise ValueError(f"need 0 <= min_lr <= base_lr, got min_lr={self.min_lr}, base_lr={self.base_lr}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                f"got total_steps={self.total_steps}, warmup_steps={self.warmup_steps}"
            )


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """LR at `step`: base_lr * step / warmup_steps while warming up, then cosine to min_lr at total_steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def group_lr(step: int, schedule: LRSchedule, lr_scale: float = 1.0, frozen_until: int = 0) -> float:
    """One group's LR: 0 while frozen, then the common schedule times lr_scale.

    As DynamicViT's code (`fix_step`): the backbone joins the gates' warm-up + cosine where it stands when
    it unfreezes (at 0.01 x the peak after the 5 warm-up epochs), with no warm-up of its own.
    """
    if step < frozen_until:
        return 0.0
    return lr_scale * lr_at(step, schedule.base_lr, schedule.warmup_steps, schedule.total_steps, schedule.min_lr)


def apply_lr(param_groups: list[dict], step: int, schedule: LRSchedule) -> dict[str, float]:
    """Write each group's LR for `step` into the optimizer's param groups; return {group name: lr} for logging.

    Pass `backend.param_groups` (or `optimizer.param_groups`): DeepSpeed and Accelerate expose the
    wrapped optimizer's own group dicts, so writing group["lr"] reaches the optimizer that steps.
    """
    written: dict[str, float] = {}
    for index, group in enumerate(param_groups):
        lr = group_lr(step, schedule, group.get("lr_scale", 1.0), group.get("frozen_until", 0))
        group["lr"] = lr
        written[group.get("name", f"group{index}")] = lr
    return written
