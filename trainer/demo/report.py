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

from data.augment_config import AugmentConfig
from data.demo import box_patch_mask
from data.info import resolve_split
from data.transforms import DeviceAugment
from trainer.config import load_config
from trainer.loop.build import build_student
from trainer.loop.metrics import read_metrics
from trainer.loop.visualize import overlay_grid


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


@torch.no_grad()
def per_image_correct(model: torch.nn.Module, shards_dir: str, num_classes: int, batch_size: int = 64) -> np.ndarray:
    """1/0 per val image (in shard order): whether the model's top-1 is the label."""
    model.eval()
    normalize = DeviceAugment(AugmentConfig(), num_classes).normalize
    hits = [(model(normalize(images)).argmax(dim=1) == labels).numpy()
            for images, labels, _ in boxed_val_batches(shards_dir, batch_size)]
    return np.concatenate(hits).astype(np.float64)


def paired_difference(student: np.ndarray, teacher: np.ndarray, z: float = 1.96) -> dict[str, float]:
    """Student minus teacher top-1 on the same images, in points, with its 95% interval.

    A paired comparison: the per-image differences (each -1, 0 or 1) have a much smaller spread than two
    independent accuracies, because both models get most images right (or wrong) together. The interval
    is the normal approximation mean +- z * sd / sqrt(n) over the per-image differences.
    """
    diff = student - teacher
    n = diff.size
    half = z * diff.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return {"top1_diff": 100 * float(diff.mean()), "top1_diff_ci95": 100 * float(half), "images": float(n),
            "student_only_right": float((diff > 0).sum()), "teacher_only_right": float((diff < 0).sum())}


def plot_curves(runs: dict[str, str], path: str) -> None:
    """Training loss, eval top-1 and the students' keep ratio per stage, against the step, for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_top1, ax_keep) = plt.subplots(1, 3, figsize=(15, 4))
    for name, run_dir in runs.items():
        rows, evals = read_metrics(run_dir), read_metrics(run_dir, "eval")
        if rows:  # a run shorter than log.every steps logged nothing to plot
            steps = [r["step"] for r in rows]
            ax_loss.plot(steps, [r["loss"] for r in rows], label=name)
            for key in sorted(k for k in rows[-1] if k.startswith("keep_ratio/")):
                ax_keep.plot(steps, [r.get(key) for r in rows], label=f"{name} {key.split('/')[-1]}")
        if evals:
            ax_top1.plot([r["step"] for r in evals], [r["student_top1"] for r in evals], marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss (all terms)")
    ax_top1.set(xlabel="step", ylabel="val top-1 (%)", title="eval top-1 during training")
    ax_keep.set(xlabel="step", ylabel="kept fraction of patch tokens", title="keep ratio per stage (train)")
    for ax in (ax_loss, ax_top1, ax_keep):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# The demo's measurements, goals and report.md (used by `python -m trainer.demo`).

STUDENTS = ("dynamicvit", "asvit")
MAX_TOP1_DROP = 1.5  # points of top-1 a student may lose against its teacher
# Fraction of the teacher's GMACs per image a student must save. The conv stem (10% of the demo model's MACs)
# is not prunable, so DynamicViT at rho 0.7 saves 33.7% by the analytic count.
MIN_GMACS_SAVING = 0.30
MIN_PRECISION_OVER_RANDOM = 2.0  # kept-token precision at the last stage vs keeping tokens at random
MIN_TEACHER_TOP1 = 85.0  # the dense teacher must have learned the task before pruning it means anything
MAX_CI_HALF_WIDTH = 1.5  # points: the paired interval must resolve a drop of that size


def load_run_model(run_dir: str) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, its config) from a run dir's latest complete checkpoint."""
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    return build_student(cfg, run_dir).eval(), cfg


@torch.no_grad()
def measure_models(runs: dict[str, str], shards_dir: str, out_dir: str, batch_size: int = 64,
                   iters: int = 7) -> dict:
    """Side-by-side CPU img/s of every run's model on one val batch, plus precision and figures for students."""
    from model.bench import time_alternating

    models = {name: load_run_model(run_dir) for name, run_dir in runs.items()}
    num_classes = next(iter(models.values()))[1].model.num_classes
    normalize = DeviceAugment(AugmentConfig(), num_classes).normalize
    images, _, _ = next(boxed_val_batches(shards_dir, batch_size))
    x = normalize(images)
    fns = {name: (lambda m=model: m(x)) for name, (model, _) in models.items()}
    wall, _ = time_alternating(fns, x.device, warmup=2, iters=iters)
    out: dict = {"batch_size": int(x.shape[0]), "threads": torch.get_num_threads(), "iters": iters, "models": {}}
    for name, seconds in wall.items():
        out["models"][name] = {"cpu_img_s": x.shape[0] / seconds}
    base = wall.get("teacher")
    for name, (model, _) in models.items():
        row = out["models"][name]
        if base:
            row["speedup_vs_teacher"] = base / wall[name]
        if getattr(model, "gates", None):
            row.update(kept_token_precision(model, shards_dir, num_classes))
            path = os.path.join(out_dir, f"tokens_{name}.png")
            overlay_png(model, shards_dir, num_classes, path)
            row["overlay_png"] = os.path.basename(path)
    if "teacher" in models:
        correct = {name: per_image_correct(model, shards_dir, num_classes) for name, (model, _) in models.items()}
        for name in models:
            if name != "teacher":
                out["models"][name]["paired"] = paired_difference(correct[name], correct["teacher"])
    curves = os.path.join(out_dir, "curves.png")
    plot_curves(runs, curves)
    out["curves_png"] = os.path.basename(curves)
    return out


DEPLOYED = ("teacher", "dynamicvit")  # exported to ONNX by the demo: the dense model and the static-count student


def measure_onnxruntime(exports: dict[str, dict], shards_dir: str, batch_size: int = 64, iters: int = 7) -> dict:
    """Side-by-side ONNX Runtime (CPU) img/s of the exported models on the val batch measure_models times,
    preprocessed as a deployer would: with the mean and std the ONNX file carries."""
    from model.bench import time_alternating
    from model.deploy import onnx_session

    sessions = {name: onnx_session(export["out"]) for name, export in exports.items()}
    meta = next(iter(sessions.values())).get_modelmeta().custom_metadata_map
    mean, std = (torch.tensor(json.loads(meta[key])).view(1, 3, 1, 1) for key in ("mean", "std"))
    images, _, _ = next(boxed_val_batches(shards_dir, batch_size))
    feed = {"images": ((images.float() / 255 - mean) / std).numpy()}
    fns = {name: (lambda s=session: s.run(None, feed)) for name, session in sessions.items()}
    wall, _ = time_alternating(fns, torch.device("cpu"), warmup=2, iters=iters)
    out: dict = {"batch_size": int(images.shape[0]), "iters": iters, "models": {}}
    for name, export in exports.items():
        out["models"][name] = {
            "img_s": images.shape[0] / wall[name], "speedup_vs_teacher": wall["teacher"] / wall[name],
            "max_abs_diff": export["max_abs_diff"], "megabytes": export["megabytes"],
            "keep_counts": export["keep_counts"], "file": os.path.join("onnx", os.path.basename(export["out"]))}
    return out


def _student_goals(name: str) -> dict:
    def accuracy(s: dict) -> dict:
        teacher, student = s["evaluate"]["teacher"]["student_top1"], s["evaluate"][name]["student_top1"]
        paired = s["measured"]["models"][name]["paired"]
        diff, half = paired["top1_diff"], paired["top1_diff_ci95"]
        return {"met": diff >= -MAX_TOP1_DROP and half <= MAX_CI_HALF_WIDTH, "value": diff,
                "text": f"top-1 {student:.2f} vs teacher {teacher:.2f}: {diff:+.2f} +- {half:.2f} points (95% "
                        f"interval, paired on {paired['images']:.0f} images; goal >= -{MAX_TOP1_DROP} with an "
                        f"interval within +-{MAX_CI_HALF_WIDTH})"}

    def gmacs(s: dict) -> dict:
        dense, pruned = s["evaluate"]["teacher"]["student_gmacs"], s["evaluate"][name]["student_gmacs"]
        saving = 1 - pruned / dense
        return {"met": saving >= MIN_GMACS_SAVING, "value": saving,
                "text": f"{pruned * 1e3:.1f} vs {dense * 1e3:.1f} MMACs per image ({saving:.1%} fewer; "
                        f"goal >= {MIN_GMACS_SAVING:.0%})"}

    def precision(s: dict) -> dict:
        row = s["measured"]["models"][name]
        ratio = row["precision_over_random"]
        return {"met": ratio >= MIN_PRECISION_OVER_RANDOM, "value": ratio,
                "text": f"kept-token precision {row['kept_token_precision']:.3f} vs random "
                        f"{row['random_precision']:.3f} ({ratio:.2f}x; goal >= {MIN_PRECISION_OVER_RANDOM:.0f}x)"}

    def speedup(s: dict) -> dict:
        value = s["measured"]["models"][name]["speedup_vs_teacher"]
        return {"met": value > 1.0, "value": value, "text": f"measured CPU speed-up over the teacher {value:.2f}x"}

    return {f"{name} accuracy": accuracy, f"{name} GMACs": gmacs, f"{name} kept-token precision": precision,
            f"{name} CPU speed-up": speedup}


def _teacher_goal(s: dict) -> dict:
    top1 = s["evaluate"]["teacher"]["student_top1"]
    return {"met": top1 >= MIN_TEACHER_TOP1, "value": top1,
            "text": f"dense teacher top-1 {top1:.2f} (goal >= {MIN_TEACHER_TOP1:.0f})"}


GOALS = {"teacher accuracy": _teacher_goal} | {k: v for name in STUDENTS for k, v in _student_goals(name).items()}


def write_report(summary: dict, path: str) -> None:
    """report.md: what ran, the results table, the goals (met or missed, plainly), the figures."""
    ev, meas, sec = summary["evaluate"], summary["measured"]["models"], summary["seconds"]
    data = summary["data"]
    lines = [
        "# Demo report", "",
        f"Embedded digits-in-clutter set: {data['num_train']} train / {data['num_val']} val images, "
        f"{data['canvas']} px, the digit covers {data['mean_box_patch_fraction']:.1%} of the "
        f"{data['patch']}-px patches on average. {summary['procs']} CPU ranks per training run; total "
        f"{sec['total'] / 60:.1f} min (data {sec['data']:.0f} s, teacher {sec['teacher']:.0f} s, DynamicViT "
        f"{sec['dynamicvit']:.0f} s, AS-ViT {sec['asvit']:.0f} s, evaluation and report "
        f"{sec['evaluate_and_report']:.0f} s).", "",
        "| model | launcher | top-1 | top-5 | MMACs / image | keep ratio per stage | CPU img/s | speed-up "
        "| kept-token precision (random) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    launchers = {"teacher": "accelerate launch", "dynamicvit": "launch.sh (DeepSpeed ZeRO-2)",
                 "asvit": "launch.sh (DeepSpeed ZeRO-2)"}
    for name in ("teacher", *STUDENTS):
        e, m = ev[name], meas[name]
        keep = ", ".join(f"{e[k]:.2f}" for k in sorted(k for k in e if k.startswith("keep_ratio/"))) or "-"
        prec = (f"{m['kept_token_precision']:.3f} ({m['random_precision']:.3f})"
                if "kept_token_precision" in m else "-")
        lines.append(f"| {name} | {launchers[name]} | {e['student_top1']:.2f} | {e['student_top5']:.2f} | "
                     f"{e['student_gmacs'] * 1e3:.1f} | {keep} | {m['cpu_img_s']:.0f} | "
                     f"{m.get('speedup_vs_teacher', 1.0):.2f}x | {prec} |")
    timing = summary["measured"]
    lines += ["", f"CPU img/s: batch {timing['batch_size']}, {timing['threads']} threads, the three models timed "
              f"alternately in one process (median of {timing['iters']}).", "",
              "## What pruning cost", "",
              "As the papers report it: the accuracy change against the compute saved. The change is paired (the "
              "student and the teacher on the same val images), with its 95% interval.", "",
              "| student | GMACs saved | top-1 change vs teacher (95% interval) | images only the student / only "
              "the teacher gets right |", "|---|---|---|---|"]
    dense = ev["teacher"]["student_gmacs"]
    for name in STUDENTS:
        p = meas[name]["paired"]
        lines.append(f"| {name} | {1 - ev[name]['student_gmacs'] / dense:.1%} | {p['top1_diff']:+.2f} "
                     f"+- {p['top1_diff_ci95']:.2f} points | {p['student_only_right']:.0f} / "
                     f"{p['teacher_only_right']:.0f} |")
    ort = summary["measured"]["onnxruntime"]
    lines += ["", "## Deployed: ONNX Runtime", "",
              "`python -m trainer.export --checkpoint OUT/<run> --out OUT/onnx/<run>.onnx --format onnx` wrote each "
              "graph (the student's with a fixed token count per stage and a dynamic batch axis) and checked it "
              f"against PyTorch. ONNX Runtime (CPUExecutionProvider) timed the files alternately on the same val "
              f"batch of {ort['batch_size']} (median of {ort['iters']}), preprocessed with the mean and std the "
              "files carry.", "",
              "| model | file | MB | tokens kept per stage | max abs logit diff vs PyTorch | ONNX Runtime img/s "
              "| speed-up in ONNX Runtime | speed-up in PyTorch |", "|---|---|---|---|---|---|---|---|"]
    for name, row in ort["models"].items():
        counts = ", ".join(map(str, row["keep_counts"])) or "all"
        lines.append(f"| {name} | {row['file']} | {row['megabytes']:.1f} | {counts} | {row['max_abs_diff']:.1e} | "
                     f"{row['img_s']:.0f} | {row['speedup_vs_teacher']:.2f}x | "
                     f"{meas[name].get('speedup_vs_teacher', 1.0):.2f}x |")
    lines += ["", "## Goals", ""]
    for name, goal in summary["goals"].items():
        lines.append(f"- **{'met' if goal['met'] else 'MISSED'}**: {name}: {goal['text']}")
    lines += ["", "## Figures", "", f"![loss and keep-ratio curves]({summary['measured']['curves_png']})", ""]
    for name in STUDENTS:
        lines += [f"Kept tokens, {name} (image, then each pruning stage; dropped patches faded):", "",
                  f"![{name} kept tokens]({meas[name]['overlay_png']})", ""]
    lines += ["## TensorBoard", "", f"`tensorboard --logdir {summary['out']}` shows the three runs side by side "
              "(loss terms, lr, keep ratios, GMACs, img/s, eval top-1, kept-token images).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
