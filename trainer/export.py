"""Export a trained student: fp32 weights (any ZeRO stage, or Accelerate), or a deployable graph.

    python -m trainer.export --checkpoint runs/x/checkpoints/step_00001000 --out student.safetensors
    python -m trainer.export --checkpoint runs/x --out student.safetensors      # its latest checkpoint
    python -m trainer.export --checkpoint runs/x --out vit.safetensors --format timm   # plain timm keys
    python -m trainer.export --checkpoint runs/x --out ema.safetensors --ema           # the EMA weights
    python -m trainer.export --checkpoint runs/x --out model.onnx --format onnx [--img-size S] [--opset N]
    python -m trainer.export --checkpoint runs/x --out model.pt2 --format torch-export

`student` holds the student's state dict (`vit.*` + `gates.*`): `model.create_student(...,
checkpoint=FILE)` loads it, and the `vit.*` part loads into a plain timm model. `onnx` and
`torch-export` write the pruned eval graph with static token counts and a dynamic batch axis
(trainer.deploy; needs the `deploy` extra). A command-line leaf over `trainer.infra.checkpoint`, which reads
every checkpoint layout, and `trainer.deploy`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from model.deploy import DEFAULT_OPSET
from trainer.deploy import GRAPH_FORMATS, GraphOptions, export_graph
from trainer.infra.checkpoint import consolidated_state_dict, resolve_checkpoint
from trainer.infra.ema import read_ema_weights

WEIGHT_FORMATS = ("student", "timm")
FORMATS = WEIGHT_FORMATS + GRAPH_FORMATS


def timm_state_dict(student_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense ViT's weights under plain timm keys (the `vit.` prefix dropped, the gates left out)."""
    return {k[len("vit."):]: v for k, v in student_state.items() if k.startswith("vit.")}


def export(checkpoint: str, out: str, allow_pickle: bool = False, fmt: str = "student", ema: bool = False) -> str:
    """Write the consolidated fp32 safetensors file; returns the checkpoint directory used.

    `ema`: the run's EMA weights (ema.enabled) instead of the raw ones, in the same format.
    `student`: `vit.*` + `gates.*` (model.create_student(..., checkpoint=FILE) loads it). `timm`: plain timm keys,
    what timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=FILE)) loads."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {WEIGHT_FORMATS} (graphs: trainer.deploy.export_graph)")
    directory = resolve_checkpoint(checkpoint)
    state = read_ema_weights(directory) if ema else consolidated_state_dict(directory, allow_pickle)
    if fmt == "timm":
        state = timm_state_dict(state)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(state, out, metadata={"source": os.path.abspath(directory), "format": f"prunevit-{fmt}",
                                    "weights": "ema" if ema else "raw"})
    return directory


def _counts(text: str) -> list[int]:
    try:
        counts = [int(k) for k in text.split(",") if k.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--keep-counts {text!r}: comma-separated integers, e.g. 137,96,67") from e
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--keep-counts {text!r}: one count >= 1 per gate, e.g. 137,96,67")
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, checkpoints dir, or run dir")
    p.add_argument("--out", required=True, help="output file: .safetensors, .onnx or .pt2")
    p.add_argument("--format", default="student", choices=FORMATS,
                   help="student: vit.* + gates.* (model.create_student loads it); timm: plain timm keys of the "
                   "dense ViT (timm.create_model(..., pretrained_cfg_overlay=dict(file=OUT)) loads it); onnx: the "
                   "pruned eval graph for ONNX Runtime/TensorRT; torch-export: the same as a torch.export program")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with ema.enabled=true)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoint files that need pickle (can run code: only for files you trust)")
    graph = p.add_argument_group("onnx and torch-export")
    graph.add_argument("--img-size", type=int, help="input size of the graph (default: the run's model.img_size)")
    graph.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    graph.add_argument("--config", help="run config (default: the run's config.yaml)")
    graph.add_argument("--calibration-data", help="AS-ViT: shard dir or pattern whose images fix the keep counts "
                       "(default: the run's data.val)")
    graph.add_argument("--calibration-images", type=int, default=256, help="AS-ViT: how many (default 256)")
    graph.add_argument("--keep-counts", type=_counts, default=[],
                       help="tokens each gate keeps, e.g. 137,96,67 (default: DynamicViT's own; AS-ViT calibrated)")
    args = p.parse_args(argv)
    if args.format in GRAPH_FORMATS:
        opts = GraphOptions(args.format, args.ema, args.allow_pickle, args.config, args.img_size, args.opset,
                            args.calibration_data, args.calibration_images, args.keep_counts)
        try:
            print(json.dumps(export_graph(args.checkpoint, args.out, opts)))
        except (ImportError, ValueError, FileNotFoundError) as e:  # a missing extra, bad counts, no config
            sys.exit(f"trainer.export: {e}")
        return
    used = export(args.checkpoint, args.out, args.allow_pickle, args.format, args.ema)
    n = os.path.getsize(args.out) / 2**20
    print(json.dumps({"checkpoint": used, "out": args.out, "megabytes": round(n, 2)}))


if __name__ == "__main__":
    main()
