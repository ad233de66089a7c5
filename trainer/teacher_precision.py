"""How much a bf16 teacher changes the distillation targets against an fp32 one, on a run's training data.

    python -m trainer.bench teacher-precision --config runs/demo/dynamicvit/config.yaml [--images 2048]

The teacher runs in bf16 on GPUs (half the cost of the step's extra forward). Its outputs are the student's
targets: the KD term matches its softmax, the token term its final patch tokens. This measures, on training
batches as the loop builds them (same augmentation and mixup), the mean KL(fp32 teacher || bf16 teacher)
over the softmax outputs in nats, the relative token-target MSE sum((t_bf16 - t_fp32)^2) / sum(t_fp32^2),
and how often the two top-1 classes agree. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from data import DeviceAugment, StreamPlan, TrainLoader, resolve_split, train_transform
from trainer.config import load_config, net_options
from trainer.loop.build import build_student, build_teacher, resolved_augment

KL_LIMIT = 1e-3  # nats: keep the bf16 default only below this (and the token MSE below its limit)
TOKEN_MSE_LIMIT = 1e-3


@torch.no_grad()
def measure(config: str, images: int = 2048, seed: int = 0) -> dict[str, float]:
    """The three numbers over `images` training images of the run `config` describes (CPU)."""
    cfg = load_config(config)
    m = cfg.model
    fp32 = build_teacher(cfg, torch.device("cpu"))  # the run's teacher, fp32 on a CPU
    if fp32 is None:
        raise SystemExit(f"{config}: teacher.enabled is false: there are no distillation targets to compare")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)  # what build_teacher runs on a GPU
    aug = resolved_augment(cfg, build_student(cfg))
    split = resolve_split(cfg.data.train, cfg.data.train_split, net_options(cfg.data))
    plan = StreamPlan(split.shards, cfg.data.batch_size, 1, 1, seed, cfg.data.shuffle_buffer, m.num_classes,
                      net_options(cfg.data))
    device_aug = DeviceAugment(aug, m.num_classes, torch.device("cpu"))
    kl_sum = agree = tok_err = tok_norm = 0.0
    count = 0
    torch.manual_seed(seed)  # mixup draws
    for batch in TrainLoader(plan, 0, train_transform(m.img_size, aug), use_processes=False):
        x, _ = device_aug.train(batch["image"], batch["label"])
        ref, low = fp32(x), bf16(x.to(torch.bfloat16))
        log_p, log_q = F.log_softmax(ref.logits.float(), -1), F.log_softmax(low.logits.float(), -1)
        kl_sum += float(F.kl_div(log_q, log_p, reduction="sum", log_target=True))
        agree += float((ref.logits.argmax(-1) == low.logits.argmax(-1)).sum())
        tok_err += float(((low.tokens.float() - ref.tokens.float()) ** 2).sum())
        tok_norm += float((ref.tokens.float() ** 2).sum())
        count += x.shape[0]
        if count >= images:
            break
    kl, mse = kl_sum / count, tok_err / tok_norm
    return {"images": count, "mean_kl_nats": kl, "token_relative_mse": mse, "top1_agreement": agree / count,
            "kl_limit": KL_LIMIT, "token_mse_limit": TOKEN_MSE_LIMIT,
            "bf16_ok": kl < KL_LIMIT and mse < TOKEN_MSE_LIMIT}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (`python -m trainer.bench teacher-precision ...`)."""
    p = argparse.ArgumentParser(prog="python -m trainer.bench teacher-precision", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a run's config.yaml (its teacher and training data)")
    p.add_argument("--images", type=int, default=2048)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.config, args.images)))


if __name__ == "__main__":
    main()
