"""Debug fault injection for the reliability tests (tests/test_reliability_*.py). Off unless set.

    PRUNEVIT_FAULT=<point>:<step>[:<rank>[:<action>]][,<point>:<step>...]

`step` is the 1-based optimizer step, as in metrics.jsonl and `step_N` checkpoint names; `rank` is a
global rank or `*` (every rank, the default). Points:

    after_step          end of step N, after its log line, checkpoint and eval
    ckpt_before_model   saving checkpoint N: directory made, before the backend writes model/optimizer files
    ckpt_between_ranks  saving checkpoint N: backend files written, before this rank's trainer state
    ckpt_before_marker  saving checkpoint N: every rank's files written, before rank 0 writes COMPLETE
    nan_loss            step N's loss (its last micro-batch) is NaN on the rank(s)
    inf_grad            step N's gradients (its last micro-batch) are inf on the rank(s); the loss stays finite

Actions (the first four points): `kill` (SIGKILL, the default), `pause` (sleep until killed from
outside: a test then kills the whole job), `hold` (sleep until a signal arrives, then go on: a test sends
SIGTERM or SIGUSR1 at a known step), `enospc` (raise OSError ENOSPC, a full disk), `fsize`
(RLIMIT_FSIZE=0: every later file write of this process fails in the kernel with EFBIG, wherever it
happens, e.g. inside DeepSpeed's torch.save).

    PRUNEVIT_DEBUG_RESUME=forget_data|forget_rng

Negative controls for the exact-resume test: resume without restoring the data position, or with the
per-step RNG restarted from the seed as if never saved. Both must make that test fail.

While PRUNEVIT_FAULT is set the trainer also logs `debug/param_sum/rank<r>` every log step (see
`param_sums_by_rank`), so tests can see that a skipped step left the parameters untouched.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import time
from dataclasses import dataclass

import torch

ENV = "PRUNEVIT_FAULT"
RESUME_ENV = "PRUNEVIT_DEBUG_RESUME"
POINTS = ("after_step", "ckpt_before_model", "ckpt_between_ranks", "ckpt_before_marker", "nan_loss", "inf_grad")
ACTIONS = ("kill", "pause", "hold", "enospc", "fsize")


@dataclass(frozen=True)
class Fault:
    point: str
    step: int
    rank: int | None  # None: every rank
    action: str = "kill"


def parse(spec: str) -> list[Fault]:
    """`point:step[:rank[:action]]`, comma-separated; raises ValueError on anything else."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if not 2 <= len(parts) <= 4 or parts[0] not in POINTS:
            raise ValueError(f"{ENV}: bad entry {item!r}; expected <point>:<step>[:<rank>[:<action>]], "
                             f"points {POINTS}")
        rank = None if len(parts) < 3 or parts[2] in ("", "*") else int(parts[2])
        action = parts[3] if len(parts) == 4 else "kill"
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: bad action {action!r} in {item!r}; one of {ACTIONS}")
        faults.append(Fault(parts[0], int(parts[1]), rank, action))
    return faults


_FAULTS = parse(os.environ.get(ENV, ""))


def active() -> bool:
    """True when any fault is configured (turns on the debug parameter fingerprint)."""
    return bool(_FAULTS)


def _rank() -> int:
    from trainer.infra import dist

    return dist.rank()


def armed(point: str, step: int) -> Fault | None:
    """The fault configured for this point, step and rank, if any."""
    me = _rank()
    for f in _FAULTS:
        if f.point == point and f.step == step and f.rank in (None, me):
            return f
    return None


def hit(point: str, step: int, path: str = "") -> None:
    """Fire the fault configured here, if any: kill, pause, or make writes fail."""
    f = armed(point, step)
    if f is None:
        return
    print(f"[fault] rank {_rank()}: {f.action} at {point} step {step}", flush=True)
    if f.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif f.action == "pause":
        while True:  # the test kills the whole job from outside
            time.sleep(3600)
    elif f.action == "hold":
        signal.pause()  # returns once a signal's handler has run (the graceful-stop handler, for one)
    elif f.action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
    elif f.action == "fsize":
        # Without SIGXFSZ ignored the kernel would kill us instead of failing the write.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward sends inf down the graph (every gradient becomes inf or nan)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def inject_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """The loss with this rank's nan_loss / inf_grad fault of `step` applied (unchanged when none)."""
    if armed("nan_loss", step):
        loss = loss * float("nan")
    if armed("inf_grad", step):
        loss = _InfGrad.apply(loss)
    return loss


def forget(what: str) -> bool:
    """Negative-control switch: resume without restoring `data` or `rng` (PRUNEVIT_DEBUG_RESUME)."""
    return os.environ.get(RESUME_ENV, "") == f"forget_{what}"


def param_checksum(module: torch.nn.Module) -> float:
    """fp64 sum of |p| over the parameters this rank holds (replicas must agree; ZeRO-3 holds shards)."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


def param_sums_by_rank(backend) -> dict[str, float]:
    """Every rank's full-parameter `param_checksum` (fault-injection runs only): equal replicas, untouched skips."""
    from trainer.infra import dist

    rank, world = dist.rank(), dist.world_size()
    sums = torch.zeros(world, dtype=torch.float64)
    with backend.gathered_parameters():
        sums[rank] = param_checksum(backend.module)
    return {f"debug/param_sum/rank{r}": v for r, v in enumerate(dist.all_reduce(sums).tolist())}
