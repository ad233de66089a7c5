"""The command line of `trainer.train` and `trainer.check_config`, and the fast first config check.

Importing this module costs milliseconds (no torch, timm or deepspeed): `reject_invalid_config` runs
before `trainer.train` imports its modules, so a bad key or value fails every rank of a launch in a
fraction of a second, naming the key, and before any process group exists. The checks that need the
model (patch size, depth, weight files) follow right after, importing only torch and timm.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from trainer.config import Config, ConfigError, load_config, validate

_checked: dict[tuple, Config] = {}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """--config, --set (repeatable), --resume, and the --local_rank that the DeepSpeed launcher appends."""
    p = argparse.ArgumentParser(prog="python -m trainer.train",
                                description="Train a token-pruned ViT student, distilled from its dense teacher.")
    p.add_argument("--config", help="YAML config (see trainer/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set prune.keep_ratio=0.6 (repeatable)")
    p.add_argument("--resume", help="shorthand for --set ckpt.resume=VALUE (auto | none | DIR)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def overrides(args: argparse.Namespace) -> list[str]:
    """The --set list with --resume folded in."""
    return list(args.overrides) + ([f"ckpt.resume={args.resume}"] if args.resume else [])


def launcher_world_size() -> int | None:
    """WORLD_SIZE as set by torchrun/deepspeed/accelerate before any process group; None outside a launcher."""
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None


def checked_config(argv: Sequence[str] | None, world_size: int | None) -> Config:
    """Load and fully validate (ConfigError otherwise), cheap checks first; remembered per (argv, world
    size), so the early check and `trainer.train.main` do the work, and read the weight files, once.
    world_size None: not known yet (launch.sh before the ranks exist)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    key = (*argv, world_size)
    if key not in _checked:
        args = parse_args(argv)
        cfg = load_config(args.config, overrides(args))
        validate(cfg, world_size=world_size, check_model=False)  # cheap checks first: no torch import
        _checked[key] = validate(cfg, world_size=world_size)
    return _checked[key]


def reject_invalid_config(argv: Sequence[str] | None = None) -> None:
    """Exit 2 with `config error: <key>=<value>: why` if the config is invalid, else return."""
    try:
        checked_config(argv, launcher_world_size() or 1)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skip interpreter teardown (about a second once torch is imported): nothing needs cleaning up yet.
        os._exit(2)
