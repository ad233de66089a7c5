"""WebDataset data layer: shard conversion, the resumable train stream, exact eval, demo data.

Knows nothing about distribution libraries: ranks and world size are plain arguments.
"""

from data.info import Shard, SplitShards, load_info, resolve_split
from data.loader import DataQualityError, EvalLoader, TrainLoader, skip_summary
from data.samples import SKIP_KINDS
from data.stream import StreamPlan
from data.transforms import AugmentConfig, DeviceAugment, eval_transform, train_transform

__all__ = [
    "AugmentConfig", "DataQualityError", "DeviceAugment", "EvalLoader", "SKIP_KINDS", "Shard", "SplitShards",
    "StreamPlan", "TrainLoader", "eval_transform", "load_info", "resolve_split", "skip_summary",
    "train_transform",
]
