"""Consolidated fp32 student weights from a training checkpoint (any ZeRO stage, or Accelerate).

    python -m trainer.export --checkpoint runs/x/checkpoints/step_00001000 --out student.safetensors
    python -m trainer.export --checkpoint runs/x --out student.safetensors      # its latest checkpoint

The file holds the student's state dict (`vit.*` + `gates.*`): `model.create_student(...,
checkpoint=FILE)` loads it, and the `vit.*` part loads into a plain timm model. A command-line leaf over
`trainer.infra.checkpoint`, which reads every checkpoint layout.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from safetensors.torch import save_file

from trainer.infra.checkpoint import consolidated_state_dict, resolve_checkpoint


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
