"""The training sample stream: which shards each (rank, worker) reads, in what order, and how many
batches it yields per epoch.

Everything here is a pure function of (seed, epoch, rank, worker) and the shard sizes in
`_info.json`, so every rank computes the same plan without talking to the others, and a resumed run
rebuilds the exact stream from a small position record (see `data.loader`).

Why not `webdataset.WebDataset(...).with_epoch(n)`: with_epoch cuts each worker's stream at a fixed
count and silently repeats or drops samples when shards are uneven, and its shuffle RNG state cannot
be saved. We keep webdataset's tar reading and shuffle buffer and own only the plan and the position.
"""

from __future__ import annotations

import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count, islice

import numpy as np
import torch
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from data.info import Shard
from data.samples import SampleError, decode_sample, wanted_member
from data.sources import NetOptions, ShardUnreachable, open_shard, redact, source_kind


@dataclass(frozen=True)
class StreamPlan:
    """What all ranks agree on: the shards, the split of work, and the randomness."""

    shards: tuple[Shard, ...]
    batch_size: int
    world_size: int = 1
    workers_per_rank: int = 1
    seed: int = 0
    shuffle_buffer: int = 1000
    num_classes: int | None = None
    net: NetOptions = field(default_factory=NetOptions)  # retries and timeouts of remote shards

    def __post_init__(self) -> None:
        needed = self.world_size * self.workers_per_rank
        if len(self.shards) < needed:
            raise ValueError(
                f"{len(self.shards)} train shard(s) for {self.world_size} rank(s) x {self.workers_per_rank} "
                f"worker(s): need at least {needed} shards (re-shard with a smaller --shard-size, or lower "
                f"data.workers)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def global_workers(self) -> int:
        return self.world_size * self.workers_per_rank

    def shard_order(self, epoch: int) -> list[int]:
        """The epoch's shard permutation, shared by all ranks (common seed), before splitting."""
        order = list(range(len(self.shards)))
        random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        return order

    def global_worker(self, rank: int, worker: int) -> int:
        """Index of a worker among all ranks' workers."""
        return rank * self.workers_per_rank + worker

    def worker_shards(self, epoch: int, rank: int, worker: int) -> list[Shard]:
        """Shards read by one worker of one rank in this epoch (strided over the shuffled order)."""
        order = self.shard_order(epoch)
        gid = self.global_worker(rank, worker)
        return [self.shards[i] for i in order[gid::self.global_workers]]

    def batches_per_worker(self, epoch: int) -> int:
        """Batches every worker yields this epoch: what the poorest worker can fill without repeats."""
        order = self.shard_order(epoch)
        totals = [sum(self.shards[i].num_samples for i in order[g::self.global_workers])
                  for g in range(self.global_workers)]
        batches = min(totals) // self.batch_size
        if batches == 0:
            raise ValueError(f"a data worker gets only {min(totals)} samples this epoch, fewer than one batch "
                             f"of {self.batch_size}: use smaller batches, fewer workers or bigger shards")
        return batches

    def steps_per_epoch(self, epoch: int) -> int:
        """Batches each rank yields in this epoch (equal on all ranks, so collectives never hang)."""
        return self.batches_per_worker(epoch) * self.workers_per_rank

    def fingerprint(self) -> str:
        """Everything the plan depends on, as text: ranks compare it at start (a shard pattern globbed on
        two nodes can differ, and then so would the steps per epoch)."""
        shards = ";".join(f"{s.path}:{s.num_samples}" for s in self.shards)
        return (f"{shards}|{self.batch_size}|{self.world_size}|{self.workers_per_rank}|{self.seed}|"
                f"{self.shuffle_buffer}|{self.num_classes}")


@dataclass
class SkipTally:
    """Bad samples skipped since the last batch, by kind and by shard."""

    by_kind: Counter = field(default_factory=Counter)
    by_shard: Counter = field(default_factory=Counter)

    def add(self, kind: str, shard: str) -> None:
        self.by_kind[kind] += 1
        self.by_shard[shard] += 1

    def take(self) -> tuple[dict, dict]:
        out = dict(self.by_kind), dict(self.by_shard)
        self.by_kind.clear()
        self.by_shard.clear()
        return out


def shard_error_kind(exn: Exception) -> str:
    """The skip kind of an error raised while opening or reading a tar (see data.samples.SKIP_KINDS)."""
    if isinstance(exn, ShardUnreachable):
        return "unreachable_shard"
    if isinstance(exn, FileNotFoundError):
        return "missing_shard"
    if isinstance(exn, tarfile.ReadError) and str(exn.args[0] if exn.args else "").startswith("empty file"):
        return "empty_shard"
    return "bad_tar"


def _try_open(shard: Shard, net: NetOptions) -> dict | Exception:
    """The shard as webdataset's tar reader takes it (an open stream), or the error that kept it closed."""
    try:
        return {"url": redact(shard.path), "stream": open_shard(shard.path, net)}
    except Exception as e:  # noqa: BLE001 - counted by the caller like any tar error
        return e


def read_shards(shards: list[Shard], tally: SkipTally, net: NetOptions | None = None) -> Iterator[dict]:
    """Raw samples (bytes only, wanted fields only) of the shards, in order.

    A shard that is missing, unreachable, empty or breaks mid-read is counted once per read (webdataset may
    report one broken tar several times) and the stream goes on with the next shard: never fatal, never
    silent. Remote shards are retried and read ahead (data.sources), and the next remote shard starts
    downloading when this one opens: two connections per worker hide a server's latency and per-connection cap.
    """
    net = net or NetOptions()
    ahead: dict | Exception | None = None
    try:
        for index, shard in enumerate(shards):
            source = ahead if ahead is not None else _try_open(shard, net)
            following = shards[index + 1] if index + 1 < len(shards) else None
            ahead = _try_open(following, net) if following and source_kind(following.path) != "local" else None
            yield from _samples_of(source, redact(shard.path), tally)
    finally:
        if isinstance(ahead, dict):  # the consumer stopped early: drop the prefetched shard too
            ahead["stream"].close()


def _samples_of(source: dict | Exception, name: str, tally: SkipTally) -> Iterator[dict]:
    """One opened shard's samples; its errors are counted once under `name`."""
    errors: list[Exception] = []

    def on_tar_error(exn: Exception) -> bool:
        if not errors:
            tally.add(shard_error_kind(exn), name)
        errors.append(exn)
        return True  # keep going with the next member or shard

    if isinstance(source, Exception):
        on_tar_error(source)
        return
    produced = 0
    try:
        files = tar_file_expander(iter([source]), handler=on_tar_error, select_files=wanted_member)
        for sample in group_by_keys(files, handler=on_tar_error):
            if errors:
                continue  # the sample cut off by the break: part of what the bad_tar count stands for
            produced += 1
            yield sample
    finally:
        source["stream"].close()
    if produced == 0 and not errors:
        tally.add("empty_shard", name)  # a valid tar with no members raises nothing


def raw_stream(plan: StreamPlan, epoch: int, rank: int, worker: int, tally: SkipTally) -> Iterator[dict]:
    """The worker's endless raw-sample stream for an epoch: its shards, shuffled through a buffer.

    Pass 0 holds every sample of the worker's shards once. Later passes (re-reading the same shards in a
    new order) only run when bad samples left the worker short of its batch quota; each pass drains
    its own buffer, so a repeat never overtakes a first-time sample.
    """
    shards = plan.worker_shards(epoch, rank, worker)
    gid = plan.global_worker(rank, worker)
    for pass_index in count():
        rng = random.Random(f"samples:{plan.seed}:{epoch}:{gid}:{pass_index}")
        order = shards if pass_index == 0 else rng.sample(shards, len(shards))
        initial = min(plan.shuffle_buffer, 100)
        produced = 0
        for sample in wds_shuffle(plan.shuffle_buffer, initial, rng=rng)(read_shards(order, tally, plan.net)):
            produced += 1
            yield sample
        if produced == 0:
            return  # nothing readable at all: end the stream, the loader reports the shortfall


def sample_seed(plan: StreamPlan, epoch: int, rank: int, worker: int, raw_index: int) -> int:
    """Augmentation seed of one sample: a pure function of its place in the stream (exact resume).

    Keyed by the global worker id, not (rank, worker): 2 ranks x 1 worker and 1 rank x 2 workers then
    produce the same samples, which is what makes their losses comparable.
    """
    gid = plan.global_worker(rank, worker)
    return random.Random(f"aug:{plan.seed}:{epoch}:{gid}:{raw_index}").getrandbits(63)


def worker_batches(plan: StreamPlan, epoch: int, rank: int, worker: int, transform: Callable,
                   start_raw: int = 0, start_batch: int = 0) -> Iterator[dict]:
    """Batches of one worker, resuming after `start_raw` raw samples and `start_batch` batches.

    Each batch is a dict: image (uint8 or float tensor from `transform`), label, keys, and the
    bookkeeping the loader needs for position and skip counts (worker, raw_end, skips, skips_by_shard,
    samples_read).
    """
    tally = SkipTally()
    stream = raw_stream(plan, epoch, rank, worker, tally)
    # Resume: replay the undecoded stream up to the saved position; costs tar reads, never decoding.
    stream = islice(stream, start_raw, None)
    raw_index = start_raw
    images, labels, keys = [], [], []
    samples_read = 0
    quota = plan.batches_per_worker(epoch) - start_batch
    # Bounds the refill passes when a worker's shards are (nearly) all bad: fail loudly, never spin.
    unusable_limit = 10 * plan.batch_size + sum(s.num_samples for s in plan.worker_shards(epoch, rank, worker))
    rng_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        for sample in stream:
            if quota <= 0:
                break
            seed = sample_seed(plan, epoch, rank, worker, raw_index)
            raw_index += 1
            samples_read += 1
            try:
                image, label = decode_sample(sample, plan.num_classes)
            except SampleError as e:
                tally.add(e.kind, sample.get("__url__", "?"))
                if samples_read > unusable_limit:
                    raise RuntimeError(
                        f"rank {rank} worker {worker}: {samples_read} samples in a row without one usable "
                        f"batch; skipped so far by kind: {dict(tally.by_kind)}, by shard: "
                        f"{dict(tally.by_shard)}") from e
                continue
            # timm's augmentations draw from python's, numpy's and torch's global generators.
            random.seed(seed)
            np.random.seed(seed % 2**32)
            # Only the CPU generator: torch.manual_seed also (lazily) seeds every accelerator's generator,
            # which measured ~0.2-0.7 ms per sample, and the transforms draw on the CPU.
            torch.default_generator.manual_seed(seed)
            images.append(transform(image))
            labels.append(label)
            keys.append(sample["__key__"])
            if len(images) == plan.batch_size:
                by_kind, by_shard = tally.take()
                yield {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),
                       "keys": keys, "worker": worker, "raw_end": raw_index, "skips": by_kind,
                       "skips_by_shard": by_shard, "samples_read": samples_read}
                images, labels, keys = [], [], []
                samples_read = 0
                quota -= 1
    finally:
        # Per-sample seeding must not leak into the caller when this runs in the main process.
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])
