"""Consolidated fp32 student weights from a training checkpoint (any ZeRO stage, or Accelerate).

    python -m trainer.export --checkpoint runs/x/checkpoints/step_00001000 --out student.safetensors
    python -m trainer.export --checkpoint runs/x --out student.safetensors      # its latest checkpoint

The file holds the student's state dict (`vit.*` + `gates.*`): `model.create_student(...,
checkpoint=FILE)` loads it, and the `vit.*` part loads into a plain timm model.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from trainer import checkpoint as ckpt


def resolve_checkpoint(path: str) -> str:
    """A complete checkpoint directory from a run dir, a checkpoints dir, or a checkpoint itself."""
    for root in (path, os.path.join(path, "checkpoints")):
        if ckpt.is_complete(root):
            return root
        latest = ckpt.find_latest(root)
        if latest:
            return latest
    raise FileNotFoundError(f"{path}: no complete checkpoint (directory with a {ckpt.MARKER} marker) found")


def consolidated_state_dict(checkpoint_dir: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """fp32 student weights, using the consolidation of the backend that wrote the checkpoint; a file
    that needs pickle is refused unless allow_pickle (see trainer.safe_load)."""
    with open(os.path.join(checkpoint_dir, "trainer_state_rank0.json")) as f:
        backend = json.load(f).get("backend", "deepspeed")
    if backend == "deepspeed":
        from trainer.backends.deepspeed_backend import consolidate_fp32

        state = consolidate_fp32(checkpoint_dir, allow_pickle)
    else:  # Accelerate keeps the weights in model.safetensors: nothing to unpickle
        from trainer.backends.accelerate_backend import unwrap_state_dict

        state = unwrap_state_dict(checkpoint_dir)
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def export(checkpoint: str, out: str, allow_pickle: bool = False) -> str:
    """Write the consolidated fp32 safetensors file; returns the checkpoint directory used."""
    directory = resolve_checkpoint(checkpoint)
    state = consolidated_state_dict(directory, allow_pickle)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(state, out, metadata={"source": os.path.abspath(directory), "format": "prunevit-student"})
    return directory


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, checkpoints dir, or run dir")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoint files that need pickle (can run code: only for files you trust)")
    args = p.parse_args(argv)
    used = export(args.checkpoint, args.out, args.allow_pickle)
    n = os.path.getsize(args.out) / 2**20
    print(json.dumps({"checkpoint": used, "out": args.out, "megabytes": round(n, 2)}))


if __name__ == "__main__":
    main()
