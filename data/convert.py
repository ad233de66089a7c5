"""ImageFolder tree -> globally shuffled WebDataset shards + `_info.json`.

    python -m data.convert SRC OUT [--shard-size N] [--val-fraction F | --val SRC_VAL]
                                   [--max-side S] [--seed K] [--workers W]

Every image is decoded once to prove it is readable; unreadable files are skipped and listed in
`OUT/_skipped.json`, never abort the run. JPEG bytes are kept as they are unless `--max-side` shrinks
the image or the source is not a JPEG. A JSON file next to an image (`foo.jpg` + `foo.json`) travels
with the sample as its `json` field (the demo keeps object boxes that way).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing.pool import Pool

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data.info import write_info

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_QUALITY = 95


@dataclass(frozen=True)
class SourceImage:
    """An image file found in the tree, with its class index and the key it will be stored under."""

    path: str
    label: int
    key: str


def list_classes(root: str) -> list[str]:
    """Class names are the sorted sub-folder names of `root` (the torchvision ImageFolder rule)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"source folder does not exist: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected one sub-folder per class)")
    return classes


def _sanitize(text: str) -> str:
    # webdataset groups tar members by the part of the name before the first dot, so keys hold no dots.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def scan_tree(root: str, classes: Sequence[str]) -> list[SourceImage]:
    """All images under each class folder (nested folders, any case of extension), in sorted order."""
    found: list[SourceImage] = []
    seen_keys: set[str] = set()
    for label, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        if not os.path.isdir(class_dir):
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for fname in sorted(filenames):
                if not fname.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, fname)
                rel = os.path.splitext(os.path.relpath(path, root))[0]
                key = _sanitize(rel)
                while key in seen_keys:
                    key += "_"
                seen_keys.add(key)
                found.append(SourceImage(path, label, key))
    return found


def split_validation(images: list[SourceImage], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of every class (at least one image per class when fraction > 0)."""
    rng = random.Random(seed)
    by_class: dict[int, list[SourceImage]] = {}
    for img in images:
        by_class.setdefault(img.label, []).append(img)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label][:]
        rng.shuffle(items)
        n_val = max(1, round(len(items) * fraction)) if fraction > 0 and len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def encode_image(path: str, max_side: int | None) -> tuple[bytes | None, str]:
    """Read and verify one image; returns (bytes to store, '') or (None, reason it was skipped)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            is_jpeg = img.format == "JPEG"
            too_big = max_side is not None and min(img.size) > max_side
            if is_jpeg and not too_big:
                return raw, ""
            img = img.convert("RGB")
            if too_big:
                scale = max_side / min(img.size)
                size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                img = img.resize(size, Image.BICUBIC)
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=JPEG_QUALITY)
            return out.getvalue(), ""
    except Exception as e:  # any decoder failure means "unreadable": report and skip
        return None, f"{type(e).__name__}: {e}"


def _encode_job(job: tuple[SourceImage, int | None]) -> tuple[SourceImage, bytes | None, str, bytes | None]:
    src, max_side = job
    data, reason = encode_image(src.path, max_side)
    sidecar = os.path.splitext(src.path)[0] + ".json"
    meta = None
    if data is not None and os.path.isfile(sidecar):
        with open(sidecar, "rb") as f:
            meta = f.read()
    return src, data, reason, meta


class ShardSink:
    """Writes samples to `OUT/{split}-000000.tar`, ... rolling over every `shard_size` samples."""

    def __init__(self, out_dir: str, split: str, shard_size: int):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.filenames: list[str] = []
        self.lengths: list[int] = []
        self.bytes_written = 0
        self._writer: wds.TarWriter | None = None

    def write(self, sample: dict) -> None:
        if self._writer is None or self.lengths[-1] >= self.shard_size:
            self._roll()
        self._writer.write(sample)
        self.lengths[-1] += 1

    def _roll(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.filenames):06d}.tar"
        self.filenames.append(name)
        self.lengths.append(0)
        # A whole-second mtime avoids the extra pax header per member that a fractional one costs.
        self._writer = wds.TarWriter(os.path.join(self.out_dir, name), mtime=0)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.bytes_written += os.path.getsize(os.path.join(self.out_dir, self.filenames[-1]))
            self._writer = None


def _encoded(images: list[SourceImage], max_side: int | None, pool: Pool | None) -> Iterator[tuple]:
    jobs = [(img, max_side) for img in images]
    return map(_encode_job, jobs) if pool is None else pool.imap(_encode_job, jobs, chunksize=16)


def write_split(images: list[SourceImage], out_dir: str, split: str, shard_size: int,
                max_side: int | None, pool: Pool | None, skipped: list[dict]) -> ShardSink:
    """Encode `images` in the given (already shuffled) order into shards; append failures to `skipped`."""
    sink = ShardSink(out_dir, split, shard_size)
    for src, data, reason, meta in tqdm(_encoded(images, max_side, pool), total=len(images),
                                        desc=f"{split} shards", disable=not sys.stderr.isatty()):
        if data is None:
            skipped.append({"path": src.path, "split": split, "reason": reason})
            continue
        sample = {"__key__": src.key, "jpg": data, "cls": src.label}
        if meta is not None:
            sample["json"] = meta
        sink.write(sample)
    sink.close()
    return sink


def convert(src: str, out: str, shard_size: int = 1000, val_fraction: float = 0.0, val_src: str | None = None,
            max_side: int | None = None, seed: int = 0, workers: int = 1) -> dict:
    """Convert an ImageFolder tree to shards; returns the `_info.json` content."""
    start = time.time()
    classes = list_classes(src)
    images = scan_tree(src, classes)
    if not images:
        raise ValueError(f"{src}: no images with extensions {IMAGE_EXTENSIONS}")
    if val_src is not None:
        unknown = sorted(set(list_classes(val_src)) - set(classes))
        if unknown:
            raise ValueError(f"{val_src}: class folders not in the training tree: {unknown[:5]}")
        train, val = images, scan_tree(val_src, classes)
    else:
        train, val = split_validation(images, val_fraction, seed)
    # Global shuffle before writing: shards are never class-ordered, so a shard shuffle plus a modest
    # sample buffer at training time is enough randomness.
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(val)

    os.makedirs(out, exist_ok=True)
    skipped: list[dict] = []
    splits, total_bytes = {}, 0
    # fork, not spawn: children only run PIL, and spawn would re-import torch in every worker.
    with (mp.get_context("fork").Pool(workers) if workers > 1 else nullcontext()) as pool:
        for split, items in (("train", train), ("val", val)):
            if not items:
                continue
            sink = write_split(items, out, split, shard_size, max_side, pool, skipped)
            total_bytes += sink.bytes_written
            splits[split] = {"name": split, "num_samples": sum(sink.lengths), "filenames": sink.filenames,
                             "shard_lengths": sink.lengths}
    info = {"name": os.path.basename(os.path.abspath(out)), "classes": classes, "num_classes": len(classes),
            "splits": splits, "seed": seed, "num_skipped": len(skipped)}
    with open(os.path.join(out, "_skipped.json"), "w") as f:
        json.dump(skipped, f, indent=1)
    write_info(out, info)
    seconds = time.time() - start
    written = sum(s["num_samples"] for s in splits.values())
    n_shards = sum(len(s["filenames"]) for s in splits.values())
    per_split = ", ".join(f"{name} {s['num_samples']}" for name, s in splits.items())
    print(f"wrote {written} images ({per_split}), "
          f"skipped {len(skipped)}, {n_shards} shards, {total_bytes / 2**20:.1f} MB, {seconds:.1f} s -> {out}")
    for item in skipped[:10]:
        print(f"  skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if len(skipped) > 10:
        print(f"  ... {len(skipped) - 10} more in {os.path.join(out, '_skipped.json')}", file=sys.stderr)
    return info


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="ImageFolder tree: one sub-folder per class")
    p.add_argument("out", help="output folder for the shards and _info.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction per class")
    group.add_argument("--val", dest="val_src", help="a separate ImageFolder tree for the val split")
    p.add_argument("--max-side", type=int, default=None,
                   help="shrink images whose shorter side exceeds this (re-encodes them as JPEG)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="decode processes")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    convert(args.src, args.out, args.shard_size, args.val_fraction, args.val_src, args.max_side, args.seed,
            args.workers)


if __name__ == "__main__":
    main()
