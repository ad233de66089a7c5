"""Train a token-pruned ViT student, distilled from its dense teacher. One process per device.

    python -m trainer.train --config FILE [--set a.b=v ...]
    deepspeed --num_gpus N --module trainer.train --config FILE
    torchrun --nproc_per_node N -m trainer.train --config FILE
    accelerate launch -m trainer.train --config FILE --set backend.name=accelerate

The loop reads top to bottom: one `train()` function, periodic work under `if step % every == 0`.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

if __name__ == "__main__":
    # Reject a bad config before the imports below (torch, timm: seconds), on every rank of a launch and
    # before any process group exists; the checks that need torch run in main().
    from trainer.cli import reject_invalid_config

    reject_invalid_config()

import numpy as np
import torch
import yaml

from data import (
    AugmentConfig,
    DeviceAugment,
    EvalLoader,
    StreamPlan,
    TrainLoader,
    eval_transform,
    resolve_split,
    skip_summary,
    train_transform,
)
from model import count_flops, create_student, create_teacher
from trainer import checkpoint as ckpt
from trainer import dist, faults
from trainer.backends import Backend, create_backend
from trainer.cli import checked_config, parse_args
from trainer.config import Config, ConfigError
from trainer.evaluation import evaluate
from trainer.losses import LossWeights, compute_losses
from trainer.metrics import MetricsLogger, write_json
from trainer.optim import LRSchedule, apply_lr, build_optimizer
from trainer.visualize import overlay_grid


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, a checkpoint that does not fit)."""


class KeyLog:
    """Debug (data.log_keys): `<run>/keys_rank<r>.txt`, one `<step> <key>` line per consumed sample.

    `step` is the 1-based optimizer step the sample trains; every (re)start first writes `# start
    step=<s>`, so a reader drops the lines after step s that a killed run wrote and its resume redid.
    Flushed per batch: a kill -9 loses no line and tears none.
    """

    def __init__(self, run_dir: str, rank: int, start_step: int):
        self.file = open(os.path.join(run_dir, f"keys_rank{rank}.txt"), "a")
        self.file.write(f"# start step={start_step}\n")

    def write(self, step: int, keys: Sequence[str]) -> None:
        self.file.write("".join(f"{step} {k}\n" for k in keys))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def seed_micro_batch(seed: int, step: int, index: int) -> None:
    """Model and mixup randomness as a pure function of (seed, step, global micro-batch index).

    Nothing to checkpoint, and index = rank x accum_steps + micro makes 2 ranks x 1 micro-batch draw
    exactly what 1 rank x 2 micro-batches draws.
    """
    s = random.Random(f"step:{seed}:{step}:{index}").getrandbits(63)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def augment_config(cfg: Config, crop_pct: float) -> AugmentConfig:
    """The data section's augmentation knobs as data.AugmentConfig."""
    d = cfg.data
    return AugmentConfig(auto_augment=d.auto_augment or None, scale=tuple(d.scale), hflip=d.hflip,
                         color_jitter=d.color_jitter, reprob=d.reprob, mixup=d.mixup, cutmix=d.cutmix,
                         smoothing=d.smoothing, crop_pct=crop_pct)


def build_models(cfg: Config, device: torch.device):
    """(student, teacher or None, dense GMACs); identical weights on every rank (same seed)."""
    m, t = cfg.model, cfg.teacher
    torch.manual_seed(cfg.train.seed)
    student = create_student(m.arch, gate=cfg.prune.gate, keep_ratio=cfg.prune.keep_ratio,
                             flops_budget=cfg.prune.flops_budget, locations=cfg.prune.locations or None,
                             img_size=m.img_size, num_classes=m.num_classes, checkpoint=m.checkpoint or None,
                             allow_pickle=cfg.ckpt.allow_pickle, drop_path_rate=m.drop_path, **m.kwargs)
    teacher = None
    if t.enabled:
        teacher = create_teacher(t.arch or m.arch, checkpoint=(t.checkpoint or m.checkpoint) or None,
                                 allow_pickle=cfg.ckpt.allow_pickle, img_size=m.img_size, num_classes=m.num_classes,
                                 **(t.kwargs or m.kwargs))
        # Inference only: never handed to a backend. bf16 on GPU halves its cost; fp32 on CPU.
        teacher.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return student, teacher, count_flops(student.vit, m.img_size)


def total_steps(cfg: Config, loader: TrainLoader) -> int:
    """Optimizer steps of the run: train.steps, or epochs worth of micro-batches / accumulation."""
    if cfg.train.steps:
        return cfg.train.steps
    whole = int(cfg.train.epochs)
    micro = sum(loader.steps_per_epoch(e) for e in range(whole))
    micro += round((cfg.train.epochs - whole) * loader.steps_per_epoch(whole))
    return max(1, micro // cfg.optim.accum_steps)


def resolve_resume(cfg: Config, root: str) -> str | None:
    """The checkpoint to resume from (complete ones only), or None; torn ones are reported."""
    if cfg.ckpt.resume == "none":
        return None
    for torn in ckpt.incomplete_checkpoints(root):
        dist.print0(f"ignoring incomplete checkpoint (no {ckpt.MARKER} marker, a save was interrupted): {torn}")
    if cfg.ckpt.resume == "auto":
        return ckpt.find_latest(root)
    if not ckpt.is_complete(cfg.ckpt.resume):
        raise TrainingError(f"ckpt.resume={cfg.ckpt.resume!r}: not a complete checkpoint (no {ckpt.MARKER})")
    return cfg.ckpt.resume


def train(cfg: Config) -> dict:
    """Run training as configured; returns the summary (also written to <run>/summary.json)."""
    start_time = time.time()
    backend = create_backend(cfg, dist.world_size())
    rank, world, device = dist.rank(), dist.world_size(), backend.device
    run_dir = cfg.run_dir
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    student, teacher, dense_gmacs = build_models(cfg, device)
    teacher_dtype = next(teacher.parameters()).dtype if teacher is not None else torch.float32
    crop_pct = cfg.data.crop_pct or student.vit.pretrained_cfg.get("crop_pct", 0.875)
    aug = augment_config(cfg, crop_pct)
    img = cfg.model.img_size
    split = resolve_split(cfg.data.train, "train")
    plan = StreamPlan(split.shards, cfg.data.batch_size, world, max(1, cfg.data.workers), cfg.train.seed,
                      cfg.data.shuffle_buffer, cfg.model.num_classes)
    if not dist.same_on_all_ranks(plan.fingerprint(), device):
        raise TrainingError(f"data.train={cfg.data.train!r}: the ranks found different shards (files changed during "
                            f"start-up, or nodes list them differently); every rank must read the same list: "
                            f"use a shard directory with _info.json, or restart once the files are in place")
    transform = train_transform(img, aug)
    # any_rank: a skip-rate stop is taken by all ranks at the same batch, never by one alone (no hang).
    loader = TrainLoader(plan, rank, transform, cfg.data.max_skip_fraction, cfg.data.skip_check_min_samples,
                         pin_memory=device.type == "cuda", use_processes=cfg.data.workers > 0,
                         any_rank=lambda flag: dist.any_rank(flag, device))
    eval_loader = None
    if cfg.data.val:
        val = resolve_split(cfg.data.val, "val")
        eval_loader = EvalLoader(val.shards, cfg.data.eval_batch_size or cfg.data.batch_size, rank, world,
                                 eval_transform(img, aug), cfg.model.num_classes, cfg.data.workers,
                                 image_shape=(3, img, img))
    device_aug = DeviceAugment(aug, cfg.model.num_classes, device)

    steps = total_steps(cfg, loader)
    global_batch = cfg.data.batch_size * world * cfg.optim.accum_steps
    base_lr = cfg.optim.lr * (global_batch / 1024 if cfg.optim.scale_lr else 1.0)
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps >= 0 else int(0.05 * steps)
    schedule = LRSchedule(base_lr, steps, min(warmup, steps), min(cfg.optim.min_lr, base_lr))
    optimizer = build_optimizer(student, base_lr, cfg.optim.weight_decay, tuple(cfg.optim.betas), cfg.optim.eps,
                                cfg.optim.backbone_lr_scale, int(cfg.optim.backbone_frozen_fraction * steps),
                                gate_weight_decay=cfg.optim.gate_weight_decay,
                                threshold_lr_scale=cfg.optim.threshold_lr_scale)
    torn = [os.path.basename(p) for p in ckpt.incomplete_checkpoints(ckpt_root)] if cfg.ckpt.resume != "none" else []
    resume_from = resolve_resume(cfg, ckpt_root)
    if cfg.prune.gate == "asvit" and not resume_from:
        # DESIGN 4: start AS-ViT thresholds at the FLOPs budget, calibrated on one training batch from a
        # throwaway loader (the real stream is untouched). Backends broadcast rank 0's weights at wrap time.
        probe = next(iter(TrainLoader(plan, rank, transform, use_processes=False)))
        with torch.no_grad():
            counts = student.calibrate_thresholds(device_aug.normalize(probe["image"]).cpu())
        dist.print0(f"AS-ViT thresholds calibrated to flops_budget={cfg.prune.flops_budget}: keep {counts}")
    backend.prepare(student, optimizer)
    weights = LossWeights(ratio=cfg.prune.w_ratio, flops=cfg.prune.w_flops, kd=cfg.prune.w_kd if teacher else 0.0,
                          tok=cfg.prune.w_tok if teacher else 0.0, kd_temperature=cfg.prune.kd_temperature)

    step, bad_in_a_row, bad_total, skipped_total = 0, 0, 0, 0
    rng_base = 0  # seeds are functions of the step; faults.forget("rng") fakes a resume that restarts them
    if resume_from:
        saved_world = ckpt.checkpoint_world_size(resume_from)
        if saved_world != world:
            raise TrainingError(
                f"{resume_from} was written by {saved_world} ranks, this run has {world}: resume with "
                f"{saved_world} ranks, or export the weights (python -m trainer.export --checkpoint "
                f"{resume_from} --out w.safetensors) and start a new run with model.checkpoint=w.safetensors")
        backend.load(resume_from)
        state = ckpt.load_trainer_state(resume_from, rank)
        if not faults.forget("data"):
            loader.load_state_dict(state["data"])
        step, bad_total, skipped_total = state["step"], state.get("bad_steps", 0), state.get("skipped_steps", 0)
        rng_base = step if faults.forget("rng") else 0
        dist.print0(f"resumed from {resume_from} at step {step}")

    log = MetricsLogger(run_dir, rank == 0, steps, step, cfg.log.tensorboard, cfg.log.progress)
    log.text("config", "```yaml\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "\n```")
    keys_log = KeyLog(run_dir, rank, step) if cfg.data.log_keys else None
    student_module = backend.module
    batches = iter(loader)
    window = defaultdict(float)
    data_wait, window_start = 0.0, time.time()
    last_eval: dict = {}

    def run_eval(at_step: int) -> dict:
        def overlays(batch: dict, _x: torch.Tensor) -> None:
            grid = overlay_grid(batch["image"], student_module.last_keep_indices or [],
                                student_module.vit.patch_embed.grid_size, cfg.log.token_images)
            if grid is not None:
                log.image("eval/kept_tokens", grid, at_step)

        result = evaluate(backend.model, student_module, eval_loader, device_aug.normalize, device,
                          backend.input_dtype, img, teacher,
                          teacher_dtype=teacher_dtype,
                          on_first_batch=overlays if cfg.log.token_images else None)
        backend.model.train()
        log.log(at_step, result, kind="eval")
        return result

    while step < steps:
        backend.model.train()
        lrs = apply_lr(_LRTarget(backend.param_groups), step, schedule)
        result: dict[str, float] = {}
        poisoned = ""  # why this step's gradients were made non-finite on purpose ("" if they were not)
        window["micro"] += 0  # keys present on every rank, even in a window of skipped steps
        window["updates"] += 0
        for micro in range(cfg.optim.accum_steps):
            t0 = time.time()
            batch = next(batches)
            data_wait += time.time() - t0
            # Seed after fetching: starting a DataLoader draws from the global generator itself.
            seed_micro_batch(cfg.train.seed, step - rng_base, rank * cfg.optim.accum_steps + micro)
            if keys_log is not None:
                keys_log.write(step + 1, batch["keys"])
            x, targets = device_aug.train(batch["image"], batch["label"])
            with backend.accumulate():
                with backend.autocast():
                    out = backend.model(x.to(backend.input_dtype))
                teacher_out = None
                if teacher is not None:
                    with torch.inference_mode():
                        teacher_out = teacher(x.to(teacher_dtype))
                terms = compute_losses(out, targets, teacher_out, weights, cfg.prune.gate, cfg.prune.keep_ratio,
                                       cfg.prune.flops_budget, dense_gmacs)
                loss = terms["total"]
                if micro == cfg.optim.accum_steps - 1:
                    loss = faults.inject_loss(loss, step + 1)
                # A non-finite loss on any rank drops the whole optimizer step on every rank: backward of a
                # NaN-scaled loss makes every gradient non-finite, and the backend skips such a step with
                # the window's earlier micro-batches (backward and step still run, so every rank issues
                # the same collectives and DeepSpeed's micro-step count stays aligned).
                finite = not dist.any_rank(not bool(torch.isfinite(loss.detach()).item()))
                if not finite and not poisoned:
                    poisoned = (f"non-finite loss on some rank (micro-batch {micro}; this rank's terms "
                                f"{ {k: round(float(v.detach()), 4) for k, v in terms.items()} })")
                backend.backward(loss * float("nan") if poisoned else loss)
                result = backend.step() or result
            if finite:
                for k, v in terms.items():
                    window[k] += float(v.detach())
                window["gmacs"] += float(out.flops.detach().float().mean())
                for s, r in enumerate(out.keep_ratios.tolist()):
                    window[f"keep_ratio/stage{s}"] += r
                window["micro"] += 1
        step += 1
        log.advance()
        skipped = bool(result.get("skipped"))
        norm = result.get("grad_norm")
        if not skipped and (poisoned or (norm is not None and not math.isfinite(norm))):
            raise TrainingError(f"step {step}: the {backend.name} backend applied an update with non-finite "
                                f"gradients ({poisoned or f'grad norm {norm}'}); the weights are no longer "
                                f"trustworthy: resume from the last checkpoint")
        if norm is not None and not skipped:  # a skipped step's norm is inf or nan: not in the mean
            window["grad_norm"] += norm
            window["updates"] += 1
        skipped_total += skipped
        # fp16: a skipped step is the loss scaler backing off from an overflow, which is routine.
        bad = bool(poisoned) or (skipped and cfg.precision != "fp16")
        bad_in_a_row = bad_in_a_row + 1 if bad else 0
        bad_total += bad
        if bad:
            dist.print0(f"step {step}: {poisoned or f'non-finite gradients (grad norm {norm})'}; update skipped on "
                        f"every rank ({bad_in_a_row} in a row, {bad_total} in total)")

        if step % cfg.log.every == 0 or step == steps or bad_in_a_row >= cfg.train.max_bad_steps:
            # Means over the window and over ranks (sums reduced, then divided).
            keys = sorted(window)
            vals = dict(zip(keys, dist.all_reduce(torch.tensor([window[k] for k in keys], dtype=torch.float64))
                            .tolist(), strict=True))
            micro, updates = max(vals.pop("micro"), 1.0), max(vals.pop("updates"), 1.0)
            elapsed = time.time() - window_start
            scalars = {k: v / (updates if k == "grad_norm" else micro) for k, v in vals.items()}
            if "total" in scalars:  # absent when every step of the window was skipped
                scalars["loss"] = scalars.pop("total")
            scalars.update({f"lr/{name}": lr for name, lr in lrs.items()})
            scalars["img_per_s"] = micro * cfg.data.batch_size / max(elapsed, 1e-9)
            scalars["data_wait_fraction"] = data_wait / max(elapsed, 1e-9)
            scalars.update({f"data/skipped_{k}": float(v) for k, v in global_skips(loader).items()})
            scalars["bad_steps"] = float(bad_total)
            scalars["skipped_steps"] = float(skipped_total)
            if backend.loss_scale() is not None:
                scalars["loss_scale"] = backend.loss_scale()
            if faults.active():
                scalars.update(debug_param_sums(backend, rank, world))
            log.log(step, scalars)
            window.clear()
            data_wait, window_start = 0.0, time.time()
        if bad_in_a_row >= cfg.train.max_bad_steps:
            raise TrainingError(f"stopping at step {step}: {bad_in_a_row} consecutive non-finite steps "
                                f"(train.max_bad_steps={cfg.train.max_bad_steps}), all skipped; last: "
                                f"{poisoned or f'non-finite gradients (grad norm {norm})'}")

        if (cfg.ckpt.every and step % cfg.ckpt.every == 0) or step == steps:
            state = {"step": step, "data": loader.state_dict(), "bad_steps": bad_total,
                     "skipped_steps": skipped_total, "backend": backend.name,
                     "param_checksum": param_checksum(student_module), "rank": rank, "world_size": world,
                     "local_rank": dist.local_rank(), "node_rank": int(os.environ.get("GROUP_RANK", 0))}
            path = ckpt.save_checkpoint(backend, ckpt_root, step, state, cfg.ckpt.keep)
            dist.print0(f"saved checkpoint {path}")
        if eval_loader is not None and ((cfg.log.eval_every and step % cfg.log.eval_every == 0) or step == steps):
            last_eval = run_eval(step)
        faults.hit("after_step", step)

    if keys_log is not None:
        keys_log.close()
    summary = {"steps": step, "wall_seconds": round(time.time() - start_time, 2), "world_size": world,
               "backend": backend.name, "precision": cfg.precision, "gate": cfg.prune.gate,
               "gmacs_dense": dense_gmacs, "bad_steps": bad_total, "skipped_steps": skipped_total,
               "ignored_checkpoints": torn,
               "skipped_samples": global_skips(loader),
               **last_eval}
    if rank == 0:
        write_json(os.path.join(run_dir, "summary.json"), summary)
    log.close()
    dist.barrier()
    return summary


def global_skips(loader: TrainLoader) -> dict[str, int]:
    """Skipped-sample counts by kind, summed over ranks (every kind present, zeros included)."""
    local = skip_summary(loader.skips)
    total = dist.all_reduce(torch.tensor(list(local.values()), dtype=torch.float64))
    return {kind: int(v) for kind, v in zip(local, total.tolist(), strict=True)}


def param_checksum(module: torch.nn.Module) -> float:
    """fp64 sum of |p| over the parameters this rank holds (replicas must agree; ZeRO-3 holds shards)."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


def debug_param_sums(backend: Backend, rank: int, world: int) -> dict[str, float]:
    """Every rank's full-parameter `param_checksum` (fault-injection runs only): equal replicas, untouched skips."""
    sums = torch.zeros(world, dtype=torch.float64)
    with backend.gathered_parameters():
        sums[rank] = param_checksum(backend.module)
    return {f"debug/param_sum/rank{r}": v for r, v in enumerate(dist.all_reduce(sums).tolist())}


class _LRTarget:
    """Adapter so `apply_lr` (which takes an optimizer) can write into any backend's param groups."""

    def __init__(self, param_groups: list[dict]):
        self.param_groups = param_groups


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: load and validate the config before any process group exists, then train."""
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = checked_config(argv, dist.world_size())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = train(cfg)
    dist.shutdown()
    top1 = summary.get("student_top1")
    dist.print0(f"done: {summary['steps']} steps in {summary['wall_seconds']} s"
                + (f", student top-1 {top1:.2f}" if top1 is not None and math.isfinite(top1) else ""))


if __name__ == "__main__":
    main()
