"""The gate types and masked-attention choices, in a module without torch: config validation imports it to
reject a bad name fast."""

from __future__ import annotations

from typing import Literal, get_args

GateType = Literal["dynamicvit", "asvit", "none"]
"""`dynamicvit`: DynamicViT's MLP predictor; `asvit`: AS-ViT's CLS-attention thresholds; `none`: dense."""
GATE_TYPES: tuple[str, ...] = get_args(GateType)

AttentionImpl = Literal["bias", "fold", "flex", "chunked", "reference"]
"""Key-masked attention of training (model/attention.py): `bias` (additive log-mask through SDPA), `fold`
(log-mask in extra q/k channels: maskless SDPA), `flex` (FlexAttention, CUDA only), `chunked` (fp32 score
tiles, bounded memory; what fp16 runs), `reference` (DynamicViT's explicit fp32 N x N softmax)."""
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)
