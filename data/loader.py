"""Train and eval loaders on top of `data.stream`: DataLoader workers, position, and skip counting.

The loaders split work by rank themselves; they are never handed to `accelerator.prepare` (which would
make rank 0 read everything) or to DeepSpeed.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.info import Shard
from data.samples import SKIP_KINDS, SampleError, decode_sample
from data.sources import NetOptions
from data.stream import SkipTally, StreamPlan, read_shards, worker_batches


def leave_stop_signals_to_the_parent(_worker_id: int) -> None:
    """DataLoader worker init: SIGTERM and SIGUSR1 from anyone but the training process are ignored.

    SLURM signals every process of a task (preemption, `scancel --signal`), and a worker ended by it would
    break the stream before the training process, which handles the signal, can stop at a step boundary
    with a checkpoint. The parent's own SIGTERM (DataLoader shutdown, interpreter exit) still ends the
    worker, as torch's handler does: Python handlers cannot see the sender, so a thread takes SIGTERM
    with sigwaitinfo, which can.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the thread below inherits the mask

    def exit_on_the_parents_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=exit_on_the_parents_sigterm, name="sigterm-from-parent", daemon=True).start()


class DataQualityError(RuntimeError):
    """Too many unusable samples: the run stops instead of training on a silently shrunken dataset."""


class _EpochWorkers(IterableDataset):
    """One epoch of batches; DataLoader worker d plays plan worker (d + rotation) % W."""

    def __init__(self, plan: StreamPlan, epoch: int, rank: int, transform: Callable,
                 raw_offsets: list[int], batches_done: list[int], rotation: int):
        self.plan, self.epoch, self.rank, self.transform = plan, epoch, rank, transform
        self.raw_offsets, self.batches_done, self.rotation = raw_offsets, batches_done, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        w = (loader_worker + self.rotation) % self.plan.workers_per_rank
        yield from worker_batches(self.plan, self.epoch, self.rank, w, self.transform,
                                  start_raw=self.raw_offsets[w], start_batch=self.batches_done[w])


class TrainLoader:
    """Endless, resumable stream of training batches for one rank.

    `state_dict()` is the exact position (epoch, batches consumed, per-worker raw-sample offset) plus
    the skip counters; `load_state_dict()` continues the same sample stream. Augmentation randomness
    is a function of each sample's place in the stream, so no RNG state needs saving.
    """

    def __init__(self, plan: StreamPlan, rank: int, transform: Callable, max_skip_fraction: float = 0.01,
                 min_samples_for_skip_check: int = 256, pin_memory: bool = False, prefetch_factor: int = 2,
                 use_processes: bool | None = None, any_rank: Callable[[bool], bool] | None = None,
                 skip_check_every: int = 8):
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} outside world size {plan.world_size}")
        self.plan, self.rank, self.transform = plan, rank, transform
        self.max_skip_fraction = max_skip_fraction
        self.min_samples_for_skip_check = min_samples_for_skip_check
        # With several ranks the skip-rate stop must be taken by all of them at the same batch: a rank that
        # stopped alone would leave the others waiting in the next collective until the process-group
        # timeout. `any_rank` is that agreement (a collective); every rank yields the same number of
        # batches, so calling it every `skip_check_every` batches keeps the ranks in step.
        self.any_rank, self.skip_check_every = any_rank, max(1, skip_check_every)
        self._batches_seen = 0
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        # One worker may still run in its own process (decode overlapped with training); several must.
        self.use_processes = plan.workers_per_rank > 1 if use_processes is None else use_processes
        if not self.use_processes and plan.workers_per_rank > 1:
            raise ValueError(f"{plan.workers_per_rank} workers per rank need worker processes")
        self.epoch = 0
        self.batches_in_epoch = 0
        self.raw_offsets = [0] * plan.workers_per_rank
        self.samples_read = 0
        self.skips: Counter = Counter()
        self.skips_by_shard: Counter = Counter()

    @property
    def num_workers(self) -> int:
        return self.plan.workers_per_rank

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.plan.steps_per_epoch(self.epoch if epoch is None else epoch)

    def state_dict(self) -> dict[str, Any]:
        """The exact stream position and the cumulative skip counters (JSON-serialisable)."""
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "raw_offsets": list(self.raw_offsets), "samples_read": self.samples_read,
                "skips": dict(self.skips), "skips_by_shard": dict(self.skips_by_shard),
                "plan": {"seed": self.plan.seed, "world_size": self.plan.world_size,
                         "workers_per_rank": self.plan.workers_per_rank, "batch_size": self.plan.batch_size,
                         "num_shards": len(self.plan.shards)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses one saved under a different data plan."""
        mine = self.state_dict()["plan"]
        if state["plan"] != mine:
            changed = {k: (state["plan"].get(k), v) for k, v in mine.items() if state["plan"].get(k) != v}
            raise ValueError(f"saved data position belongs to another data plan (saved, now): {changed}; "
                             f"the exact sample stream cannot be continued")
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
        self.raw_offsets = [int(x) for x in state["raw_offsets"]]
        self.samples_read = int(state["samples_read"])
        self.skips = Counter(state["skips"])
        self.skips_by_shard = Counter(state["skips_by_shard"])

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield from self._epoch()
            self.epoch += 1
            self.batches_in_epoch = 0
            self.raw_offsets = [0] * self.num_workers

    def _epoch(self) -> Iterator[dict]:
        W = self.num_workers
        expected = self.steps_per_epoch()
        done = [sum(1 for i in range(self.batches_in_epoch) if i % W == w) for w in range(W)]
        dataset = _EpochWorkers(self.plan, self.epoch, self.rank, self.transform, self.raw_offsets, done,
                                rotation=self.batches_in_epoch % W)
        procs = W if self.use_processes else 0
        loader = DataLoader(dataset, batch_size=None, num_workers=procs, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if procs else None,
                            worker_init_fn=leave_stop_signals_to_the_parent)
        for batch in loader:
            want = self.batches_in_epoch % W
            if batch["worker"] != want:
                raise RuntimeError(f"rank {self.rank}: data worker {want} ended early in epoch {self.epoch} "
                                   f"(got a batch from worker {batch['worker']}); its shards are unreadable")
            self._account(batch)
            self.raw_offsets[want] = batch["raw_end"]
            self.batches_in_epoch += 1
            yield batch
        if self.batches_in_epoch != expected:
            raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} ended after {self.batches_in_epoch} of "
                               f"{expected} batches; skipped so far: {dict(self.skips)}")

    def _account(self, batch: dict) -> None:
        self.samples_read += batch["samples_read"]
        self.skips.update(batch["skips"])
        self.skips_by_shard.update(batch["skips_by_shard"])
        self._batches_seen += 1
        skipped = sum(self.skips.values())
        exceeded = (self.samples_read >= self.min_samples_for_skip_check
                    and skipped > self.max_skip_fraction * self.samples_read)
        if self.any_rank is not None:
            if self._batches_seen % self.skip_check_every:
                return
            if self.any_rank(exceeded) and not exceeded:
                raise DataQualityError(
                    f"rank {self.rank}: stopping with the other ranks: another rank skipped more than "
                    f"data.max_skip_fraction={self.max_skip_fraction} of its samples (its error names the worst "
                    f"shard); this rank skipped {skipped} of {self.samples_read}, by kind: {dict(self.skips)}")
        if exceeded:
            shard, n = self.skips_by_shard.most_common(1)[0]
            raise DataQualityError(
                f"rank {self.rank}: skipped {skipped} of {self.samples_read} samples read "
                f"({skipped / self.samples_read:.1%} > data.max_skip_fraction={self.max_skip_fraction}); "
                f"by kind: {dict(self.skips)}; worst shard: {shard} ({n} skipped)")


def skip_summary(skips: Counter | dict) -> dict[str, int]:
    """Skip counts with every kind present (zeros included), for logs and summaries."""
    return {kind: int(skips.get(kind, 0)) for kind in SKIP_KINDS}


class _EvalWorkers(IterableDataset):
    """Eval batches of one rank: its shards split over DataLoader workers, each sample once."""

    def __init__(self, shards: list[Shard], batch_size: int, transform: Callable, num_classes: int | None,
                 net: NetOptions):
        self.shards, self.batch_size = shards, batch_size
        self.transform, self.num_classes, self.net = transform, num_classes, net

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        tally = SkipTally()
        images, labels, keys = [], [], []
        for sample in read_shards(self.shards[wid::nw], tally, self.net):
            try:
                image, label = decode_sample(sample, self.num_classes)
            except SampleError as e:
                tally.add(e.kind, sample.get("__url__", "?"))
                continue
            images.append(self.transform(image))
            labels.append(label)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield self._batch(images, labels, keys, tally)
                images, labels, keys = [], [], []
        if images or tally.by_kind:
            yield self._batch(images, labels, keys, tally)

    @staticmethod
    def _batch(images: list, labels: list, keys: list, tally: SkipTally) -> dict:
        by_kind, _ = tally.take()
        if not images:
            return {"image": None, "label": torch.zeros(0, dtype=torch.long), "keys": [], "skips": by_kind}
        return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long), "keys": keys,
                "skips": by_kind}


class EvalLoader:
    """Every eval sample exactly once across ranks; every rank yields the same number of batches.

    Shards are split over ranks (no padding samples, so metrics are exact when sums are reduced); ranks
    with less data then get padding batches whose `valid` mask is all False, so collectives inside the
    model (ZeRO-3 gathers parameters every forward) run the same number of times on every rank.
    """

    def __init__(self, shards: tuple[Shard, ...], batch_size: int, rank: int, world_size: int,
                 transform: Callable, num_classes: int | None = None, workers: int = 0,
                 image_shape: tuple[int, int, int] = (3, 224, 224), net: NetOptions | None = None):
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.net = net or NetOptions()
        self.transform, self.num_classes, self.workers = transform, num_classes, workers
        self.image_shape = image_shape
        self.skips: Counter = Counter()

    def _rank_shards(self, rank: int) -> list[Shard]:
        return list(self.shards[rank::self.world_size])

    def _planned_batches(self, rank: int) -> int:
        shards = self._rank_shards(rank)
        nw = max(1, min(self.workers, len(shards)))
        return sum(-(-sum(s.num_samples for s in shards[w::nw]) // self.batch_size) for w in range(nw))

    def __len__(self) -> int:
        return max(self._planned_batches(r) for r in range(self.world_size))

    def __iter__(self) -> Iterator[dict]:
        self.skips = Counter()  # per pass over the eval set, not cumulative over evals
        shards = self._rank_shards(self.rank)
        nw = min(self.workers, len(shards))
        produced = 0
        if shards:
            dataset = _EvalWorkers(shards, self.batch_size, self.transform, self.num_classes, self.net)
            for batch in DataLoader(dataset, batch_size=None, num_workers=nw if nw > 1 else 0,
                                    worker_init_fn=leave_stop_signals_to_the_parent):
                self.skips.update(batch["skips"])
                if batch["image"] is None:
                    continue
                batch["valid"] = torch.ones(len(batch["label"]), dtype=torch.bool)
                produced += 1
                yield batch
        for _ in range(len(self) - produced):
            yield {"image": torch.zeros((1, *self.image_shape), dtype=torch.uint8),
                   "label": torch.zeros(1, dtype=torch.long), "keys": [],
                   "valid": torch.zeros(1, dtype=torch.bool), "skips": {}}


