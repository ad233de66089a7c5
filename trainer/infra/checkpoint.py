"""The training checkpoint on disk: the one module that writes, finds, verifies and reads it.

Layout: `<run>/checkpoints/step_00000100/` holds the backend's files (DeepSpeed shards or an
Accelerate state), `ema_rank<r>.safetensors` when the run keeps an EMA (trainer.infra.ema),
`trainer_state_rank<r>.json` (step, data position, counters) from every rank, and
`COMPLETE` ({"step", "world_size"}), written by rank 0 last, after every rank reported its files
written, with fsync and rename. `<run>/checkpoints/latest` names the newest complete one. A directory
without the marker is never loaded.

A failed write (full disk, unwritable directory) on any rank fails the save on every rank, each with
a message naming the checkpoint, in bounded time: ranks agree on each phase through the process
group's key-value store with a timeout (`store_sync.RankSync`, a barrier that carries errors), and a
watchdog ends a rank that is stuck in a backend collective its failed peer will never join. The
previous complete checkpoint is never touched by a failed save.

Reading is untrusted input. What the libraries do (DeepSpeed 0.19, Accelerate 1.15, checked in their source):
- DeepSpeed loads every checkpoint file with `torch.load(weights_only=False)`: its checkpoint engine
  (model states and ZeRO optimizer shards, every rank), the ZeRO-3 and universal-checkpoint paths, and
  `zero_to_fp32` (our export/evaluate). A planted object would run code on every rank at resume.
- Accelerate's `load_state` reads weights from safetensors and optimizer/scaler/RNG files through its
  own `load()`: `weights_only=True` plus numpy types for `random_states_<r>.pkl` (a failure there is
  only logged). Objects registered with `register_for_checkpointing` (`custom_checkpoint_<i>.pkl`) are
  loaded with weights_only=False; we register none, so a planted one makes load_state fail, unread.
So backends pass the directory through `verify_checkpoint_dir` before their library reads it: every
torch-format file must load with weights_only=True, allowing only the backend's known data-only classes
(`safe_globals`, e.g. DeepSpeed's loss scaler); otherwise the resume, export or evaluate stops with a
message naming the file and `ckpt.allow_pickle`. Limits: a file swapped between the check and the
library's load is not caught (that needs write access to the run directory during the run), and with
`ckpt.allow_pickle=true` nothing is checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from model.weights import UnsafeCheckpointError, safe_torch_load
from trainer.infra import dist, faults
from trainer.infra.store_sync import RankSync

if TYPE_CHECKING:
    import torch

    from trainer.infra.backends.base import Backend
    from trainer.infra.ema import WeightEMA

MARKER = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state_rank{rank}.json"
# Files the libraries read with torch.load; .json, .safetensors and our markers never need pickle.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
SAVE_TIMEOUT_S = 1800.0
"""Longest a rank waits for the others in one phase of a save (the process group's default timeout)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written on some rank; the previous complete one is untouched."""


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


def save_checkpoint(backend: Backend, root: str, step: int, trainer_state: dict[str, Any], keep: int,
                    timeout_s: float = SAVE_TIMEOUT_S, ema: WeightEMA | None = None) -> str:
    """All ranks: write the backend state, this rank's EMA shard and trainer state, then rank 0 seals it.

    Raises CheckpointError on every rank when any rank fails; older checkpoints are deleted only after
    the new one is complete.
    """
    path = os.path.join(root, tag_for(step))
    me = dist.rank()
    sync = RankSync(f"prunevit/ckpt/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{step}",
                    f"checkpoint {path}", timeout_s) if dist.is_dist() else None

    def clear() -> None:
        if me == 0 and os.path.isdir(path):
            shutil.rmtree(path)  # a torn leftover of an earlier attempt at this step

    def write() -> None:
        os.makedirs(path, exist_ok=True)
        faults.hit("ckpt_before_model", step, path)
        backend.save(path)
        if ema is not None:
            ema.save(path)
        faults.hit("ckpt_between_ranks", step, path)
        _atomic_write(os.path.join(path, STATE_FILE.format(rank=me)), json.dumps(trainer_state))

    def seal() -> None:
        if me != 0:
            return
        faults.hit("ckpt_before_marker", step, path)
        _atomic_write(os.path.join(path, MARKER), json.dumps({"step": step, "world_size": dist.world_size()}))
        _atomic_write(os.path.join(root, LATEST), tag_for(step))
        # Older checkpoints go only now that a newer one is complete.
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    _phase(sync, "clear", clear, root, path)
    _phase(sync, "write", write, root, path)  # every rank's files are on disk before the marker says so
    _phase(sync, "seal", seal, root, path)
    return path


def _phase(sync: RankSync | None, name: str, work: Callable[[], None], root: str, path: str) -> None:
    """Run one phase of a save on this rank, then agree with the other ranks; any failure fails all."""
    error = ""
    try:
        if sync is not None and name == "write":
            with sync.watchdog(name):  # backend.save runs collectives a failed rank will never join
                work()
        else:
            work()
    except Exception as e:  # noqa: BLE001 - reported to every rank, then raised below
        # torch.save reports a full disk as an opaque RuntimeError: the free space says what happened.
        error = f"rank {dist.rank()}: writing checkpoint {path} failed: {type(e).__name__}: {e} ({_free_space(root)})"
        print(error, file=sys.stderr, flush=True)
    errors = sync.agree(name, error) if sync is not None else [error] if error else []
    if errors:
        previous = find_latest(root)
        raise CheckpointError(f"rank {dist.rank()}: checkpoint {path} not saved: " + "; ".join(errors)
                              + f". It is incomplete and will be ignored; the previous complete checkpoint "
                              f"({previous or 'none'}) is untouched")


def _free_space(path: str) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 1e9:.1f} GB free there"
    except OSError as e:
        return f"free space unknown: {e}"


def load_trainer_state(path: str, rank: int) -> dict[str, Any]:
    """This rank's trainer state from a complete checkpoint."""
    with open(os.path.join(path, STATE_FILE.format(rank=rank))) as f:
        return json.load(f)


def checkpoint_world_size(path: str) -> int:
    """World size that wrote the checkpoint (from the marker)."""
    with open(os.path.join(path, MARKER)) as f:
        return int(json.load(f)["world_size"])


def resolve_checkpoint(path: str) -> str:
    """A complete checkpoint directory from a run dir, a checkpoints dir, or a checkpoint itself."""
    for root in (path, os.path.join(path, "checkpoints")):
        if is_complete(root):
            return root
        latest = find_latest(root)
        if latest:
            return latest
    raise FileNotFoundError(f"{path}: no complete checkpoint (directory with a {MARKER} marker) found")


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


def consolidated_state_dict(checkpoint_dir: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """fp32 student weights (`vit.*` + `gates.*`), consolidated by the backend that wrote the checkpoint
    (its name is in the trainer state); a file that needs pickle is refused unless allow_pickle."""
    from trainer.infra.backends import backend_class

    backend = load_trainer_state(checkpoint_dir, 0).get("backend", "deepspeed")
    state = backend_class(backend).consolidated_weights(checkpoint_dir, allow_pickle)
    return {k: v.detach().float().contiguous() for k, v in state.items()}


__all__ = ["MARKER", "LATEST", "CheckpointError", "UnsafeCheckpointError", "save_checkpoint", "find_latest",
           "complete_checkpoints", "incomplete_checkpoints", "is_complete", "load_trainer_state",
           "checkpoint_world_size", "resolve_checkpoint", "verify_checkpoint_dir", "consolidated_state_dict"]
