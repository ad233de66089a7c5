"""Validate a config without training: `python -m trainer.check_config --config F [--set k=v ...]`.

launch.sh runs it before starting any node, so a typo costs seconds, not a cluster allocation. The
checks are the ones `trainer.train` runs on every rank (`trainer.cli.load_checked_config`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from trainer.cli import launcher_world_size, load_checked_config, parse_args
from trainer.config import ConfigError


def main(argv: Sequence[str] | None = None) -> None:
    """Exit 0 and print the run dir when the config is valid; exit 2 naming the key otherwise."""
    try:
        cfg = load_checked_config(parse_args(argv), launcher_world_size())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"config ok: run dir {cfg.run_dir}")


if __name__ == "__main__":
    main()
