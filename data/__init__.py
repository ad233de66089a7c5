"""WebDataset data layer: shard conversion, the resumable train stream, exact eval, demo data.

Knows nothing about distribution libraries: ranks and world size are plain arguments.

Names are imported lazily (PEP 562): `import data.info` (what config validation needs) must not pull in
torch and timm, or rejecting a bad config would take seconds of imports instead of milliseconds.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AugmentConfig": "data.augment_config", "DeviceAugment": "data.transforms", "eval_transform": "data.transforms",
    "train_transform": "data.transforms", "DataQualityError": "data.loader", "EvalLoader": "data.loader",
    "TrainLoader": "data.loader", "skip_summary": "data.loader", "SKIP_KINDS": "data.samples",
    "Shard": "data.info", "SplitShards": "data.info", "load_info": "data.info", "resolve_split": "data.info",
    "StreamPlan": "data.stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
