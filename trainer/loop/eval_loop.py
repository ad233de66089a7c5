"""Evaluation over the exact eval loader: sums reduced across ranks, never means."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from model import count_flops
from trainer.infra import dist


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
    hit = top5 == labels.unsqueeze(1)
    return float((hit[:, 0] & valid).sum()), float((hit.any(1) & valid).sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(student: Callable, student_module: torch.nn.Module, loader, normalize: Callable,
             device: torch.device, input_dtype: torch.dtype, img_size: int,
             teacher: torch.nn.Module | None = None, teacher_dtype: torch.dtype = torch.float32,
             on_first_batch: Callable | None = None) -> dict[str, float]:
    """Top-1/top-5 of student (and teacher), keep ratios, GMACs and img/s; identical on every rank.

    `student` is what to call (a DeepSpeed engine or DDP wrapper), `student_module` the unwrapped
    model whose `last_keep_counts` describe the last pruned forward.
    """
    student_module.eval()
    stages = len(getattr(student_module, "locations", []))
    # [s_top1, s_top5, t_top1, t_top5, count, s_seconds, t_seconds, keep_count_sum per stage...]
    sums = torch.zeros(7 + stages, dtype=torch.float64)
    for i, batch in enumerate(loader):
        valid = batch["valid"].to(device)
        labels = batch["label"].to(device)
        x = normalize(batch["image"])
        _sync(device)
        start = time.perf_counter()
        logits = student(x.to(input_dtype))
        _sync(device)
        sums[5] += time.perf_counter() - start
        s1, s5 = _topk_correct(logits, labels, valid)
        sums[0] += s1
        sums[1] += s5
        n = float(valid.sum())
        sums[4] += n
        counts = getattr(student_module, "last_keep_counts", None) or []
        for s, c in enumerate(counts):
            sums[7 + s] += c * n
        if teacher is not None:
            _sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                t_logits = teacher(x.to(teacher_dtype)).logits
            _sync(device)
            sums[6] += time.perf_counter() - start
            t1, t5 = _topk_correct(t_logits, labels, valid)
            sums[2] += t1
            sums[3] += t5
        if i == 0 and on_first_batch is not None:
            on_first_batch(batch, x)
    dist.all_reduce(sums)
    # Unusable eval samples are skipped by the loader; the count says how many, so a shrunken eval set shows.
    skipped = dist.all_reduce(torch.tensor([float(sum(getattr(loader, "skips", {}).values()))], dtype=torch.float64,
                                           device=device))
    count = max(float(sums[4]), 1.0)
    patches = getattr(student_module, "last_num_patches", None) or 1
    mean_counts = [float(sums[7 + s]) / count for s in range(stages)]
    out = {"student_top1": 100 * float(sums[0]) / count, "student_top5": 100 * float(sums[1]) / count,
           "count": float(sums[4]), "eval_skipped": float(skipped[0]),
           "student_gmacs": count_flops(student_module, img_size, keep_counts=mean_counts or None)
           if stages else count_flops(student_module, img_size),
           "dense_gmacs": count_flops(getattr(student_module, "vit", student_module), img_size)}
    for s, c in enumerate(mean_counts):
        out[f"keep_ratio/stage{s}"] = c / patches
    # Throughput per device: images over forward seconds, both summed over ranks.
    out["student_img_s"] = float(sums[4]) / max(float(sums[5]), 1e-9)
    if teacher is not None:
        out["teacher_top1"] = 100 * float(sums[2]) / count
        out["teacher_top5"] = 100 * float(sums[3]) / count
        out["teacher_img_s"] = float(sums[4]) / max(float(sums[6]), 1e-9)
    return out
