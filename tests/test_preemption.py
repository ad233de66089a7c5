"""A rank stopping on a signal exits 75 even when a second signal arrives while it exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from tests.launch import REPO

# A child that installs the stop handlers and exits as the trainer does, with a second SIGUSR1 sent to it
# 1 s later, while an object's __del__ holds its interpreter's finalization open for 3 s.
CHILD = textwrap.dedent("""
    import os, subprocess, sys, time
    from trainer.infra.preemption import GracefulStop, exit_preempted
    GracefulStop.install()

    class SlowFinalization:
        def __del__(self):
            time.sleep(3.0)

    keep_until_finalization = SlowFinalization()
    subprocess.Popen(["sh", "-c", f"sleep 1; kill -USR1 {os.getpid()}"])
    exit_preempted() if sys.argv[1] == "exit_preempted" else sys.exit(75)
""")


def _exit_code(how: str) -> int:
    return subprocess.run([sys.executable, "-c", CHILD, how], cwd=REPO, timeout=60).returncode


def test_a_second_stop_signal_during_the_exit_keeps_exit_code_75():
    assert _exit_code("exit_preempted") == 75


def test_negative_control_a_plain_exit_is_killed_by_the_second_signal():
    """Interpreter finalization resets Python-handled signals to their default action (terminate)."""
    assert _exit_code("sys.exit") == -signal.SIGUSR1
