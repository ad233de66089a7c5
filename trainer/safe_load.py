"""Refuse training checkpoints whose files need pickle, before DeepSpeed or Accelerate unpickle them.

What the libraries do (DeepSpeed 0.19, Accelerate 1.15, checked in their source):
- DeepSpeed loads every checkpoint file with `torch.load(weights_only=False)`: its checkpoint engine
  (model states and ZeRO optimizer shards, every rank), the ZeRO-3 and universal-checkpoint paths, and
  `zero_to_fp32` (our export/evaluate). A planted object would run code on every rank at resume.
- Accelerate's `load_state` reads weights from safetensors and optimizer/scaler/RNG files through its
  own `load()`: `weights_only=True` plus numpy types for `random_states_<r>.pkl` (a failure there is
  only logged). Objects registered with `register_for_checkpointing` (`custom_checkpoint_<i>.pkl`) are
  loaded with weights_only=False; we register none, so a planted one makes load_state fail, unread.

So each backend passes the checkpoint directory through `verify_checkpoint_dir` first: every
torch-format file must load with weights_only=True, allowing only the backend's known data-only classes
(`safe_globals`, e.g. DeepSpeed's loss scaler and fragment addresses); otherwise the resume, export or
evaluate stops with a message naming the file and `ckpt.allow_pickle`. Limits: a file swapped between
the check and the library's load is not caught (that needs write access to the run directory during the
run), and with `ckpt.allow_pickle=true` nothing is checked.
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
