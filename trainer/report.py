"""Demo analysis: kept-token precision against object boxes, curves, overlays, and report.md."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data.demo import box_patch_mask
from data.info import resolve_split
from data.transforms import AugmentConfig, DeviceAugment
from trainer.visualize import overlay_grid


def boxed_val_batches(shards_dir: str, batch_size: int) -> Iterator[tuple]:
    """(uint8 images [B,3,H,W], labels, boxes) from the demo's val shards at native size.

    The demo shards are ours, so reading their `json` field is safe; only `jpg`, `cls` and `json` are
    extracted (never pickle fields).
    """
    split = resolve_split(shards_dir, "val")
    select = lambda name: name.rsplit(".", 1)[-1] in ("jpg", "cls", "json")  # noqa: E731
    urls = [s.path for s in split.shards]
    dataset = wds.WebDataset(urls, shardshuffle=False, select_files=select, empty_check=False)
    images, labels, boxes = [], [], []
    for sample in dataset:
        img = np.array(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        images.append(torch.from_numpy(img).permute(2, 0, 1).contiguous())
        labels.append(int(sample["cls"]))
        boxes.append(json.loads(sample["json"])["box"])
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels), boxes
            images, labels, boxes = [], [], []
    if images:
        yield torch.stack(images), torch.tensor(labels), boxes


@torch.no_grad()
def kept_token_precision(student: torch.nn.Module, shards_dir: str, num_classes: int,
                         batch_size: int = 64) -> dict[str, float]:
    """Fraction of the last stage's kept tokens that overlap the object box, vs keeping at random.

    Keeping k tokens at random hits the box with probability (box patches / all patches), so the
    random baseline is the mean box coverage; the goal is precision >= 2x that.
    """
    student.eval()
    patch = student.vit.patch_embed.patch_size[0]
    normalize = DeviceAugment(AugmentConfig(), num_classes).normalize
    hits = kept = 0.0
    coverage = []
    for images, _, boxes in boxed_val_batches(shards_dir, batch_size):
        student(normalize(images))
        last = student.last_keep_indices[-1]
        size = images.shape[-1]
        for i, box in enumerate(boxes):
            mask = torch.from_numpy(box_patch_mask(box, size, patch).reshape(-1))
            hits += float(mask[last[i]].sum())
            kept += last.shape[1]
            coverage.append(float(mask.float().mean()))
    precision = hits / max(kept, 1.0)
    baseline = float(np.mean(coverage)) if coverage else float("nan")
    return {"kept_token_precision": precision, "random_precision": baseline,
            "precision_over_random": precision / baseline if baseline else float("nan")}


@torch.no_grad()
def overlay_png(student: torch.nn.Module, shards_dir: str, num_classes: int, path: str, count: int = 6) -> None:
    """The DynamicViT figure for `count` val images: image, then the tokens kept at each stage."""
    student.eval()
    normalize = DeviceAugment(AugmentConfig(), num_classes).normalize
    images, _, _ = next(boxed_val_batches(shards_dir, count))
    student(normalize(images))
    grid = overlay_grid(images, student.last_keep_indices, student.vit.patch_embed.grid_size, count)
    big = Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST)
    big.save(path)


def read_metrics(run_dir: str) -> list[dict]:
    """The train records of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def plot_curves(runs: dict[str, str], path: str) -> None:
    """Loss of every run and keep ratio per stage of the students, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_keep) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run_dir in runs.items():
        rows = read_metrics(run_dir)
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss"] for r in rows], label=name)
        for key in sorted(k for k in rows[-1] if k.startswith("keep_ratio/")):
            ax_keep.plot(steps, [r.get(key) for r in rows], label=f"{name} {key.split('/')[-1]}")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss (all terms)")
    ax_keep.set(xlabel="step", ylabel="kept fraction of patch tokens", title="keep ratio per stage (train)")
    for ax in (ax_loss, ax_keep):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
