"""The command line of `trainer.train` and `trainer.check_config`, and the config checks they both run.

Importing this module costs milliseconds (no torch, timm or deepspeed). `load_checked_config` checks
in two passes: first everything that needs no torch (a bad key or value fails every rank of a launch
in a fraction of a second, naming the key, before any process group exists), then the checks that need
the model (patch size, depth, weight files), importing only torch and timm.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from trainer.accelerate_env import apply_accelerate_env
from trainer.config import Config, load_config, validate, validate_model


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


def load_checked_config(args: argparse.Namespace, world_size: int | None) -> Config:
    """Load and validate (ConfigError otherwise), the checks that need no torch first. world_size None: not
    known yet (launch.sh before the ranks exist)."""
    cfg = load_config(args.config, overrides(args))
    for note in apply_accelerate_env(cfg, os.environ):
        if os.environ.get("RANK", "0") == "0":
            print(f"accelerate launch config: {note}", flush=True)
    validate(cfg, world_size=world_size, check_model=False)
    validate_model(cfg)
    return cfg
