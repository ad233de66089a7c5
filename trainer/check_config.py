"""Validate a config without training: `python -m trainer.check_config --config F [--set k=v ...]`.

launch.sh runs it before starting any node, so a typo costs seconds, not a cluster allocation. The
checks that need no torch run first (a bad key or value fails in a fraction of a second); then the
model-shape and weight-file checks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from trainer.cli import launcher_world_size, overrides, parse_args
from trainer.config import ConfigError, load_config, validate


def main(argv: Sequence[str] | None = None) -> None:
    """Exit 0 and print the run dir when the config is valid; exit 2 naming the key otherwise."""
    args = parse_args(argv)
    world = launcher_world_size()
    try:
        cfg = load_config(args.config, overrides(args))
        validate(cfg, world_size=world, check_model=False)
        validate(cfg, world_size=world)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"config ok: run dir {cfg.run_dir}")


if __name__ == "__main__":
    main()
