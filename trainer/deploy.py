"""Deployable graphs of a trained student: ONNX (ONNX Runtime, TensorRT) and torch.export programs (.pt2).

    python -m trainer.export --checkpoint runs/x --out model.onnx --format onnx [--img-size S] [--opset N]
    python -m trainer.export --checkpoint runs/x --out model.pt2 --format torch-export

Every shape in the graph is fixed except the batch axis: each gate keeps the same number of tokens for every
image (model.deploy). DynamicViT keeps its eval counts int(N rho^(s+1)). AS-ViT keeps, at each stage, the
mean count its thresholds pass on calibration images (the run's data.val, or --calibration-data; or
--keep-counts), ranked by its score: the same average budget, without the per-image variation.

The file carries what a deployer needs: ONNX metadata_props (the .pt2's `prunevit.json` extra file) hold
input_size, mean, std, crop_pct, crop_mode, interpolation, num_classes, the keep counts and GMACs. After
writing, the export runs its file against the PyTorch model and reports the largest logit difference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from data import DeviceAugment
from data.sources import redact
from data.transforms import MEAN, STD
from model.deploy import (
    DEFAULT_OPSET,
    StaticPrunedViT,
    check_keep_counts,
    deploy_keep_counts,
    expected_attention_tokens,
    export_onnx,
    export_program,
    onnx_attention_tokens,
    onnx_session,
)
from model.flops import count_flops
from model.student import PrunedViT
from trainer.config import Config, find_run_config, load_config
from trainer.infra.checkpoint import resolve_checkpoint
from trainer.infra.ema import read_ema_weights
from trainer.loop.build import build_eval_loader, build_student, resolved_augment

GRAPH_FORMATS = ("onnx", "torch-export")
VERIFY_IMAGES = 8  # images the export runs through its file and PyTorch to report the logit difference


@dataclass
class GraphOptions:
    """What `trainer.export --format onnx|torch-export` takes besides --checkpoint and --out."""

    fmt: str = "onnx"
    ema: bool = False
    allow_pickle: bool = False
    config: str | None = None
    img_size: int | None = None
    opset: int = DEFAULT_OPSET
    calibration_data: str | None = None
    calibration_images: int = 256
    keep_counts: list[int] = field(default_factory=list)


def load_run_student(checkpoint: str, opts: GraphOptions) -> tuple[PrunedViT, Config]:
    """The run's student in eval mode with its (or its EMA) weights, at opts.img_size when given."""
    config_path = opts.config or find_run_config(checkpoint)
    if config_path is None:
        raise FileNotFoundError(f"no config.yaml found for {checkpoint}: pass --config (the run's config)")
    cfg = load_config(config_path)
    cfg.ckpt.allow_pickle = cfg.ckpt.allow_pickle or opts.allow_pickle
    student = build_student(cfg, checkpoint)
    if opts.ema:
        student.load_state_dict(read_ema_weights(resolve_checkpoint(checkpoint)))
    if opts.img_size and opts.img_size != cfg.model.img_size:
        # timm resamples the position embedding to the new grid (as when it loads weights at another size).
        student.vit.set_input_size(img_size=opts.img_size)
        cfg.model.img_size = opts.img_size
    return student.float().eval(), cfg


def data_images(cfg: Config, student: PrunedViT, data: str | None, count: int) -> torch.Tensor | None:
    """Up to `count` normalised eval images of `data` (default: the run's data.val); None without data."""
    source = data or cfg.data.val
    if not source or count <= 0:
        return None
    aug = resolved_augment(cfg, student)
    batch = next(iter(build_eval_loader(cfg, aug, source, cfg.data.val_split, count)))
    images = batch["image"][batch["valid"]] if "valid" in batch else batch["image"]
    return DeviceAugment(aug, cfg.model.num_classes).normalize(images)


def graph_metadata(cfg: Config, student: PrunedViT, keep_counts: list[int], weights: str, source: str) -> dict:
    """Preprocessing, classes and pruning facts for metadata_props (JSON-encoded values)."""
    img = cfg.model.img_size
    aug = resolved_augment(cfg, student)
    facts = {
        "input_size": [3, img, img], "mean": list(MEAN), "std": list(STD), "crop_pct": aug.crop_pct,
        "crop_mode": "center", "interpolation": aug.interpolation, "num_classes": cfg.model.num_classes,
        "input": "float32 NCHW RGB: resize to input/crop_pct, centre crop, pixel/255, (x - mean) / std",
        "arch": cfg.model.arch, "gate": cfg.prune.gate, "keep_counts": keep_counts,
        "gmacs": float(f"{count_flops(student, img, keep_counts):.6g}"),
        "gmacs_dense": float(f"{count_flops(student.vit, img):.6g}"), "weights": weights, "checkpoint": source,
    }
    return {key: json.dumps(value) for key, value in facts.items()}


def export_graph(checkpoint: str, out: str, opts: GraphOptions) -> dict:
    """Write the ONNX or .pt2 file and check it against PyTorch; returns what the CLI prints."""
    if opts.fmt not in GRAPH_FORMATS:
        raise ValueError(f"--format {opts.fmt!r}: one of {GRAPH_FORMATS}")
    student, cfg = load_run_student(checkpoint, opts)
    img = cfg.model.img_size
    wanted = opts.calibration_images if student.gate_type == "asvit" and not opts.keep_counts else VERIFY_IMAGES
    images = data_images(cfg, student, opts.calibration_data, wanted)
    if opts.keep_counts:
        keep_counts = list(opts.keep_counts)
    elif student.gate_type == "asvit" and images is None:
        raise ValueError(f"{checkpoint}: an AS-ViT export fixes its keep counts from calibration images, and the "
                         "run has no data.val: pass --calibration-data DIR (or --keep-counts K1,K2,K3)")
    else:
        keep_counts = deploy_keep_counts(student, img, images)
    check_keep_counts(student, img, keep_counts)
    graph = StaticPrunedViT(student, keep_counts).eval()
    if images is None:
        images = torch.randn(VERIFY_IMAGES, 3, img, img, generator=torch.Generator().manual_seed(0))
    images = images[:VERIFY_IMAGES]
    source = os.path.abspath(checkpoint)
    metadata = graph_metadata(cfg, student, keep_counts, "ema" if opts.ema else "raw", source)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if opts.fmt == "onnx":
        export_onnx(graph, images, out, opts.opset, metadata)
    else:
        export_program(graph, images, out, metadata)
    result = {"checkpoint": source, "out": out, "format": opts.fmt, "img_size": img, "keep_counts": keep_counts,
              "gmacs": json.loads(metadata["gmacs"]), "gmacs_dense": json.loads(metadata["gmacs_dense"]),
              "weights": "ema" if opts.ema else "raw", "megabytes": round(_size(out) / 2**20, 2)}
    if opts.calibration_data:
        result["calibration_data"] = redact(opts.calibration_data)
    return result | verify_graph(out, opts.fmt, graph, images)


def _size(path: str) -> int:
    extra = path + ".data"  # weights the ONNX writer puts beside a graph over 2 GB
    return os.path.getsize(path) + (os.path.getsize(extra) if os.path.exists(extra) else 0)


@torch.no_grad()
def verify_graph(path: str, fmt: str, graph: StaticPrunedViT, images: torch.Tensor) -> dict:
    """Largest |logit difference| between the file and PyTorch at batch 1 and batch N; for ONNX, the tokens
    each block's attention runs on, read from the graph, against the keep counts."""
    if fmt == "onnx":
        session = onnx_session(path)
        run = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    else:
        module = torch.export.load(path).module()
        run = lambda x: module(x)
    diff = max(float((run(x) - graph(x)).abs().max()) for x in (images[:1], images))
    result = {"max_abs_diff": diff, "verified_batches": [1, int(images.shape[0])]}
    if fmt == "onnx":
        found = onnx_attention_tokens(path)
        expected = expected_attention_tokens(graph.student, images.shape[-1], graph.keep_counts)
        if found != expected:
            raise RuntimeError(f"{path}: the graph's attention runs on {found} tokens per block, expected {expected}")
        result["attention_tokens"] = found
    return result
