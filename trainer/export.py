"""Consolidated fp32 student weights from a training checkpoint (any ZeRO stage, or Accelerate).

    python -m trainer.export --checkpoint runs/x/checkpoints/step_00001000 --out student.safetensors
    python -m trainer.export --checkpoint runs/x --out student.safetensors      # its latest checkpoint
    python -m trainer.export --checkpoint runs/x --out vit.safetensors --format timm   # plain timm keys
    python -m trainer.export --checkpoint runs/x --out ema.safetensors --ema           # the EMA weights

The file holds the student's state dict (`vit.*` + `gates.*`): `model.create_student(...,
checkpoint=FILE)` loads it, and the `vit.*` part loads into a plain timm model. A command-line leaf over
`trainer.infra.checkpoint`, which reads every checkpoint layout.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from trainer.infra.checkpoint import consolidated_state_dict, resolve_checkpoint
from trainer.infra.ema import read_ema_weights

FORMATS = ("student", "timm")


def timm_state_dict(student_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense ViT's weights under plain timm keys (the `vit.` prefix dropped, the gates left out)."""
    return {k[len("vit."):]: v for k, v in student_state.items() if k.startswith("vit.")}


def export(checkpoint: str, out: str, allow_pickle: bool = False, fmt: str = "student", ema: bool = False) -> str:
    """Write the consolidated fp32 safetensors file; returns the checkpoint directory used.

    `ema`: the run's EMA weights (ema.enabled) instead of the raw ones, in the same format.
    `student`: `vit.*` + `gates.*` (model.create_student(..., checkpoint=FILE) loads it). `timm`: plain timm keys,
    what timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=FILE)) loads."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {FORMATS}")
    directory = resolve_checkpoint(checkpoint)
    state = read_ema_weights(directory) if ema else consolidated_state_dict(directory, allow_pickle)
    if fmt == "timm":
        state = timm_state_dict(state)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(state, out, metadata={"source": os.path.abspath(directory), "format": f"prunevit-{fmt}",
                                    "weights": "ema" if ema else "raw"})
    return directory


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, checkpoints dir, or run dir")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--format", default="student", choices=FORMATS,
                   help="student: vit.* + gates.* (model.create_student loads it); timm: plain timm keys of the "
                   "dense ViT (timm.create_model(..., pretrained_cfg_overlay=dict(file=OUT)) loads it)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with ema.enabled=true)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoint files that need pickle (can run code: only for files you trust)")
    args = p.parse_args(argv)
    used = export(args.checkpoint, args.out, args.allow_pickle, args.format, args.ema)
    n = os.path.getsize(args.out) / 2**20
    print(json.dumps({"checkpoint": used, "out": args.out, "megabytes": round(n, 2)}))


if __name__ == "__main__":
    main()
