"""Validate a config without training: `python -m trainer.check_config --config F [--set k=v ...]`.

launch.sh runs it before starting any node, so a typo costs seconds, not a cluster allocation. The
checks are `trainer.cli.checked_config`'s: those that need no torch first (a bad key or value fails in
a fraction of a second), then the model-shape and weight-file checks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from trainer.cli import checked_config, launcher_world_size
from trainer.config import ConfigError


def main(argv: Sequence[str] | None = None) -> None:
    """Exit 0 and print the run dir when the config is valid; exit 2 naming the key otherwise."""
    try:
        cfg = checked_config(argv, launcher_world_size())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"config ok: run dir {cfg.run_dir}")


if __name__ == "__main__":
    main()
