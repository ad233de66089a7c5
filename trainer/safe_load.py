"""Refuse training checkpoints whose files need pickle, before DeepSpeed or Accelerate unpickle them.

DeepSpeed loads every file of a checkpoint with `torch.load(weights_only=False)` (its checkpoint
engine, ZeRO-3 and `zero_to_fp32` alike), so a planted file would run code on every rank at resume,
export or evaluate. Accelerate loads with weights_only=True (plus numpy types for its RNG file), but
custom objects registered with `save_state` would be unpickled. Each backend therefore passes its own
checkpoint directory through `verify_checkpoint_dir` first: every torch-format file must load with
weights_only=True, allowing only the backend's known data-only classes (`safe_globals`); otherwise the
resume stops with a message naming the file and `ckpt.allow_pickle`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from model.checkpoint import UnsafeCheckpointError, safe_torch_load

# Files the libraries read with torch.load; .json, .safetensors and our markers never need pickle.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")

__all__ = ["TORCH_SUFFIXES", "UnsafeCheckpointError", "torch_files", "verify_checkpoint_dir"]


def torch_files(directory: str) -> list[str]:
    """Every torch-format file under `directory` (recursively), sorted."""
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.join(root, n) for n in names if n.endswith(TORCH_SUFFIXES)]
    return sorted(found)


def verify_checkpoint_dir(directory: str, safe_globals: Iterable[type] = (), allow_pickle: bool = False) -> int:
    """Raise UnsafeCheckpointError (naming the file and ckpt.allow_pickle) for the first file that needs
    pickle beyond `safe_globals`; returns the number of files checked. A no-op with allow_pickle."""
    if allow_pickle:
        return 0
    files = torch_files(directory)
    allowed = list(safe_globals)
    for path in files:
        # Memory-mapped weights_only load: tensors are mapped, not read, so this costs little even for
        # the optimizer shards of a large model.
        safe_torch_load(path, allow_pickle=False, safe_globals=allowed)
    return len(files)
