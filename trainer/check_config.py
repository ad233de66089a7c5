"""Validate a config without training: `python -m trainer.check_config --config F [--set k=v ...]`.

launch.sh runs it before starting any node, so a typo costs seconds, not a cluster allocation.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from trainer.config import ConfigError, load_config, validate
from trainer.train import parse_args


def main(argv: Sequence[str] | None = None) -> None:
    """Exit 0 and print the run dir when the config is valid; exit 2 naming the key otherwise."""
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"ckpt.resume={args.resume}"] if args.resume else [])
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    try:
        cfg = validate(load_config(args.config, overrides), world_size=world)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"config ok: run dir {cfg.run_dir}")


if __name__ == "__main__":
    main()
