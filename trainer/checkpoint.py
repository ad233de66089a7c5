"""Checkpoints that count only when complete: backend files, per-rank trainer state, then a marker.

Layout: `<run>/checkpoints/step_00000100/` holds the backend's files (DeepSpeed shards or an
Accelerate state), `trainer_state_rank<r>.json` (step, data position, counters) from every rank, and
`COMPLETE`, written by rank 0 last, after every rank reported its files written, with fsync and rename.
`<run>/checkpoints/latest` names the newest complete one. A directory without the marker is never loaded.

A failed write (full disk, unwritable directory) on any rank fails the save on every rank, each with
a message naming the checkpoint, in bounded time: ranks agree on each phase through the process
group's key-value store with a timeout (a barrier that carries errors), and a watchdog ends a rank
that is stuck in a backend collective its failed peer will never join. The previous complete
checkpoint is never touched by a failed save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from trainer import dist, faults
from trainer.backends.base import Backend

MARKER = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")
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
                    timeout_s: float = SAVE_TIMEOUT_S) -> str:
    """All ranks: write the backend state and this rank's trainer state, then rank 0 seals it.

    Raises CheckpointError on every rank when any rank fails; older checkpoints are deleted only after
    the new one is complete.
    """
    path = os.path.join(root, tag_for(step))
    me = dist.rank()
    sync = _RankSync(f"prunevit/ckpt/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{step}", path,
                     timeout_s) if dist.is_dist() else None

    def clear() -> None:
        if me == 0 and os.path.isdir(path):
            shutil.rmtree(path)  # a torn leftover of an earlier attempt at this step

    def write() -> None:
        os.makedirs(path, exist_ok=True)
        faults.hit("ckpt_before_model", step, path)
        backend.save(path)
        faults.hit("ckpt_between_ranks", step, path)
        _atomic_write(os.path.join(path, f"trainer_state_rank{me}.json"), json.dumps(trainer_state))

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


def _phase(sync: _RankSync | None, name: str, work: Callable[[], None], root: str, path: str) -> None:
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


class _RankSync:
    """Per-phase agreement over the process group's key-value store, bounded by a timeout.

    A store key per (phase, rank) holds "" (done) or an error message; every rank waits for all keys.
    Unlike a barrier it carries the failed rank's message to all ranks and cannot hang forever.
    """

    def __init__(self, prefix: str, path: str, timeout_s: float):
        from torch.distributed import distributed_c10d

        self.store = distributed_c10d._get_default_store()
        self.prefix, self.path, self.timeout_s = prefix, path, timeout_s
        self.rank, self.world = dist.rank(), dist.world_size()

    def _key(self, phase: str, rank: int) -> str:
        return f"{self.prefix}/{phase}/{rank}"

    def agree(self, phase: str, error: str) -> list[str]:
        """Post this rank's outcome, wait for every rank's; returns the error messages (empty: all fine)."""
        self.store.set(self._key(phase, self.rank), error)
        keys = [self._key(phase, r) for r in range(self.world)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except Exception as e:  # noqa: BLE001 - a timeout or a store whose host rank is gone
            missing = [r for r, k in enumerate(keys) if not self._check(k)]
            return ([error] if error else []) + [
                f"rank {self.rank}: checkpoint {self.path}: ranks {missing or '?'} did not report within "
                f"{self.timeout_s:.0f} s ({type(e).__name__}: {e})"]
        return [msg for k in keys if (msg := self.store.get(k).decode())]

    def _check(self, key: str) -> bool:
        try:
            return bool(self.store.check([key]))
        except Exception:  # noqa: BLE001
            return False

    def watchdog(self, phase: str) -> _Watchdog:
        return _Watchdog(self, phase)


class _Watchdog:
    """While this rank works on a phase: if another rank reports a failure of that phase (or the phase
    outlasts the timeout), report and end this process, which may be blocked in a collective."""

    GRACE_S = 2.0  # lets a rank that is merely slower finish and report through `agree` instead

    def __init__(self, sync: _RankSync, phase: str):
        self.sync, self.phase = sync, phase
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ckpt-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _peer_error(self) -> str:
        s = self.sync
        for r in range(s.world):
            key = s._key(self.phase, r)
            if r != s.rank and s._check(key) and (msg := s.store.get(key).decode()):
                return msg
        return ""

    def _run(self) -> None:
        s, waited = self.sync, 0.0
        while not self.done.wait(0.2):
            waited += 0.2
            peer = self._peer_error()
            if peer and self.done.wait(self.GRACE_S):
                return
            if peer or waited > s.timeout_s:
                why = peer or f"not done after {s.timeout_s:.0f} s"
                msg = f"rank {s.rank}: checkpoint {s.path} abandoned while writing it ({why})"
                print(msg, file=sys.stderr, flush=True)  # before the post: the failed rank exits on it
                s.store.set(s._key(self.phase, s.rank), msg)
                os._exit(1)


def load_trainer_state(path: str, rank: int) -> dict[str, Any]:
    """This rank's trainer state from a complete checkpoint."""
    with open(os.path.join(path, f"trainer_state_rank{rank}.json")) as f:
        return json.load(f)


def checkpoint_world_size(path: str) -> int:
    """World size that wrote the checkpoint (from the marker)."""
    with open(os.path.join(path, MARKER)) as f:
        return int(json.load(f)["world_size"])
