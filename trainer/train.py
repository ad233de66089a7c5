"""Train a token-pruned ViT student, distilled from its dense teacher. One process per device.

    python -m trainer.train --config FILE [--set a.b=v ...]
    deepspeed --num_gpus N --module trainer.train --config FILE
    torchrun --nproc_per_node N -m trainer.train --config FILE
    accelerate launch -m trainer.train --config FILE --set backend.name=accelerate

A command-line leaf: it checks the config (cheap checks before torch is even imported), then calls
`trainer.loop.train_loop.train`, where the loop lives.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

from trainer.cli import launcher_world_size, load_checked_config, parse_args
from trainer.config import ConfigError


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: validate the config before any process group exists, then train."""
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_checked_config(args, launcher_world_size() or 1)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skip interpreter teardown (about a second once torch is imported): nothing needs cleaning up yet.
        os._exit(2)
    from trainer.infra import dist
    from trainer.infra.preemption import exit_preempted
    from trainer.loop.train_loop import train

    summary = train(cfg)
    dist.shutdown()
    if summary["stopped_early"]:
        exit_preempted()
    top1 = summary.get("student_top1")
    dist.print0(f"done: {summary['steps']} steps in {summary['wall_seconds']} s"
                + (f", student top-1 {top1:.2f}" if top1 is not None and math.isfinite(top1) else ""))


if __name__ == "__main__":
    main()
