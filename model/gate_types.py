"""The gate types, in a module without torch: config validation imports it to reject a bad name fast."""

from __future__ import annotations

from typing import Literal, get_args

GateType = Literal["dynamicvit", "asvit", "none"]
"""`dynamicvit`: DynamicViT's MLP predictor; `asvit`: AS-ViT's CLS-attention thresholds; `none`: dense."""
GATE_TYPES: tuple[str, ...] = get_args(GateType)
