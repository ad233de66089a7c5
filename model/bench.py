"""Side-by-side timings of dense vs pruned models, in one process (ratios are what count on shared CPUs).

    python -m model.bench inference --arch deit_small_patch16_224 --gate dynamicvit --keep-ratio 0.7 \
        --batch-size 16 --device cpu
    python -m model.bench inference --runtime onnxruntime --arch deit_small_patch16_224 --batch-size 32
    python -m model.bench train-step --arch deit_small_patch16_224 --gate dynamicvit --batch-size 16
    python -m model.bench train-step --arch deit_small_patch16_224 --attention bias,fold,chunked --batch-size 16

Each prints one JSON line. Dense and pruned calls alternate after a warm-up and the medians are
compared, so load from other processes hits both sides alike.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F

from model.attention import ATTENTION_IMPLS, check_attention
from model.flops import count_flops
from model.student import PrunedViT, create_student
from model.teacher import Teacher

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense peak TFLOP/s per device and dtype (vendor datasheets, no sparsity): the MFU denominator.
# SXM parts; PCIe/NVL variants are a little lower, so their MFU reads a little low.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """The device's dense peak for `dtype`, when known (None on CPUs and unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks.get(dtype) for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, iters: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU seconds per call of each function, calls interleaved.

    Interleaving shares background load between the sides. CPU time is the steadier measure on a
    shared machine with one thread (time spent descheduled is not counted); with several threads
    it also counts OpenMP spin-waits, so there wall time is the one to read.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    median = lambda samples: {name: statistics.median(times) for name, times in samples.items()}
    return median(wall), median(cpu)


def _autocast(device: torch.device, dtype: str) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=_DTYPES[dtype], enabled=dtype != "fp32")


def _environment(
    device: torch.device, dtype: str, wall: dict[str, float], cpu: dict[str, float]
) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    env = {"device": name, "dtype": dtype, "torch": torch.__version__, "timm": timm.__version__}
    if device.type == "cpu":
        # CPU seconds per wall second of the dense side: near the thread count when the cores were
        # ours, near 1 (with 2 threads) when another process held a core and the timings are suspect.
        env["cpu_per_wall"] = round(cpu["dense"] / wall["dense"], 2)
    return env


def _eval_student(arch: str, gate: str, keep_ratio: float, flops_budget: float, img_size: int | None,
                  batch_size: int, device: torch.device) -> tuple[PrunedViT, torch.Tensor]:
    """A randomly initialised student in eval mode and a random batch at its input size."""
    student = create_student(arch, gate, keep_ratio, flops_budget, img_size=img_size).eval().to(device)
    images = torch.randn(batch_size, 3, *student.vit.patch_embed.img_size, device=device)
    if gate == "asvit":  # untrained thresholds keep nearly everything: time them at the budget instead
        student.calibrate_thresholds(images)
    return student, images


def bench_inference(
    arch: str = "deit_small_patch16_224",
    gate: str = "dynamicvit",
    keep_ratio: float = 0.7,
    flops_budget: float = 0.65,
    batch_size: int = 16,
    img_size: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    warmup: int = 2,
    iters: int = 10,
) -> dict[str, Any]:
    """Eval-mode img/s of the dense timm model vs the pruned student (same weights), and their GMACs."""
    dev = torch.device(device)
    student, images = _eval_student(arch, gate, keep_ratio, flops_budget, img_size, batch_size, dev)
    size = student.vit.patch_embed.img_size
    with torch.inference_mode(), _autocast(dev, dtype):
        seconds, cpu = time_alternating(
            {"dense": lambda: student.vit(images), "pruned": lambda: student(images)}, dev, warmup, iters
        )
        student(images)  # the counts below are those of this batch size (AS-ViT depends on it)
    dense_g, pruned_g = count_flops(student.vit, size), count_flops(student, size)
    return {
        "bench": "inference", "arch": arch, "gate": gate, "keep_ratio": keep_ratio, "batch_size": batch_size,
        "img_size": list(size), "dense_img_s": round(batch_size / seconds["dense"], 2),
        "pruned_img_s": round(batch_size / seconds["pruned"], 2),
        "speedup": round(seconds["dense"] / seconds["pruned"], 3),
        "speedup_cpu_time": round(cpu["dense"] / cpu["pruned"], 3),
        "gmacs_dense": round(dense_g, 3), "gmacs_pruned": round(pruned_g, 3),
        "gmacs_ratio": round(dense_g / pruned_g, 3), "keep_counts": student.last_keep_counts,
        "iters": iters, **_environment(dev, dtype, seconds, cpu),
    }


def bench_onnxruntime(
    arch: str = "deit_small_patch16_224",
    gate: str = "dynamicvit",
    keep_ratio: float = 0.7,
    flops_budget: float = 0.65,
    batch_size: int = 32,
    img_size: int | None = None,
    warmup: int = 2,
    iters: int = 10,
    threads: int = 0,
) -> dict[str, Any]:
    """Dense vs pruned exported to ONNX and run by ONNX Runtime (CPU), side by side: img/s at batch_size and
    latency at batch 1; PyTorch's eval speed-up at batch_size in the same run, for comparison."""
    from model.deploy import StaticPrunedViT, deploy_keep_counts, export_onnx, onnx_session, require

    ort = require("onnxruntime")
    cpu = torch.device("cpu")
    student, images = _eval_student(arch, gate, keep_ratio, flops_budget, img_size, batch_size, cpu)
    size = student.vit.patch_embed.img_size
    counts = deploy_keep_counts(student, size[0], images)
    graph = StaticPrunedViT(student, counts).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": os.path.join(tmp, "dense.onnx"), "pruned": os.path.join(tmp, "pruned.onnx")}
        export_onnx(student.vit, images, paths["dense"])
        export_onnx(graph, images, paths["pruned"])
        sessions = {name: onnx_session(path, threads) for name, path in paths.items()}
    timings = {}
    for label, batch, calls in (("batch", batch_size, iters), ("latency", 1, iters * 5)):
        feed = {"images": images[:batch].numpy()}
        fns = {name: (lambda s=session, f=feed: s.run(None, f)) for name, session in sessions.items()}
        timings[label] = time_alternating(fns, cpu, warmup, calls)
    with torch.inference_mode():
        torch_wall, _ = time_alternating({"dense": lambda: student.vit(images), "pruned": lambda: graph(images)},
                                         cpu, warmup, iters)
    (wall, cpu_s), (latency, _) = timings["batch"], timings["latency"]
    dense_g, pruned_g = count_flops(student.vit, size), count_flops(student, size, counts)
    speedup = wall["dense"] / wall["pruned"]
    return {
        "bench": "inference", "runtime": "onnxruntime", "arch": arch, "gate": gate, "keep_ratio": keep_ratio,
        "flops_budget": flops_budget, "batch_size": batch_size, "img_size": list(size), "keep_counts": counts,
        "dense_img_s": round(batch_size / wall["dense"], 2), "pruned_img_s": round(batch_size / wall["pruned"], 2),
        "speedup": round(speedup, 3), "latency_dense_ms": round(latency["dense"] * 1e3, 3),
        "latency_pruned_ms": round(latency["pruned"] * 1e3, 3),
        "latency_speedup": round(latency["dense"] / latency["pruned"], 3),
        "torch_speedup": round(torch_wall["dense"] / torch_wall["pruned"], 3),
        "gmacs_dense": round(dense_g, 3), "gmacs_pruned": round(pruned_g, 3),
        "gmacs_ratio": round(dense_g / pruned_g, 3),
        "speedup_over_gmacs_ratio": round(speedup / (dense_g / pruned_g), 3),
        "iters": iters, "latency_iters": iters * 5, "onnxruntime": ort.__version__, "ort_threads": threads or "default",
        **_environment(cpu, "fp32", wall, cpu_s),
    }


def _train_step(
    model: PrunedViT, images: torch.Tensor, labels: torch.Tensor, dev: torch.device, dtype: str
) -> None:
    with _autocast(dev, dtype):
        out = model(images)
        loss = F.cross_entropy(out.logits, labels)
        if out.keep_masks:
            # Stand-in for the gate losses so their backward is timed too.
            loss = loss + sum((m.mean() - 0.5) ** 2 for m in out.keep_masks) + 0.0 * out.gmacs.mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def _candidate_steps(
    gated: PrunedViT, names: list[str], images: torch.Tensor, labels: torch.Tensor, dev: torch.device, dtype: str
) -> dict[str, Callable[[], None]]:
    """One train step per extra attention implementation, each on its own copy of the gated student."""
    steps: dict[str, Callable[[], None]] = {}
    for name in names:
        model = copy.deepcopy(gated)
        model.attention = check_attention(name)
        steps[f"gated_{name}"] = functools.partial(_train_step, model, images, labels, dev, dtype)
    return steps


def bench_train_step(
    arch: str = "deit_small_patch16_224",
    gate: str = "dynamicvit",
    keep_ratio: float = 0.7,
    flops_budget: float = 0.65,
    batch_size: int = 16,
    img_size: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    warmup: int = 1,
    iters: int = 5,
    with_reference: bool = False,
    attention: str | list[str] = "bias",
) -> dict[str, Any]:
    """Side by side: forward+backward of the dense and the gated student, and the teacher's forward.

    A distillation step costs gated + teacher; `step_img_s` and `mfu` describe that sum. Model FLOPs
    are counted as the training computes them: the gated student masks tokens instead of dropping them
    (every token is computed), so its forward+backward is 3x the dense forward, plus the teacher's forward.
    `attention` may list several masked-attention implementations: the first is `gated`, and every one
    is timed in the same interleaved loop, reported under `attention_candidates` (step_s, overhead).
    """
    names = [attention] if isinstance(attention, str) else list(attention)
    dev = torch.device(device)
    gated = create_student(arch, gate, keep_ratio, flops_budget, img_size=img_size, attention=names[0])
    gated = gated.train().to(dev)
    dense = PrunedViT(copy.deepcopy(gated.vit), gate="none").train().to(dev)
    teacher = Teacher(copy.deepcopy(gated.vit)).to(dev)
    size = gated.vit.patch_embed.img_size
    images = torch.randn(batch_size, 3, *size, device=dev)
    labels = torch.randint(0, gated.vit.num_classes, (batch_size,), device=dev)

    def teacher_forward() -> None:
        with torch.inference_mode(), _autocast(dev, dtype):
            teacher(images)

    steps = {
        "dense": lambda: _train_step(dense, images, labels, dev, dtype),
        "gated": lambda: _train_step(gated, images, labels, dev, dtype),
        "teacher": teacher_forward,
    }
    if with_reference:
        # DynamicViT's own explicit N x N fp32 masked softmax: the anchor the fused path should beat.
        reference = copy.deepcopy(gated)
        for blk in reference.vit.blocks:
            blk.attn.fused_attn = False
        steps["reference"] = lambda: _train_step(reference, images, labels, dev, dtype)
    steps.update(_candidate_steps(gated, names[1:], images, labels, dev, dtype))
    seconds, cpu = time_alternating(steps, dev, warmup, iters)
    extra: dict[str, Any] = {"attention": names[0]}
    if len(names) > 1:
        keys = {names[0]: "gated", **{name: f"gated_{name}" for name in names[1:]}}
        extra["attention_candidates"] = {
            name: {"step_s": round(seconds[key], 4), "overhead": round(seconds[key] / seconds["dense"], 3),
                   "overhead_cpu_time": round(cpu[key] / cpu["dense"], 3)}
            for name, key in keys.items()
        }
    if with_reference:
        extra.update({
            "reference_step_s": round(seconds["reference"], 4),
            "reference_overhead": round(seconds["reference"] / seconds["dense"], 3),
            "reference_overhead_cpu_time": round(cpu["reference"] / cpu["dense"], 3),
        })
    step_s = seconds["gated"] + seconds["teacher"]
    dense_gmacs = count_flops(gated.vit, size)
    # 2 FLOPs per MAC; backward ~2x forward; the teacher runs forward only.
    step_tflop = batch_size * 2 * dense_gmacs * (3 + 1) / 1e3
    peak = peak_tflops(dev, dtype)
    if peak is not None:
        extra["peak_tflops"] = peak
        extra["mfu"] = round(step_tflop / step_s / peak, 4)
    return {
        "bench": "train-step", "arch": arch, "gate": gate, "keep_ratio": keep_ratio, "batch_size": batch_size,
        "img_size": list(size), "dense_step_s": round(seconds["dense"], 4),
        "gated_step_s": round(seconds["gated"], 4), "teacher_forward_s": round(seconds["teacher"], 4),
        "overhead": round(seconds["gated"] / seconds["dense"], 3),
        "overhead_cpu_time": round(cpu["gated"] / cpu["dense"], 3),
        "teacher_forward_over_dense_step": round(seconds["teacher"] / seconds["dense"], 3),
        "dense_img_s": round(batch_size / seconds["dense"], 2), "gated_img_s": round(batch_size / seconds["gated"], 2),
        "step_img_s": round(batch_size / step_s, 2), "step_tflop_per_s": round(step_tflop / step_s, 3), **extra,
        "iters": iters, **_environment(dev, dtype, seconds, cpu),
    }


def _attention_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        if not names:
            raise ValueError("empty attention list")
        return [check_attention(name) for name in names]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by both benchmarks (also used by `python -m trainer.bench`)."""
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument("--gate", default="dynamicvit", choices=["dynamicvit", "asvit"])
    parser.add_argument("--keep-ratio", type=float, default=0.7)
    parser.add_argument("--flops-budget", type=float, default=0.65)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 16 (torch), 32 (onnxruntime; batch 1 is always timed too)")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch and ONNX Runtime (default: each library's own)")
    parser.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                        help="inference: PyTorch eval, or both models exported to ONNX and run by ONNX Runtime (CPU)")
    parser.add_argument(
        "--with-reference", action="store_true", help="train-step: also time the explicit-softmax path"
    )
    parser.add_argument(
        "--attention", default="bias", type=_attention_list,
        help=f"train-step: masked attention of the gated student, or a comma list timed side by side "
             f"(the first is 'gated'); any of {', '.join(ATTENTION_IMPLS)}",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark named by args.bench with parsed options."""
    if args.threads:
        torch.set_num_threads(args.threads)
    onnx = args.bench == "inference" and args.runtime == "onnxruntime"
    if args.runtime == "onnxruntime" and not onnx:
        raise SystemExit("--runtime onnxruntime: for the inference bench only")
    if onnx and (args.device != "cpu" or args.dtype != "fp32"):
        raise SystemExit("--runtime onnxruntime: fp32 on the CPU (CPUExecutionProvider) only")
    if args.batch_size is None:
        args.batch_size = 32 if onnx else 16
    names = ("arch", "gate", "keep_ratio", "flops_budget", "batch_size", "img_size")
    kwargs = {k: getattr(args, k) for k in names}
    kwargs.update({k: getattr(args, k) for k in ("warmup", "iters") if getattr(args, k) is not None})
    if onnx:
        return bench_onnxruntime(**kwargs, threads=args.threads or 0)
    fn = bench_inference if args.bench == "inference" else bench_train_step
    kwargs.update(device=args.device, dtype=args.dtype)
    if args.bench == "train-step":
        kwargs["with_reference"] = args.with_reference
        kwargs["attention"] = args.attention
    return fn(**kwargs)


def main(argv: list[str] | None = None) -> None:
    """CLI entry: one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=["inference", "train-step"])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args(argv))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
