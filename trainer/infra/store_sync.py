"""Agreement between ranks over the process group's key-value store, bounded by a timeout.

A barrier can neither carry a failed rank's message nor give up: these do both, and the waiting happens
in the store, not in a device collective (no GPU sync). The checkpoint save agrees on each of its
phases this way.
"""

from __future__ import annotations

import os
import sys
import threading
from datetime import timedelta

from trainer.infra import dist


class RankSync:
    """Per-phase agreement over the process group's key-value store, bounded by a timeout.

    A store key per (phase, rank) holds "" (done) or an error message; every rank waits for all keys.
    Unlike a barrier it carries the failed rank's message to all ranks and cannot hang forever.
    """

    def __init__(self, prefix: str, subject: str, timeout_s: float):
        """prefix: store keys of this agreement (unique per use); subject: what it is about, for messages."""
        from torch.distributed import distributed_c10d

        self.store = distributed_c10d._get_default_store()
        self.prefix, self.subject, self.timeout_s = prefix, subject, timeout_s
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
                f"rank {self.rank}: {self.subject}: ranks {missing or '?'} did not report within "
                f"{self.timeout_s:.0f} s ({type(e).__name__}: {e})"]
        return [msg for k in keys if (msg := self.store.get(k).decode())]

    def _check(self, key: str) -> bool:
        try:
            return bool(self.store.check([key]))
        except Exception:  # noqa: BLE001
            return False

    def watchdog(self, phase: str) -> Watchdog:
        return Watchdog(self, phase)


class Watchdog:
    """While this rank works on a phase: if another rank reports a failure of that phase (or the phase
    outlasts the timeout), report and end this process, which may be blocked in a collective."""

    GRACE_S = 2.0  # lets a rank that is merely slower finish and report through `agree` instead

    def __init__(self, sync: RankSync, phase: str):
        self.sync, self.phase = sync, phase
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ckpt-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
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
                msg = f"rank {s.rank}: {s.subject} abandoned during {self.phase} ({why})"
                print(msg, file=sys.stderr, flush=True)  # before the post: the failed rank exits on it
                s.store.set(s._key(self.phase, s.rank), msg)
                os._exit(1)


class StoreAnyRank:
    """`any_rank(flag)` through the store: True on every rank if any rank passed True. A TCP round trip to
    the store and no device collective, so no tensor is read and a GPU's queue is never drained (the data
    loader's skip-rate agreement runs every few batches). All ranks must call it equally often."""

    def __init__(self, name: str, timeout_s: float = 1800.0):
        self.name, self.timeout_s, self.calls = name, timeout_s, 0
        self.prefix = f"prunevit/{name}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def __call__(self, flag: bool) -> bool:
        if not dist.is_dist():
            return flag
        self.calls += 1
        sync = RankSync(f"{self.prefix}/{self.calls}", self.name, self.timeout_s)
        # A timeout also comes back as a message: a rank that is gone stops the others too.
        flagged = bool(sync.agree("flag", "1" if flag else ""))
        if self.calls > 2:  # every rank has read call n-2's keys before posting call n-1's: drop ours
            sync.store.delete_key(RankSync(f"{self.prefix}/{self.calls - 2}", "", 0)._key("flag", sync.rank))
        return flagged
