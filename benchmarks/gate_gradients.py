"""Which loss term the DynamicViT gates follow: each term's gradient, at the start of a student run.

    python benchmarks/gate_gradients.py --config trainer/configs/demo.yaml \
        --set model.checkpoint=runs/demo/teacher.safetensors [--batches 3] [--batch-size 32]

Builds the student and the teacher exactly as a training run of that config starts (the student in
train mode, so the gates sample Gumbel decisions), takes `--batches` val batches, and prints one JSON
line per batch:

- `param_grad_norm`: the norm of each weighted loss term's gradient over the gates' parameters (what
  Adam sees, term by term);
- `mask_grad`: per stage, quantiles of |dL/d keep| per token for the CE and ratio terms, and how many
  tokens above 1 were dropped ones. DynamicViT's masked softmax gives a dropped token that held most of
  a row's attention a gradient of that attention over the kept mass (bounded only by 1/eps).

Written by hand: no library reports per-term gradients of a straight-through mask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, run from anywhere
from data import DeviceAugment
from trainer.config import load_config
from trainer.loop.build import build_eval_loader, build_student, build_teacher, resolved_augment
from trainer.loop.losses import LossWeights, compute_losses

QUANTILES = (0.5, 0.9, 0.99, 1.0)


def mask_gradient_stats(term: torch.Tensor, masks: list[torch.Tensor]) -> list[dict]:
    """Per stage: quantiles of |dterm/dkeep| over tokens, and the dropped share of tokens above 1."""
    grads = torch.autograd.grad(term, masks, retain_graph=True, allow_unused=True)
    stats = []
    for grad, mask in zip(grads, masks, strict=True):
        size = torch.zeros_like(mask) if grad is None else grad.abs()
        big = size > 1.0
        stats.append({"quantiles": torch.quantile(size.flatten(), torch.tensor(QUANTILES)).tolist(),
                      "above_1": int(big.sum()), "above_1_dropped": int((big & (mask.detach() == 0)).sum())})
    return stats


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cfg = load_config(args.config, args.set)
    if cfg.prune.gate != "dynamicvit":
        p.error(f"prune.gate={cfg.prune.gate!r}: this measures DynamicViT's gates only")
    torch.manual_seed(args.seed)
    cpu = torch.device("cpu")
    student, teacher = build_student(cfg).train(), build_teacher(cfg, cpu)
    aug = resolved_augment(cfg, student)
    loader = build_eval_loader(cfg, aug, cfg.data.val, cfg.data.val_split, args.batch_size)
    normalize = DeviceAugment(aug, cfg.model.num_classes).normalize
    weights = LossWeights.from_config(cfg.prune, distill=teacher is not None)
    gates = [param for name, param in student.named_parameters() if name.startswith("gates.")]
    for index, batch in zip(range(args.batches), loader, strict=False):
        images, labels = normalize(batch["image"]), batch["label"]
        out = student(images)
        with torch.no_grad():
            teacher_out = None if teacher is None else teacher(images)
        terms = compute_losses(out, labels, teacher_out, weights, "dynamicvit", student.target_keep_ratios)
        weighted = {name: getattr(weights, f"w_{name}", 1.0) * value
                    for name, value in terms.items() if name != "total"}
        norms = {}
        for name, term in weighted.items():
            grads = torch.autograd.grad(term, gates, retain_graph=True, allow_unused=True)
            norms[name] = sum(float(g.norm()) ** 2 for g in grads if g is not None) ** 0.5
        print(json.dumps({
            "batch": index, "keep_ratios": out.keep_ratios.tolist(), "weights": asdict(weights),
            "terms": {name: float(term.detach()) for name, term in weighted.items()}, "param_grad_norm": norms,
            "mask_grad": {name: mask_gradient_stats(weighted[name], out.keep_masks)
                          for name in ("ce", "ratio") if name in weighted},
        }))


if __name__ == "__main__":
    main()
