"""Token-pruned Vision Transformers on top of timm: students with gates, the teacher, the GMACs counter.

    student = create_student("deit_small_patch16_224", gate="dynamicvit", keep_ratio=0.7)
    out = student.train()(images)      # StudentOutput: logits, tokens, keep_masks, gmacs, keep_ratios
    logits = student.eval()(images)    # dropped tokens gathered away; see student.last_keep_counts
    teacher = create_teacher("deit_small_patch16_224", checkpoint="dense.pth")
    gmacs = count_flops(student, 224)  # analytic GMACs, as in the DynamicViT / AS-ViT tables

Imports nothing distributed (no deepspeed, accelerate or torch.distributed) and nothing from trainer/:
backends wrap these modules from outside. `python -m model.bench {inference,train-step}` times dense vs
pruned.

Names are imported lazily (PEP 562), as in `data`: `model.gate_types` (what config validation needs)
must not pull in torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TINY_ARCH": "model.backbone", "TINY_VIT_KWARGS": "model.backbone", "count_flops": "model.flops",
    "default_locations": "model.gates", "GATE_TYPES": "model.gate_types", "GateType": "model.gate_types",
    "PrunedViT": "model.student", "StudentOutput": "model.student", "create_student": "model.student",
    "Teacher": "model.teacher", "TeacherOutput": "model.teacher", "create_teacher": "model.teacher",
    "load_weights": "model.weights", "read_weights": "model.weights", "check_weights": "model.weights",
    "UnsafeCheckpointError": "model.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
