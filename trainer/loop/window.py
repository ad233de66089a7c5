"""The logging window: sums of the loss terms, GMACs, keep ratios and grad norms since the last log step,
kept on the device and reduced over ranks into means when it is logged (the only host read)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

import torch

from data import TrainLoader, skip_summary
from trainer.infra import dist


class MetricsWindow:
    """Sums over the micro-batches and updates of one log window, as device tensors; `reduce` averages them
    over ranks.

    Every rank adds the same keys, so the reduction lines up. A micro-batch with a non-finite loss adds zeros
    and is not counted (`micro_batches`), a skipped update likewise (`updates`): the counts are the divisors.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.data_wait = 0.0
        self.start = time.time()

    def timed_next(self, batches: Iterator[dict]) -> dict:
        """The next batch, its wait counted as data time."""
        t0 = time.time()
        batch = next(batches)
        self.data_wait += time.time() - t0
        return batch

    def _add(self, key: str, value: torch.Tensor, counted: torch.Tensor) -> None:
        # where(), not a product: a non-finite value times 0 would still be NaN.
        self.sums[key] = self.sums[key] + torch.where(counted, value.detach().float(), 0.0)

    def add_micro_batch(self, terms: dict[str, torch.Tensor], out, finite: torch.Tensor) -> None:
        """A micro-batch's loss terms, mean GMACs and keep ratio per stage; nothing when `finite` is False."""
        for k, v in terms.items():
            self._add(k, v, finite)
        self._add("gmacs", out.gmacs.detach().float().mean(), finite)
        for s, r in enumerate(out.keep_ratios.unbind()):
            self._add(f"keep_ratio/stage{s}", r, finite)
        self._add("micro_batches", torch.ones((), device=finite.device), finite)

    def add_update(self, result) -> None:
        """An optimizer step's grad norm, counted only when the update was applied (`StepResult`)."""
        norm = result.grad_norm
        if norm is None:
            return
        norm = torch.as_tensor(norm, dtype=torch.float32)
        applied = ~torch.as_tensor(result.skipped, device=norm.device).bool() & torch.isfinite(norm)
        self._add("grad_norm", norm, applied)
        self._add("updates", torch.ones((), device=norm.device), applied)

    def reduce(self, batch_size: int) -> dict[str, float]:
        """Means over the window and over ranks (sums reduced, then divided), img/s and data-wait fraction."""
        sums = dict(self.sums)
        counts = [sums.pop("micro_batches", 0.0), sums.pop("updates", 0.0)]
        keys = sorted(sums)
        device = next((v.device for v in self.sums.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        local = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                             for v in [*counts, *(sums[k] for k in keys)]])
        micro, updates, *values = dist.all_reduce(local).tolist()  # one read for the whole window
        elapsed = max(time.time() - self.start, 1e-9)
        # A mean over nothing is left out (no finite micro-batch, or every update skipped), not logged as 0.
        scalars = {k: v / (updates if k == "grad_norm" else micro) for k, v in zip(keys, values, strict=True)
                   if (updates if k == "grad_norm" else micro) > 0}
        if "total" in scalars:
            scalars["loss"] = scalars.pop("total")
        scalars["img_per_s"] = micro * batch_size / elapsed
        scalars["data_wait_fraction"] = self.data_wait / elapsed
        return scalars


def rank_summed_skips(loader: TrainLoader) -> dict[str, int]:
    """Skipped-sample counts by kind, summed over ranks (every kind present, zeros included)."""
    local = skip_summary(loader.skips)
    total = dist.all_reduce(torch.tensor(list(local.values()), dtype=torch.float64))
    return {kind: int(v) for kind, v in zip(local, total.tolist(), strict=True)}
