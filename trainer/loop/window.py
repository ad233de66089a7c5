"""The logging window: sums of the loss terms, GMACs, keep ratios and grad norms since the last log step,
reduced over ranks into means when it is logged."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

import torch

from data import TrainLoader, skip_summary
from trainer.infra import dist


class MetricsWindow:
    """Sums over the micro-batches and updates of one log window; `reduce` averages them over ranks.

    Every rank adds the same keys (non-finite micro-batches are left out on all ranks alike), so the
    reduction lines up; `micro_batches` and `updates` are the divisors.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.micro_batches = 0
        self.updates = 0
        self.data_wait = 0.0
        self.start = time.time()

    def timed_next(self, batches: Iterator[dict]) -> dict:
        """The next batch, its wait counted as data time."""
        t0 = time.time()
        batch = next(batches)
        self.data_wait += time.time() - t0
        return batch

    def add_micro_batch(self, terms: dict[str, torch.Tensor], out) -> None:
        """A finite micro-batch's loss terms, mean GMACs and keep ratio per stage."""
        for k, v in terms.items():
            self.sums[k] += float(v.detach())
        self.sums["gmacs"] += float(out.gmacs.detach().float().mean())
        for s, r in enumerate(out.keep_ratios.tolist()):
            self.sums[f"keep_ratio/stage{s}"] += r
        self.micro_batches += 1

    def add_update(self, grad_norm: float) -> None:
        """An applied update's grad norm (a skipped step's norm is inf or nan: not in the mean)."""
        self.sums["grad_norm"] += grad_norm
        self.updates += 1

    def reduce(self, batch_size: int) -> dict[str, float]:
        """Means over the window and over ranks (sums reduced, then divided), img/s and data-wait fraction."""
        keys = sorted(self.sums)
        local = [self.sums[k] for k in keys] + [float(self.micro_batches), float(self.updates)]
        *values, micro, updates = dist.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
        micro, updates = max(micro, 1.0), max(updates, 1.0)
        elapsed = max(time.time() - self.start, 1e-9)
        scalars = {k: v / (updates if k == "grad_norm" else micro) for k, v in zip(keys, values, strict=True)}
        if "total" in scalars:  # absent when every step of the window was skipped
            scalars["loss"] = scalars.pop("total")
        scalars["img_per_s"] = micro * batch_size / elapsed
        scalars["data_wait_fraction"] = self.data_wait / elapsed
        return scalars


def rank_summed_skips(loader: TrainLoader) -> dict[str, int]:
    """Skipped-sample counts by kind, summed over ranks (every kind present, zeros included)."""
    local = skip_summary(loader.skips)
    total = dist.all_reduce(torch.tensor(list(local.values()), dtype=torch.float64))
    return {kind: int(v) for kind, v in zip(local, total.tolist(), strict=True)}
