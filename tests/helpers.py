"""Test data made on the fly: ImageFolder trees, shards, tiny configs. No downloads."""

from __future__ import annotations

import io
import os

import numpy as np
import webdataset as wds
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 36), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small random image encoded in memory (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def make_image_folder(root: str, num_classes: int = 3, per_class: int = 6, size: tuple[int, int] = (40, 36)) -> str:
    """An ImageFolder tree `root/class_k/img_i.jpg` of random JPEGs."""
    for c in range(num_classes):
        d = os.path.join(root, f"class_{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            with open(os.path.join(d, f"img_{i}.jpg"), "wb") as f:
                f.write(jpeg_bytes(c * 1000 + i, size))
    return root


def write_shard(path: str, samples: list[dict]) -> None:
    """Write raw samples (dicts of field -> bytes/int) to one tar with webdataset's TarWriter."""
    with wds.TarWriter(path) as sink:
        for s in samples:
            sink.write(s)


def make_shards(out_dir: str, shard_sizes: list[int], num_classes: int = 4, prefix: str = "train",
                size: tuple[int, int] = (40, 36)) -> list[str]:
    """Shards of valid random samples with globally unique keys `s{shard}_{i}`; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k, n in enumerate(shard_sizes):
        path = os.path.join(out_dir, f"{prefix}-{k:06d}.tar")
        write_shard(path, [{"__key__": f"s{k}_{i}", "jpg": jpeg_bytes(k * 100 + i, size),
                            "cls": (k + i) % num_classes} for i in range(n)])
        paths.append(path)
    return paths


class CreatesFile:
    """A pickle payload: unpickling it creates `path` (what a malicious file would do instead)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
