"""Data benchmark: decoded + augmented images/s per worker process, our shard stream vs timm's loader.

    python -m data.bench [--data DIR [--shards DIR]] [--img-size 384] [--workers 1] [--batch-size 32]
                         [--num-images 400] [--images N] [--warmup B] [--rounds R] [--seed K]

Prints one JSON line. Both sides do the same work (DESIGN.md section 8): the same JPEGs, the same
`data.transforms.train_transform` at the training resolution, the same batch size and worker count.
Ours is `TrainLoader` over shards made by `data.convert`; timm's is `create_dataset` with its ImageFolder
reader on the source tree, through a torch DataLoader. Measurements alternate ours/timm, timm/ours, ...
so the load other users put on a shared machine falls on both alike; the medians are reported, as wall
img/s (`ratio`) and as images per CPU-second of the loader's processes (`ratio_cpu`, which other users'
load barely moves). Without `--data` a synthetic ImageFolder of ImageNet-like JPEGs is generated in a
temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from timm.data import create_dataset
from torch.utils.data import DataLoader, Dataset

from data.augment_config import AugmentConfig
from data.convert import convert, list_classes, scan_tree
from data.info import resolve_split
from data.loader import TrainLoader
from data.stream import StreamPlan
from data.transforms import train_transform

SYNTHETIC_CLASSES = 10
# ImageNet-1k train images are mostly 500 px on the long side; these are its most common shapes.
SYNTHETIC_SHAPES = ((500, 375), (500, 333), (375, 500), (500, 400), (333, 500))
SYNTHETIC_QUALITY = 90
# Luma grain strength: with quality 90 it brings a 500x375 JPEG to ~100 KB, ImageNet's mean file size.
# Smooth shapes alone give ~30 KB and pure noise ~300 KB, both of which change the entropy-decode cost.
SYNTHETIC_GRAIN = 20.0


def synthetic_jpeg(seed: int) -> bytes:
    """An ImageNet-like JPEG (~500x375, ~100 KB): smooth background, filled shapes, grain; deterministic."""
    rng = np.random.default_rng(seed)
    w, h = SYNTHETIC_SHAPES[int(rng.integers(len(SYNTHETIC_SHAPES)))]
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 20))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.polygon([(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(4)], fill=color)
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    pixels += rng.normal(0.0, SYNTHETIC_GRAIN * rng.uniform(0.5, 1.5), size=(h, w, 1))
    out = io.BytesIO()
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(out, format="JPEG", quality=SYNTHETIC_QUALITY)
    return out.getvalue()


def make_synthetic_folder(root: str, num_images: int, num_classes: int = SYNTHETIC_CLASSES) -> str:
    """An ImageFolder tree `root/class_k/img_i.jpg` of `num_images` synthetic JPEGs, classes round-robin."""
    for i in range(num_images):
        class_dir = os.path.join(root, f"class_{i % num_classes:02d}")
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f"img_{i:06d}.jpg"), "wb") as f:
            f.write(synthetic_jpeg(i))
    return root


def _cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by this process and its live children; None off Linux."""
    own = time.process_time()
    if not os.path.isdir("/proc/self"):
        return None
    me, ticks = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                # Fields after the ")" that closes the command name: state, ppid, ..., utime (12th), stime.
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a process that exited while we scanned
        if fields[1] == me:
            own += (int(fields[11]) + int(fields[12])) / ticks
    return own


def _take(batches: Iterator, warmup: int, images: int) -> tuple[float, float | None]:
    """Skip `warmup` batches (worker start-up, shuffle-buffer fill), then time `images` images.

    Returns (img/s of wall time, img per CPU-second of this process and its loader workers). The second
    counts only time our processes ran, so other users' load on a shared machine barely moves it.
    """
    for _ in range(warmup):
        next(batches)
    seen = 0
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    while seen < images:
        seen += len(next(batches)["label"])
    wall, cpu_end = time.perf_counter() - start, _cpu_seconds()
    cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else 0.0
    return seen / wall, (seen / cpu if cpu > 0 else None)


def measure_ours(plan: StreamPlan, transform: Callable, warmup: int,
                 images: int) -> tuple[float, float | None]:
    """(img/s, img/CPU-s) of TrainLoader from the start of epoch 0, after `warmup` batches."""
    # With one worker TrainLoader decodes in this process (no DataLoader worker): that is its design.
    batches = iter(TrainLoader(plan, rank=0, transform=transform))
    try:
        return _take(batches, warmup, images)
    finally:
        batches.close()  # ends the epoch's DataLoader, so its workers exit before timm's start


def measure_timm(dataset: Dataset, batch_size: int, workers: int, seed: int, warmup: int,
                 images: int) -> tuple[float, float | None]:
    """(img/s, img/CPU-s) of a torch DataLoader over timm's ImageDataset (fresh workers, shuffled)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(seed),
                        prefetch_factor=2 if workers > 0 else None)
    batches = ({"label": labels} for _, labels in loader)
    try:
        return _take(batches, warmup, images)
    finally:
        batches.close()


def _host_info() -> dict:
    """What a reader needs to compare this run with another: CPUs, library versions, date."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": version("timm"),
            "webdataset": version("webdataset"), "pillow": Image.__version__, "numpy": np.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_data_bench(data_dir: str | None, img_size: int = 384, workers: int = 1, batch_size: int = 32,
                   num_images: int = 400, shards_dir: str | None = None, images: int | None = None,
                   warmup: int | None = None, rounds: int = 3, seed: int = 0) -> dict:
    """Run the benchmark; returns the result dict (what `main` prints as JSON)."""
    if workers < 1 or batch_size < 1 or rounds < 1:
        raise ValueError(f"workers, batch_size, rounds must be >= 1 (got {workers}, {batch_size}, {rounds})")
    if shards_dir is not None and data_dir is None:
        raise ValueError("--shards needs --data: the ImageFolder tree the shards were converted from")
    # Until every worker has delivered a batch, the time measures process start-up, not throughput.
    warmup = 2 * workers if warmup is None else warmup
    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        source = data_dir or "synthetic"
        if data_dir is None:
            data_dir = make_synthetic_folder(os.path.join(tmp, "images"), num_images)
        files = scan_tree(data_dir, list_classes(data_dir))
        if shards_dir is None:
            shards_dir = os.path.join(tmp, "shards")
            # Two shards per worker: every worker gets the same number of images, as with real shards.
            shard_size = -(-len(files) // (2 * workers))
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
                convert(data_dir, shards_dir, shard_size=shard_size, workers=os.cpu_count() or 1)
        split = resolve_split(shards_dir, "train")
        if split.num_samples != len(files):
            raise ValueError(f"{shards_dir} holds {split.num_samples} train samples but {data_dir} has "
                             f"{len(files)} images: convert the same tree with no val split")

        transform = train_transform(img_size, AugmentConfig())
        # A new seed each round: other shuffles and augmentation draws, so no round is a lucky one.
        seeds = [seed + r for r in range(rounds)]
        plans = [StreamPlan(split.shards, batch_size, workers_per_rank=workers, seed=s,
                            num_classes=len(split.classes) or None) for s in seeds]
        # search_split=False: the tree itself is the split, whatever its class folders are called.
        dataset = create_dataset("", root=data_dir, split="train", search_split=False, is_training=True,
                                 transform=transform)
        # Both sides stop inside their first epoch, so neither pays an epoch restart while timed.
        epoch_batches = min(min(p.steps_per_epoch(0) for p in plans), len(dataset) // batch_size)
        # Whole batches only, so every measurement times exactly `images` images.
        images = (epoch_batches - warmup if images is None else -(-images // batch_size)) * batch_size
        if images < 1 or warmup + images // batch_size > epoch_batches:
            raise ValueError(f"{len(files)} images give {epoch_batches} batches of {batch_size} per epoch: "
                             f"too few for {warmup} warm-up batches plus {images} timed images; "
                             f"raise --num-images")

        threads = torch.get_num_threads()
        # DataLoader workers run torch single-threaded; with one worker our loader decodes in this process,
        # so pin it to one thread too (per-process work stays comparable, the second core stays free).
        torch.set_num_threads(1)
        load_start = os.getloadavg()
        ours, theirs = [], []
        try:
            for r in range(rounds):
                # ABBA order: a load change during the run shifts both sides, not one.
                for side in ("ours", "timm") if r % 2 == 0 else ("timm", "ours"):
                    if side == "ours":
                        ours.append(measure_ours(plans[r], transform, warmup, images))
                    else:
                        theirs.append(measure_timm(dataset, batch_size, workers, seeds[r], warmup, images))
        finally:
            torch.set_num_threads(threads)
        mean_kb = sum(os.path.getsize(f.path) for f in files) / len(files) / 1024

    (ours_img_s, ours_cpu), (timm_img_s, timm_cpu) = _medians(ours), _medians(theirs)
    return {"bench": "data", "img_size": img_size, "workers": workers, "batch_size": batch_size,
            "images": images, "warmup_batches": warmup, "rounds": rounds,
            "ours_img_s": round(ours_img_s, 2), "ours_img_s_per_worker": round(ours_img_s / workers, 2),
            "timm_img_s": round(timm_img_s, 2), "timm_img_s_per_worker": round(timm_img_s / workers, 2),
            "ratio": round(ours_img_s / timm_img_s, 3),
            # Images per CPU-second of the whole pipeline (workers + main process): per-process efficiency
            # with the machine's other load taken out; the better ratio on a shared machine.
            "ours_img_per_cpu_s": _round(ours_cpu), "timm_img_per_cpu_s": _round(timm_cpu),
            "ratio_cpu": _round(ours_cpu / timm_cpu if ours_cpu and timm_cpu else None, 3),
            "ours_rounds_img_s": [round(w, 2) for w, _ in ours],
            "timm_rounds_img_s": [round(w, 2) for w, _ in theirs],
            "source": source,
            "source_images": len(files), "mean_jpeg_kb": round(mean_kb, 1),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], **_host_info()}


def _medians(rounds: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    """Median wall img/s and median img/CPU-s (None when CPU time is unavailable) over the rounds."""
    cpu = [c for _, c in rounds if c is not None]
    return statistics.median(w for w, _ in rounds), (statistics.median(cpu) if cpu else None)


def _round(x: float | None, digits: int = 2) -> float | None:
    """round() that passes None through."""
    return None if x is None else round(x, digits)


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point: run the benchmark and print its JSON line."""
    p = argparse.ArgumentParser(prog="python -m data.bench", description=__doc__.split("\n")[0])
    p.add_argument("--data", help="ImageFolder tree (class sub-folders of JPEGs); default: synthetic images")
    p.add_argument("--shards", help="shards already converted from --data (default: convert into a temp dir)")
    p.add_argument("--img-size", type=int, default=384, help="training resolution (default 384)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, both loaders (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size, both loaders (default 32)")
    p.add_argument("--num-images", type=int, default=400, help="synthetic images to generate (default 400)")
    p.add_argument("--images", type=int, default=None,
                   help="images timed per measurement (default: the rest of the first epoch after warm-up)")
    p.add_argument("--warmup", type=int, default=None,
                   help="batches skipped before timing (default 2 x workers)")
    p.add_argument("--rounds", type=int, default=3, help="alternating ours/timm measurements (default 3)")
    p.add_argument("--seed", type=int, default=0, help="shuffle and augmentation seed (default 0)")
    args = p.parse_args(argv)
    result = run_data_bench(args.data, args.img_size, args.workers, args.batch_size, args.num_images,
                            shards_dir=args.shards, images=args.images, warmup=args.warmup,
                            rounds=args.rounds, seed=args.seed)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
