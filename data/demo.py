"""The embedded demo dataset: real handwritten digits pasted small on larger cluttered canvases.

    python -m data.demo OUT [--train-per-class N] [--val-per-class M] [--canvas C | --img-size C]
                            [--patch P] [--seed K] [--workers W]

The 1797 8x8 digits bundled in scikit-learn (`sklearn.datasets.load_digits`, no download) are split
by index, per class, 80/20 into train and val sources *before* compositing, so no val image shows a
digit seen in training. Each composite upscales one source digit smoothly to ~3/8-1/2 of the canvas
(random size, aspect, rotation, colour and intensity) and pastes it at a random place over a smooth
coloured background with texture, blobs, strokes and faint fragments of other digits of the same
split: the class is decided by the one bright, complete digit, which covers a minority of the patches.

Writes `OUT/imagefolder/{train,val}/<digit>/*.jpg`, each with a JSON sidecar
`{"box": [x0, y0, x1, y1], "label": k, "source": i, "canvas": C}` (half-open pixel bounds of the
digit's ink on the canvas: pixel (x, y) is inside when x0 <= x < x1 and y0 <= y < y1), then converts
the tree with `data.convert` to `OUT/shards` (the sidecar travels as each sample's `json` field).
Same seed -> byte-identical shards, whatever the number of workers.

Box -> tokens for analysis: evaluate at the native canvas size with `crop_pct=1.0` (what
`trainer/configs/demo.yaml` does), then the box maps 1:1 onto the patch grid and `box_patch_mask(box,
canvas, patch)` says which tokens overlap the object. For any other eval size / crop_pct, map the box
through timm's resize + centre crop first with `eval_box`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
from PIL import Image, ImageDraw

from data.convert import convert

CLASSES = tuple(str(d) for d in range(10))  # folder names sort as 0..9, so class index == digit
SOURCE_VAL_FRACTION = 0.2
JPEG_QUALITY = 90
CANVAS_RANGE = (64, 96)
DIGIT_SIZE = (24.0, 34.0)  # side of the upscaled 8x8 digit on a 64 px canvas; scaled with the canvas
# (a digit spans 3-4 patches of 8 px: smaller ones took a from-scratch ViT too long to learn on 2 cores)
SUPERSAMPLE = 4  # clutter shapes are drawn 4x larger and box-filtered down: anti-aliased edges
INK_THRESHOLD = 0.3  # alpha above which a pixel counts as the digit's ink (defines the box)

Box = tuple[float, float, float, float]

# Source digits for the generation workers; set before the fork so children inherit them for free.
_SOURCES: dict = {}


def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits: (images [N, 8, 8] float32 in 0..1, labels [N])."""
    from sklearn.datasets import load_digits  # imported here: only the generator needs scikit-learn

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_sources(labels: np.ndarray, val_fraction: float = SOURCE_VAL_FRACTION) -> dict[str, np.ndarray]:
    """Source indices per split: for each class, the first (1 - val_fraction) of its indices train, the rest val."""
    train, val = [], []
    for k in range(len(CLASSES)):
        idx = np.flatnonzero(labels == k)
        # By index, not with the seed: every seed holds out the same digits, so val numbers from runs
        # with different seeds compare on one val source set.
        n_train = len(idx) - max(1, round(len(idx) * val_fraction))
        train.append(idx[:n_train])
        val.append(idx[n_train:])
    return {"train": np.concatenate(train), "val": np.concatenate(val)}


def box_patch_mask(box: Sequence[float], img_size: int | tuple[int, int], patch: int) -> np.ndarray:
    """Bool [rows, cols] over the patch grid (row-major, timm's token order): True where a patch overlaps the box."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x0, y0, x1, y1 = box
    # Patch j spans [j*patch, (j+1)*patch); it overlaps [x0, x1) when the open intervals intersect.
    starts_x, starts_y = np.arange(w // patch) * patch, np.arange(h // patch) * patch
    cols = (starts_x < x1) & (starts_x + patch > x0)
    rows = (starts_y < y1) & (starts_y + patch > y0)
    return rows[:, None] & cols[None, :]


def eval_box(box: Sequence[float], canvas: int, img_size: int, crop_pct: float) -> Box:
    """Map a canvas box through timm's eval transform (resize to floor(img_size / crop_pct), centre crop)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    scale_size = math.floor(img_size / crop_pct)
    scale = scale_size / canvas
    # torchvision's CenterCrop offset, rounded the same way.
    offset = int(round((scale_size - img_size) / 2.0))
    x0, y0, x1, y1 = (v * scale - offset for v in box)
    clip = lambda v: min(max(v, 0.0), float(img_size))
    return clip(x0), clip(y0), clip(x1), clip(y1)


def _resize_float(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # Float ("F") images keep the smooth bicubic values instead of quantising to uint8.
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize(size, Image.BICUBIC))


def digit_alpha(digit: np.ndarray, size: float, aspect: float, angle: float) -> np.ndarray:
    """An 8x8 digit (0..1) as a smooth alpha map, its grid `size` px tall, `aspect` x as wide, rotated `angle` deg."""
    padded = np.pad(digit, 1)  # room for the bicubic overshoot and the rotation
    h = max(8, round(size * 10 / 8))
    w = max(8, round(size * aspect * 10 / 8))
    big = Image.fromarray(_resize_float(padded, (w, h)), "F").rotate(angle, Image.BICUBIC, expand=True)
    # The 8x8 source is a 4x4-pooled blur of the pen stroke: a soft threshold gives strokes edges again.
    return np.clip((np.asarray(big) - 0.2) / 0.45, 0.0, 1.0)


def _ink_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha > INK_THRESHOLD)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _over(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray, x: int, y: int) -> None:
    # In-place "over" compositing of a flat colour with a (h, w) alpha at (x, y).
    h, w = alpha.shape
    region = img[y:y + h, x:x + w]
    region += alpha[..., None] * (colour - region)


def _background(rng: np.random.Generator, c: int) -> np.ndarray:
    # A smooth colour gradient (3x3 random colours upsampled) plus a blotchy texture, kept dark so the
    # bright digit stays the most salient thing.
    img = np.stack([_resize_float(rng.uniform(15, 110, (3, 3)), (c, c)) for _ in range(3)], axis=-1)
    texture = _resize_float(rng.normal(0, 1, (c // 4, c // 4)), (c, c))
    return img + texture[..., None] * rng.uniform(5, 15) * rng.uniform(0.6, 1.0, 3)


def _shape_alpha(rng: np.random.Generator, c: int, kind: str) -> np.ndarray:
    # Strokes and blobs drawn on a supersampled mask, then box-filtered down: anti-aliased for free.
    s = SUPERSAMPLE
    mask = Image.new("L", (c * s, c * s))
    draw = ImageDraw.Draw(mask)
    if kind == "blob":
        cx, cy = rng.uniform(0, c, 2)
        rx, ry = rng.uniform(c / 16, c / 6, 2)
        draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], fill=255)
    elif kind == "arc":
        cx, cy = rng.uniform(0, c, 2)
        r = rng.uniform(c / 16, c / 5)
        start = rng.uniform(0, 360)
        draw.arc([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], start, start + rng.uniform(90, 270),
                 fill=255, width=int(rng.uniform(1, 2.5) * s))
    else:  # a polyline: the stroke-like clutter closest to handwriting
        points = [tuple(p) for p in (rng.uniform(0, c, (int(rng.integers(2, 5)), 2)) * s)]
        draw.line(points, fill=255, width=int(rng.uniform(1, 2.5) * s), joint="curve")
    return np.asarray(mask.resize((c, c), Image.BOX), dtype=np.float32) / 255.0


def _paste_away_from(rng: np.random.Generator, img: np.ndarray, frag: np.ndarray, box: tuple[int, ...]) -> None:
    # Up to 10 random tries for a place whose ink stays 2 px clear of `box`; may hang over the canvas edge.
    c, (fh, fw) = img.shape[0], frag.shape
    fx0, fy0, fx1, fy1 = _ink_box(frag)
    for _ in range(10):
        px, py = int(rng.integers(-fw // 3, c - 2 * fw // 3)), int(rng.integers(-fh // 3, c - 2 * fh // 3))
        if (px + fx1 <= box[0] - 2 or px + fx0 >= box[2] + 2 or py + fy1 <= box[1] - 2 or py + fy0 >= box[3] + 2):
            sx, sy = max(0, -px), max(0, -py)
            part = frag[sy:min(fh, c - py), sx:min(fw, c - px)]
            _over(img, part * rng.uniform(0.2, 0.4), rng.uniform(100, 210, 3), px + sx, py + sy)
            return


def render_canvas(rng: np.random.Generator, digit: np.ndarray, fragments: Sequence[np.ndarray],
                  canvas: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One composite: (uint8 [canvas, canvas, 3] image, ink box of the main digit as [x0, y0, x1, y1])."""
    c = canvas
    img = _background(rng, c)
    # Blobs and strokes anywhere, mid colours, part-transparent: they may touch the digit, which is drawn last.
    kinds = ["blob"] * int(rng.integers(1, 4)) + ["line"] * int(rng.integers(2, 5)) + ["arc"] * int(rng.integers(1, 3))
    for kind in kinds:
        _over(img, _shape_alpha(rng, c, kind) * rng.uniform(0.35, 0.75), rng.uniform(40, 190, 3), 0, 0)

    size_scale = c / 64
    alpha = digit_alpha(digit, rng.uniform(*DIGIT_SIZE) * size_scale, rng.uniform(0.8, 1.2), rng.uniform(-15, 15))
    h, w = alpha.shape
    x, y = int(rng.integers(0, c - w + 1)), int(rng.integers(0, c - h + 1))
    bx0, by0, bx1, by1 = _ink_box(alpha)
    box = (x + bx0, y + by0, x + bx1, y + by1)

    # Faint halves of other digits, kept off the main box so they distract without changing the class.
    for other in fragments:
        frag = digit_alpha(other, rng.uniform(*DIGIT_SIZE) * size_scale, rng.uniform(0.8, 1.2), rng.uniform(-30, 30))
        # Keep one half (top, bottom, left or right): a fragment, not a second complete digit.
        axis = int(rng.integers(2))
        n = frag.shape[axis] // 2
        cut = slice(n, None) if rng.integers(2) else slice(None, n)
        frag[(cut, slice(None)) if axis == 0 else (slice(None), cut)] = 0
        if (frag > INK_THRESHOLD).any():
            _paste_away_from(rng, img, frag, box)

    colour = rng.uniform(200, 255) * rng.uniform(0.7, 1.0, 3)
    _over(img, alpha * rng.uniform(0.85, 1.0), colour, x, y)
    img += rng.normal(0, rng.uniform(2, 6), img.shape)  # sensor-like noise over everything
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), box


def _render_job(job: tuple[str, int, int, int, int, int]) -> tuple[str, int, float]:
    """Render and write one image + sidecar; returns (split, source index, box patch fraction)."""
    split, label, i, seed, canvas, patch = job
    images, pools, by_class, root = (_SOURCES[k] for k in ("images", "pools", "by_class", "root"))
    # One generator per image, keyed by (seed, split, class, index): output is independent of worker count.
    rng = np.random.default_rng([seed, ("train", "val").index(split), label, i])
    own = by_class[split][label]
    # Walk the class's sources in a seeded order so every source digit is used about equally often.
    order = np.random.default_rng([seed, ("train", "val").index(split), label]).permutation(len(own))
    source = int(own[order[i % len(own)]])
    others = pools[split][pools[split] != source]
    fragments = [images[j] for j in rng.choice(others, size=int(rng.integers(1, 3)), replace=False)]
    pixels, box = render_canvas(rng, images[source], fragments, canvas)

    stem = os.path.join(root, split, CLASSES[label], f"{split}_{label}_{i:05d}")
    Image.fromarray(pixels, "RGB").save(stem + ".jpg", format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    with open(stem + ".json", "w") as f:
        json.dump({"box": list(box), "label": label, "source": source, "canvas": canvas}, f)
    return split, source, float(box_patch_mask(box, canvas, patch).mean())


def build_demo(out_dir: str, train_per_class: int = 300, val_per_class: int = 60, canvas: int = 64, patch: int = 8,
               seed: int = 0, workers: int = 1, shard_size: int | None = None) -> dict:
    """Generate the ImageFolder tree and its shards under `out_dir`; returns paths and statistics."""
    if not CANVAS_RANGE[0] <= canvas <= CANVAS_RANGE[1]:
        raise ValueError(f"canvas must be in {CANVAS_RANGE[0]}..{CANVAS_RANGE[1]} px, got {canvas}")
    if canvas % patch:
        raise ValueError(f"canvas {canvas} is not a multiple of the patch size {patch}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"need at least one image per class and split, got {train_per_class}/{val_per_class}")
    start = time.time()
    folder, shards = os.path.join(out_dir, "imagefolder"), os.path.join(out_dir, "shards")
    # Start clean: a stale image from a larger earlier run would otherwise end up in the shards.
    for path in (folder, shards):
        shutil.rmtree(path, ignore_errors=True)
    for split in ("train", "val"):
        for name in CLASSES:
            os.makedirs(os.path.join(folder, split, name))

    images, labels = load_source_digits()
    pools = split_sources(labels)
    by_class = {s: [p[labels[p] == k] for k in range(len(CLASSES))] for s, p in pools.items()}
    counts = {"train": train_per_class, "val": val_per_class}
    jobs = [(s, k, i, seed, canvas, patch) for s in ("train", "val") for k in range(len(CLASSES))
            for i in range(counts[s])]
    _SOURCES.update(images=images, pools=pools, by_class=by_class, root=folder)
    try:
        # fork, not spawn: children inherit the source digits and skip re-importing numpy/PIL/sklearn.
        with mp.get_context("fork").Pool(workers) if workers > 1 else nullcontext() as pool:
            results = list(map(_render_job, jobs) if pool is None else pool.imap(_render_job, jobs, chunksize=32))
    finally:
        _SOURCES.clear()

    n_train, n_val = (len(CLASSES) * counts[s] for s in ("train", "val"))
    # At least 8 train and 4 val shards: training reads with 2 ranks x up to 2 workers.
    shard_size = shard_size or max(1, min(n_train // 8, n_val // 4))
    info = convert(os.path.join(folder, "train"), shards, shard_size=shard_size, val_src=os.path.join(folder, "val"),
                   seed=seed, workers=workers)

    fractions = {s: [f for split, _, f in results if split == s] for s in ("train", "val")}
    used = {s: sorted({src for split, src, _ in results if split == s}) for s in ("train", "val")}
    stats = {
        "out": out_dir, "imagefolder": folder, "shards": shards,
        "train_dir": os.path.join(folder, "train"), "val_dir": os.path.join(folder, "val"),
        "classes": list(CLASSES), "num_train": n_train, "num_val": n_val, "canvas": canvas, "patch": patch,
        "seed": seed, "shard_size": shard_size,
        "num_shards": {s: len(e["filenames"]) for s, e in info["splits"].items()},
        "mean_box_patch_fraction": float(np.mean(fractions["train"] + fractions["val"])),
        "mean_box_patch_fraction_by_split": {s: float(np.mean(f)) for s, f in fractions.items()},
        "max_box_patch_fraction": float(max(fractions["train"] + fractions["val"])),
        "sources_used": {s: len(u) for s, u in used.items()},
        "sources_available": {s: int(len(p)) for s, p in pools.items()},
    }
    stats["seconds"] = round(time.time() - start, 2)
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__.split("\n")[0])
    p.add_argument("out", help="output folder: OUT/imagefolder, OUT/shards (both replaced), OUT/demo.json")
    p.add_argument("--train-per-class", type=int, default=300, help="train images per digit (default 300)")
    p.add_argument("--val-per-class", type=int, default=60, help="val images per digit (default 60)")
    p.add_argument("--canvas", "--img-size", dest="canvas", type=int, default=64,
                   help=f"canvas side in px, {CANVAS_RANGE[0]}..{CANVAS_RANGE[1]} (default 64)")
    p.add_argument("--patch", type=int, default=8, help="patch size for the box statistics (default 8)")
    p.add_argument("--seed", type=int, default=0, help="generation and shuffle seed (default 0)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="generation processes")
    args = p.parse_args(argv)
    try:
        stats = build_demo(args.out, args.train_per_class, args.val_per_class, args.canvas, args.patch, args.seed,
                           args.workers)
    except ValueError as e:
        p.error(str(e))
    by_split = stats["mean_box_patch_fraction_by_split"]
    print(f"demo: {stats['num_train'] + stats['num_val']} images (train {stats['num_train']}, val {stats['num_val']}), "
          f"{len(stats['classes'])} classes, {stats['canvas']} px canvas, mean box patch fraction "
          f"{stats['mean_box_patch_fraction']:.3f} (patch {stats['patch']}; train {by_split['train']:.3f}, "
          f"val {by_split['val']:.3f}), {stats['seconds']:.1f} s -> {stats['shards']}")


if __name__ == "__main__":
    main()
