"""Graceful stop on SIGTERM or SIGUSR1 (preemption, a SLURM time limit with --signal, Ctrl-C-free shutdowns).

A signal only sets a flag. At the next step boundary the rank that saw it posts a stop step through the
process group's key-value store (first writer wins: `compare_set`), and every rank reads the store at
every boundary: a TCP round trip to the store, no device collective and no tensor read. All ranks then
stop after the same step, save a complete checkpoint and exit with EXIT_PREEMPTED, so a requeued or
restarted job resumes from it exactly.

Why the posted step is the *next* boundary: a rank can be at most one step behind the one that posts
(each step's gradient collectives need every rank), so every rank is still before that boundary.
"""

from __future__ import annotations

import os
import signal
import sys

from trainer.infra import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run the same command again


class GracefulStop:
    """Install with `GracefulStop.install()` in the main thread; ask `agreed(step)` at every step boundary."""

    def __init__(self) -> None:
        self.signal_name = ""
        self._posted = False
        self._key = f"prunevit/stop/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    @classmethod
    def install(cls) -> GracefulStop:
        stop = cls()
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop._on_signal)
        return stop

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.signal_name:
            self.signal_name = signal.Signals(signum).name
            # os.write, not print: a handler that prints while the main thread prints raises "reentrant call".
            os.write(1, f"rank {dist.rank()}: {self.signal_name} received: stopping at the next step boundary "
                        f"with a checkpoint\n".encode())

    def agreed(self, step: int) -> bool:
        """True on every rank at the same step once any rank got a stop signal (step: steps done so far)."""
        if not dist.is_dist():
            return bool(self.signal_name)
        store = _store()
        if self.signal_name and not self._posted:
            store.compare_set(self._key, "", str(step + 1))
            self._posted = True
        if not store.check([self._key]):
            return False
        stop_at = int(store.get(self._key).decode())
        if stop_at <= step and not self.signal_name:
            self.signal_name = "a stop signal on another rank"
        return stop_at <= step


def exit_preempted() -> None:
    """Exit with EXIT_PREEMPTED, ignoring stop signals from here on.

    Why ignore them: a second signal is common (SLURM signals every process of a task, pkill reaches every
    rank of nodes that share a host, users press twice), and while the handler is a Python function it
    would kill the rank late in its exit: interpreter finalization resets Python-handled signals to their
    default action (terminate), and the launcher would report the signal instead of 75. Ignored signals
    stay ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(EXIT_PREEMPTED)


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()
