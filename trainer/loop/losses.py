"""Training losses of the pruned student, returned as named terms plus their weighted `total`.

Terms (all fp32 scalars, whatever the dtype of the logits and tokens):

- ``ce``: soft-target cross-entropy on the (mixup/cutmix) targets; always present.
- ``ratio`` (DynamicViT): mean over stages s of (kept fraction at stage s - target_s)^2, the kept
  fraction taken per sample and the square averaged over the batch, as in DynamicViT's code; the
  targets rho^(s+1) come from the student (`PrunedViT.target_keep_ratios`).
- ``flops`` (AS-ViT): |mean_batch GMACs - f x dense GMACs| in GMACs, the official code's form
  (`prune.flops_loss: absolute`). Its push grows with the model: at weight 2 it is 4.6x a normalised
  term's at DeiT-S/224 and 55x at DeiT-B/384. `normalized` divides by the dense GMACs (scale-free:
  a weight of ~2 x dense GMACs pushes as hard as the official loss at weight 2).
- ``kd``: KL(teacher || student) on logits at temperature T, batchmean, times T^2.
- ``tok``: MSE between student and teacher final patch tokens over the tokens kept at the last gate.

Rule for terms that do not apply: they are **absent** from the dict, never zero-filled. A term is
present when the setup uses it and its weight is > 0 (weight 0 switches a term off): ratio with
DynamicViT gates, flops with AS-ViT gates, kd with a teacher, tok with a teacher and DynamicViT gates
(the AS-ViT recipe has no token distillation). That depends on the run's setup only, never on the
batch, so a run logs the same keys at every step.

Nothing here logs or prints: the loop logs what it gets back (timm `task` style).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from model.gate_types import GATE_TYPES

if TYPE_CHECKING:
    from model import StudentOutput, TeacherOutput
    from trainer.config import PruneConfig

_soft_ce = SoftTargetCrossEntropy()


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (ce is always 1) and the distillation temperature: the `prune.w_*` keys."""

    w_ratio: float = 2.0  # DynamicViT keep-ratio loss; the DeiT-B recipe uses 5
    w_flops: float = 2.0  # AS-ViT FLOPs-budget loss
    w_kd: float = 0.5  # logit distillation
    w_tok: float = 0.5  # DynamicViT token distillation (AS-ViT's recipe has none, so it is ignored there)
    kd_temperature: float = 1.0

    @classmethod
    def from_config(cls, prune: PruneConfig, distill: bool) -> LossWeights:
        """The config's weights; the distillation terms are off without a teacher."""
        return cls(w_ratio=prune.w_ratio, w_flops=prune.w_flops, w_kd=prune.w_kd if distill else 0.0,
                   w_tok=prune.w_tok if distill else 0.0, kd_temperature=prune.kd_temperature)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"loss weight {name!r} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"loss weight {name!r} must be >= 0, got {value}")
        if self.kd_temperature == 0:
            raise ValueError("loss weight 'kd_temperature' must be > 0, got 0")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def soft_target_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy in fp32; integer class labels [B] are accepted as one-hot targets."""
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.cross_entropy(_fp32(logits), targets.long())
    return _soft_ce(_fp32(logits), _fp32(targets))


def keep_ratio_loss(keep_masks: list[torch.Tensor], keep_targets: Sequence[float]) -> torch.Tensor:
    """DynamicViT's ratio loss: mean_s mean_b (mean_i keep_s[b, i] - target_s)^2 (targets rho^(s+1))."""
    if len(keep_targets) != len(keep_masks):
        raise ValueError(f"need one keep target per stage ({len(keep_masks)}), got {list(keep_targets)}")
    per_stage = []
    for keep, target in zip(keep_masks, keep_targets, strict=True):
        kept_fraction = _fp32(keep).mean(dim=1)  # per sample, so every image is pushed to the target
        per_stage.append(((kept_fraction - target) ** 2).mean())
    return torch.stack(per_stage).mean()


FLOPS_LOSS_FORMS = ("absolute", "normalized")


def flops_budget_loss(gmacs: torch.Tensor, flops_budget: float, dense_gmacs: float,
                      form: str = "absolute") -> torch.Tensor:
    """AS-ViT's budget loss: |mean_batch GMACs - f x dense GMACs| in GMACs (`absolute`, as the official
    DistillDiffPruningFLOPsLoss), or that divided by the dense GMACs (`normalized`)."""
    if form not in FLOPS_LOSS_FORMS:
        raise ValueError(f"flops loss form must be one of {FLOPS_LOSS_FORMS}, got {form!r}")
    gap = (_fp32(gmacs).mean() - flops_budget * dense_gmacs).abs()
    return gap if form == "absolute" else gap / dense_gmacs


def logit_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) on logits at temperature T, batchmean, scaled by T^2 (Hinton)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(_fp32(student_logits) / t, dim=-1),
        F.log_softmax(_fp32(teacher_logits) / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def token_kd_loss(
    student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """MSE over the tokens kept at the last gate: mean over kept tokens and channels; 0 if none kept."""
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(
            f"token distillation needs teacher tokens shaped like the student's: teacher "
            f"{tuple(teacher_tokens.shape)} vs student {tuple(student_tokens.shape)}; use a teacher of the "
            "same width and input size, or set the tok weight to 0"
        )
    # The mask only selects tokens, as DynamicViT's boolean indexing does: through a straight-through
    # mask the weighted mean would otherwise reward the gate for dropping tokens the student gets wrong.
    weight = _fp32(keep).detach()
    per_token = ((_fp32(student_tokens) - _fp32(teacher_tokens)) ** 2).mean(dim=-1)
    # The mask is {0, 1}, so any kept token makes the count >= 1; the clamp only guards "none kept".
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def compute_losses(
    out: StudentOutput,
    targets: torch.Tensor,
    teacher_out: TeacherOutput | None = None,
    weights: LossWeights | None = None,
    gate_type: str = "dynamicvit",
    keep_targets: Sequence[float] = (),
    flops_budget: float = 0.65,
    dense_gmacs: float | None = None,
    flops_loss: str = "absolute",
) -> dict[str, torch.Tensor]:
    """Named fp32 loss terms of a student training step and their weighted sum under key `total`.

    `teacher_out` is None when distillation is off; `weights` defaults to LossWeights().
    `keep_targets` are DynamicViT's per-stage targets (`PrunedViT.target_keep_ratios`).
    `dense_gmacs` is the dense model's GMACs per image at the training size (AS-ViT only; defaults to
    `out.dense_gmacs` when the output carries it); `flops_loss` is its form (see flops_budget_loss).
    """
    if gate_type not in GATE_TYPES:
        raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {gate_type!r}")
    if weights is None:
        weights = LossWeights()
    has_gates = gate_type != "none"
    if has_gates != bool(out.keep_masks):
        count = len(out.keep_masks)
        raise ValueError(f"gate_type {gate_type!r} but the student output has {count} keep mask(s)")
    distill = teacher_out is not None

    # term name -> weight; a term is computed only when it applies and its weight is > 0.
    active: dict[str, float] = {"ce": 1.0}
    if gate_type == "dynamicvit" and weights.w_ratio > 0:
        active["ratio"] = weights.w_ratio
    if gate_type == "asvit" and weights.w_flops > 0:
        active["flops"] = weights.w_flops
    if distill and weights.w_kd > 0:
        active["kd"] = weights.w_kd
    if distill and gate_type == "dynamicvit" and weights.w_tok > 0:
        active["tok"] = weights.w_tok

    # Autocast off: a loss called inside the backend's autocast region must still run in fp32.
    terms: dict[str, torch.Tensor] = {}
    with torch.autocast(device_type=out.logits.device.type, enabled=False):
        terms["ce"] = soft_target_ce(out.logits, targets)
        if "ratio" in active:
            for target in keep_targets:
                _check_fraction("keep target", target)
            terms["ratio"] = keep_ratio_loss(out.keep_masks, keep_targets)
        if "flops" in active:
            _check_fraction("flops_budget", flops_budget)
            dense = dense_gmacs if dense_gmacs is not None else getattr(out, "dense_gmacs", None)
            if not dense or not math.isfinite(dense) or dense <= 0:
                raise ValueError(f"AS-ViT's FLOPs loss needs the dense GMACs per image (> 0), got {dense!r}")
            terms["flops"] = flops_budget_loss(out.gmacs, flops_budget, dense, flops_loss)
        if "kd" in active:
            terms["kd"] = logit_kd_loss(out.logits, teacher_out.logits, weights.kd_temperature)
        if "tok" in active:
            terms["tok"] = token_kd_loss(out.tokens, teacher_out.tokens, out.keep_masks[-1])
        terms["total"] = sum(active[name] * value for name, value in terms.items())
    return terms


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
