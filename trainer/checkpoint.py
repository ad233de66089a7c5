"""Checkpoints that count only when complete: backend files, per-rank trainer state, then a marker.

Layout: `<run>/checkpoints/step_00000100/` holds the backend's files (DeepSpeed shards or an
Accelerate state), `trainer_state_rank<r>.json` (step, data position, counters) from every rank, and
`COMPLETE`, written by rank 0 last, after a barrier, with fsync and rename. `<run>/checkpoints/latest`
names the newest complete one. A directory without the marker is never loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from trainer import dist
from trainer.backends.base import Backend

MARKER = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def tag_for(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:08d}"


def is_complete(path: str) -> bool:
    """True when the completion marker exists."""
    return os.path.isfile(os.path.join(path, MARKER))


def complete_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _TAG.match(name)))
    return [os.path.join(root, name) for _, name in tags if is_complete(os.path.join(root, name))]


def find_latest(root: str) -> str | None:
    """Newest complete checkpoint: the `latest` pointer if it names a complete one, else a scan."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if is_complete(path):
            return path
    found = complete_checkpoints(root)
    return found[-1] if found else None


def incomplete_checkpoints(root: str) -> list[str]:
    """Checkpoint directories without a marker (torn writes), for reporting."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root)
                  if _TAG.match(n) and not is_complete(os.path.join(root, n)))


def save_checkpoint(backend: Backend, root: str, step: int, trainer_state: dict[str, Any], keep: int) -> str:
    """All ranks: write the backend state and this rank's trainer state, then rank 0 seals it."""
    path = os.path.join(root, tag_for(step))
    if dist.rank() == 0 and os.path.isdir(path):
        shutil.rmtree(path)  # a torn leftover of an earlier attempt at this step
    dist.barrier()
    os.makedirs(path, exist_ok=True)
    backend.save(path)
    _atomic_write(os.path.join(path, f"trainer_state_rank{dist.rank()}.json"), json.dumps(trainer_state))
    dist.barrier()  # every rank's files are on disk before the marker says so
    if dist.rank() == 0:
        _atomic_write(os.path.join(path, MARKER), json.dumps({"step": step, "world_size": dist.world_size()}))
        _atomic_write(os.path.join(root, LATEST), tag_for(step))
        # Older checkpoints go only now that a newer one is complete.
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load_trainer_state(path: str, rank: int) -> dict[str, Any]:
    """This rank's trainer state from a complete checkpoint."""
    with open(os.path.join(path, f"trainer_state_rank{rank}.json")) as f:
        return json.load(f)


def checkpoint_world_size(path: str) -> int:
    """World size that wrote the checkpoint (from the marker)."""
    with open(os.path.join(path, MARKER)) as f:
        return int(json.load(f)["world_size"])
