"""One optimizer step: its micro-batches' forward, losses, backward and the backend's step, plus the
bookkeeping of steps whose loss or gradients were not finite."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trainer.infra import dist, faults
from trainer.loop.build import Run, TrainingError
from trainer.loop.losses import compute_losses
from trainer.loop.metrics import KeyLog
from trainer.loop.window import MetricsWindow


def seed_micro_batch(seed: int, step: int, index: int) -> None:
    """Model and mixup randomness as a pure function of (seed, step, global micro-batch index).

    Nothing to checkpoint, and index = rank x accum_steps + micro makes 2 ranks x 1 micro-batch draw
    exactly what 1 rank x 2 micro-batches draws.
    """
    s = random.Random(f"step:{seed}:{step}:{index}").getrandbits(63)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


@dataclass(frozen=True)
class StepResult:
    """What a step did, as the device and the backend know it: nothing here is read on the host until
    `BadSteps.settle` (log steps, checkpoints, the end).

    grad_norm: the update's gradient norm (a tensor, a float from DeepSpeed, or None if none was computed);
    skipped: whether the backend skipped the update (a bool, or a 0-d tensor from a device-side skip);
    nonfinite_loss: 0-d tensor, 1 if any of this rank's micro-batches had a non-finite loss.
    """

    grad_norm: torch.Tensor | float | None
    skipped: torch.Tensor | bool
    nonfinite_loss: torch.Tensor


def train_step(run: Run, batches: Iterator[dict], step: int, window: MetricsWindow,
               keys_log: KeyLog | None = None) -> StepResult:
    """Optimizer step `step` (0-based): every micro-batch's forward and backward, then the backend's step.

    A non-finite loss on any rank drops the whole optimizer step on every rank, decided on the device: the
    loss is multiplied by NaN where it is not finite, so this rank's gradients become non-finite, the
    gradient all-reduce carries that to every rank, and the backend's overflow check skips the step
    everywhere, with the window's earlier micro-batches. No tensor value is read on the host here
    (on a GPU each read would drain the queue); what happened is read at log steps (`BadSteps.settle`).
    """
    cfg, backend = run.cfg, run.backend
    update: dict = {}
    nonfinite = None
    for micro in range(cfg.optim.accum_steps):
        batch = window.timed_next(batches)
        # Seed after fetching: starting a DataLoader draws from the global generator itself.
        seed_micro_batch(cfg.train.seed, step - run.rng_base, dist.rank() * cfg.optim.accum_steps + micro)
        if keys_log is not None:
            keys_log.write(step + 1, batch["keys"])
        x, targets = run.device_aug.train(batch["image"], batch["label"])
        with backend.accumulate():
            with backend.autocast():
                out = backend.model(x.to(backend.input_dtype))
            teacher_out = None
            if run.teacher is not None:
                with torch.inference_mode():
                    teacher_out = run.teacher(x.to(run.teacher_dtype))
            terms = compute_losses(out, targets, teacher_out, run.loss_weights, cfg.prune.gate,
                                   run.student.target_keep_ratios, cfg.prune.flops_budget, run.dense_gmacs,
                                   cfg.prune.flops_loss)
            loss = terms["total"]
            if micro == cfg.optim.accum_steps - 1:
                loss = faults.inject_loss(loss, step + 1)
            finite = torch.isfinite(loss.detach())
            nonfinite = ~finite if nonfinite is None else nonfinite | ~finite
            backend.backward(loss * torch.where(finite, 1.0, float("nan")))
            update = backend.step()  # {} before the accumulation boundary: the last micro-batch's counts
        window.add_micro_batch(terms, out, finite)
    return StepResult(update.get("grad_norm"), update.get("skipped", False), nonfinite.float())


class BadSteps:
    """Counts steps whose update was skipped for non-finite values, and stops the run when too many come in
    a row (train.max_bad_steps). An update that went through with non-finite gradients stops it.

    Steps are recorded as the device left them and settled (read, agreed over ranks, judged in order) only
    at log steps, before a checkpoint and at the end, so a bad stretch is acted on at the next of those.
    """

    def __init__(self, max_in_a_row: int, fp16: bool, total: int = 0, skipped_total: int = 0):
        self.max_in_a_row, self.fp16 = max_in_a_row, fp16
        self.in_a_row, self.total, self.skipped_total = 0, total, skipped_total
        self.last_reason = ""
        self.pending: list[tuple[int, StepResult]] = []
        self.failure: TrainingError | None = None  # set by settle: the run must stop (after logging)

    def record(self, step: int, result: StepResult) -> None:
        """Keep step `step` (1-based) for the next `settle`; reads nothing."""
        self.pending.append((step, result))

    def settle(self, backend_name: str, device: torch.device) -> None:
        """Read the recorded steps in one go (a non-finite loss on any rank counts for all) and judge them in
        order; a step that must stop the run sets `failure` (raise it once the window is logged)."""
        if not self.pending or self.failure is not None:
            return
        flags = torch.stack([torch.stack([torch.as_tensor(r.skipped, dtype=torch.float32, device=device),
                                          r.nonfinite_loss.to(device),
                                          torch.as_tensor(_norm_is_finite(r.grad_norm), dtype=torch.float32,
                                                          device=device)])
                             for _, r in self.pending])
        flags[:, 1] = dist.all_reduce(flags[:, 1].contiguous(), "max")
        rows = flags.tolist()
        steps = [s for s, _ in self.pending]
        self.pending = []
        for step, (skipped, nonfinite_loss, norm_finite) in zip(steps, rows, strict=True):
            self.failure = self._judge(step, bool(skipped), bool(nonfinite_loss), bool(norm_finite), backend_name)
            if self.failure is not None:
                return

    def _judge(self, step: int, skipped: bool, nonfinite_loss: bool, norm_finite: bool,
               backend_name: str) -> TrainingError | None:
        reason = "non-finite loss on some rank" if nonfinite_loss else "non-finite gradients"
        if not skipped and (nonfinite_loss or not norm_finite):
            return TrainingError(f"step {step}: the {backend_name} backend applied an update with non-finite "
                                f"gradients ({reason}); the weights are no longer trustworthy: resume from the last "
                                f"checkpoint")
        self.skipped_total += skipped
        # fp16: a skipped step is the loss scaler backing off from an overflow, which is routine.
        bad = nonfinite_loss or (skipped and not self.fp16)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.total += bad
        if bad:
            self.last_reason = reason
            dist.print0(f"step {step}: {reason}; update skipped on every rank ({self.in_a_row} in a row, "
                        f"{self.total} in total)")
        return self.stop(step) if self.exhausted else None

    @property
    def exhausted(self) -> bool:
        """True once train.max_bad_steps steps in a row were bad: the run must stop."""
        return self.in_a_row >= self.max_in_a_row

    def stop(self, step: int) -> TrainingError:
        """The error that ends an exhausted run."""
        return TrainingError(f"stopping at step {step}: {self.in_a_row} consecutive non-finite steps "
                             f"(train.max_bad_steps={self.max_in_a_row}), all skipped; last: {self.last_reason}")


def _norm_is_finite(norm: torch.Tensor | float | None) -> torch.Tensor | bool:
    if norm is None:
        return True
    if isinstance(norm, torch.Tensor):
        return torch.isfinite(norm.detach().float())
    return math.isfinite(norm)
