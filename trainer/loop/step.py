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
    """What the backend did with a step: grad norm (None if it computed none) and whether it skipped the
    update; `poisoned` says why the trainer made the gradients non-finite on purpose ("" if it did not)."""

    grad_norm: float | None
    skipped: bool
    poisoned: str


def train_step(run: Run, batches: Iterator[dict], step: int, window: MetricsWindow,
               keys_log: KeyLog | None = None) -> StepResult:
    """Optimizer step `step` (0-based): every micro-batch's forward and backward, then the backend's step.

    A non-finite loss on any rank drops the whole optimizer step on every rank: backward of a NaN-scaled
    loss makes every gradient non-finite, and the backend skips such a step with the window's earlier
    micro-batches (backward and step still run, so every rank issues the same collectives and DeepSpeed's
    micro-step count stays aligned).
    """
    cfg, backend = run.cfg, run.backend
    poisoned, update = "", {}
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
            finite = not dist.any_rank(not bool(torch.isfinite(loss.detach()).item()))
            if not finite and not poisoned:
                poisoned = (f"non-finite loss on some rank (micro-batch {micro}; this rank's terms "
                            f"{ {k: round(float(v.detach()), 4) for k, v in terms.items()} })")
            backend.backward(loss * float("nan") if poisoned else loss)
            update = backend.step()  # {} before the accumulation boundary: the last micro-batch's counts
        if finite:
            window.add_micro_batch(terms, out)
    return StepResult(update.get("grad_norm"), bool(update.get("skipped")), poisoned)


class BadSteps:
    """Counts steps whose update was skipped for non-finite values, and stops the run when too many come in
    a row (train.max_bad_steps). An update that went through with non-finite gradients stops it at once."""

    def __init__(self, max_in_a_row: int, fp16: bool, total: int = 0, skipped_total: int = 0):
        self.max_in_a_row, self.fp16 = max_in_a_row, fp16
        self.in_a_row, self.total, self.skipped_total = 0, total, skipped_total
        self.last_reason = ""

    def record(self, step: int, result: StepResult, backend_name: str) -> None:
        """Account for step `step` (1-based)."""
        norm = result.grad_norm
        nonfinite_norm = norm is not None and not math.isfinite(norm)
        if not result.skipped and (result.poisoned or nonfinite_norm):
            raise TrainingError(f"step {step}: the {backend_name} backend applied an update with non-finite "
                                f"gradients ({result.poisoned or f'grad norm {norm}'}); the weights are no longer "
                                f"trustworthy: resume from the last checkpoint")
        self.skipped_total += result.skipped
        # fp16: a skipped step is the loss scaler backing off from an overflow, which is routine.
        bad = bool(result.poisoned) or (result.skipped and not self.fp16)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.total += bad
        if bad:
            self.last_reason = result.poisoned or f"non-finite gradients (grad norm {norm})"
            dist.print0(f"step {step}: {self.last_reason}; update skipped on every rank ({self.in_a_row} in a row, "
                        f"{self.total} in total)")

    @property
    def exhausted(self) -> bool:
        """True once train.max_bad_steps steps in a row were bad: the run must stop (after logging)."""
        return self.in_a_row >= self.max_in_a_row

    def stop(self, step: int) -> TrainingError:
        """The error that ends an exhausted run."""
        return TrainingError(f"stopping at step {step}: {self.in_a_row} consecutive non-finite steps "
                             f"(train.max_bad_steps={self.max_in_a_row}), all skipped; last: {self.last_reason}")
