"""Run trainer.train while counting the host reads of tensor values that this project's own code makes.

    torchrun --nproc_per_node 2 tests/host_read_probe.py OUT_DIR --config FILE [--set ...]

A host read is `Tensor.item()`, `.tolist()`, or `float()` / `int()` / `bool()` of a tensor. On a GPU each one
waits for the device's queue to drain. Reads are attributed to the step being run (the loop's `apply_lr`
call opens each step) and counted only when the calling frame is a file of this repository: DeepSpeed's,
Accelerate's and torch's own reads are theirs. Writes OUT_DIR/host_reads_rank<r>.json:
{"<step>": ["file:line function", ...]} (steps 1-based; reads before the first step are not recorded).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, ".venv")
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

current_step: list[int | None] = [None]
reads: dict[int, list[str]] = defaultdict(list)


def _ours(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(REPO + os.sep) and not path.startswith(VENV + os.sep) and path != os.path.abspath(__file__)


def _counting(name: str):
    original = getattr(torch.Tensor, name)

    def wrapper(self, *args, **kwargs):
        step = current_step[0]
        if step is not None:
            caller = sys._getframe(1)
            if _ours(caller.f_code.co_filename):
                rel = os.path.relpath(caller.f_code.co_filename, REPO)
                reads[step].append(f"{rel}:{caller.f_lineno} {caller.f_code.co_name} ({name})")
        return original(self, *args, **kwargs)

    return wrapper


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    for name in READS:
        setattr(torch.Tensor, name, _counting(name))

    import trainer.loop.train_loop as loop

    apply_lr = loop.apply_lr

    def marking_apply_lr(param_groups, step, schedule):
        current_step[0] = step + 1  # the 1-based number of the step this loop iteration runs
        return apply_lr(param_groups, step, schedule)

    loop.apply_lr = marking_apply_lr
    from trainer.train import main as train_main

    try:
        train_main(argv)
    finally:
        rank = os.environ.get("RANK", "0")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"host_reads_rank{rank}.json"), "w") as f:
            json.dump({str(k): v for k, v in sorted(reads.items())}, f, indent=1)


if __name__ == "__main__":
    main()
