"""Evaluate a trained student: top-1/top-5, GMACs per image, keep ratios, dense vs pruned img/s.

    python -m trainer.evaluate --checkpoint runs/x [--data DIR] [--batch-size B] [--config FILE]

--checkpoint is a run dir, a checkpoint dir, or an exported .safetensors file; the model config comes
from the run's config.yaml (or --config for a bare file). Prints one JSON object. A command-line leaf:
the student comes from `trainer.loop.build.build_student`, the metrics from `trainer.loop.eval_loop`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import torch

from data import DeviceAugment
from data.sources import redact
from model.bench import time_alternating
from trainer.config import find_run_config, load_config
from trainer.loop.build import build_eval_loader, build_student, resolved_augment
from trainer.loop.eval_loop import evaluate


@torch.no_grad()
def dense_vs_pruned_img_s(student: torch.nn.Module, images: torch.Tensor, iters: int = 3) -> dict[str, float]:
    """Side-by-side eval throughput of the dense backbone and the pruned student on the same batch."""
    student.eval()
    wall, _ = time_alternating({"dense": lambda: student.vit(images), "pruned": lambda: student(images)},
                               images.device, warmup=1, iters=iters)
    n = images.shape[0]
    return {"dense_img_s": n / wall["dense"], "pruned_img_s": n / wall["pruned"],
            "speedup": wall["dense"] / wall["pruned"]}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir, or exported .safetensors")
    p.add_argument("--data", help="shard dir or pattern (default: the run's data.val)")
    p.add_argument("--split", default="", help="split of a shard folder (default: the run's data.val_split, else "
                   "val, or timm's validation)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--config", help="run config (default: the run's config.yaml)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoint files that need pickle (can run code: only for files you trust)")
    args = p.parse_args(argv)

    config_path = args.config or find_run_config(args.checkpoint)
    if config_path is None:
        p.error(f"no config.yaml found for {args.checkpoint}; pass --config")
    cfg = load_config(config_path)
    data = args.data or cfg.data.val
    if not data:
        p.error("no eval data: pass --data")
    cfg.ckpt.allow_pickle = cfg.ckpt.allow_pickle or args.allow_pickle
    student = build_student(cfg, args.checkpoint).eval()
    img = cfg.model.img_size
    aug = resolved_augment(cfg, student)
    loader = build_eval_loader(cfg, aug, data, args.split or cfg.data.val_split, args.batch_size,
                               workers=args.workers)
    normalize = DeviceAugment(aug, cfg.model.num_classes).normalize
    result = evaluate(student, student, loader, normalize, torch.device("cpu"), torch.float32, img)
    first = next(iter(loader))
    result.update(dense_vs_pruned_img_s(student, normalize(first["image"])))
    result.update({"checkpoint": os.path.abspath(args.checkpoint), "data": redact(data), "batch_size": args.batch_size,
                   "arch": cfg.model.arch, "gate": cfg.prune.gate, "img_size": img})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
