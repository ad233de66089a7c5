"""Everything a run needs before its first step, built from the config: `build_run(cfg) -> Run`.

Order matters and is the one below: the backend (process group) first, then models, data, optimizer
and schedule, the resume point, AS-ViT's threshold calibration (fresh starts only), the backend wrap,
and last the restore of a checkpoint into the wrapped model.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import yaml

from data import DeviceAugment, EvalLoader, StreamPlan, TrainLoader, eval_transform, resolve_split, train_transform
from data.augment_config import AugmentConfig
from data.sources import redact
from model import PrunedViT, Teacher, count_flops, create_student, create_teacher
from trainer.config import Config, net_options
from trainer.infra import checkpoint as ckpt
from trainer.infra import dist, faults
from trainer.infra.backends import Backend, create_backend
from trainer.infra.ema import WeightEMA
from trainer.infra.store_sync import StoreAnyRank
from trainer.loop.losses import LossWeights
from trainer.loop.optim import LRSchedule, build_optimizer


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, a checkpoint that does not fit)."""


@dataclass
class Run:
    """A built run: what the loop reads every step."""

    cfg: Config
    backend: Backend
    student: PrunedViT  # unwrapped; call `backend.model` for training forwards
    teacher: Teacher | None
    teacher_dtype: torch.dtype
    dense_gmacs: float
    loader: TrainLoader
    eval_loader: EvalLoader | None
    device_aug: DeviceAugment
    schedule: LRSchedule
    loss_weights: LossWeights
    steps: int
    start_step: int = 0
    bad_steps: int = 0  # counters restored from the checkpoint
    skipped_steps: int = 0
    rng_base: int = 0  # seeds are functions of the step; faults.forget("rng") fakes a resume that restarts them
    ignored_checkpoints: list[str] = field(default_factory=list)
    ema: WeightEMA | None = None
    ema_model: PrunedViT | None = None  # an fp32 copy the EMA weights are loaded into to evaluate them

    @property
    def ckpt_root(self) -> str:
        return checkpoint_root(self.cfg)


def checkpoint_root(cfg: Config) -> str:
    """`<run>/checkpoints`."""
    return os.path.join(cfg.run_dir, "checkpoints")


def timm_kwargs(kwargs: dict, pretrained: bool) -> dict:
    """model.kwargs for timm.create_model, with `pretrained=True` when model.pretrained asks for it."""
    return {**kwargs, "pretrained": True} if pretrained else dict(kwargs)


def build_student(cfg: Config, checkpoint: str | None = None) -> PrunedViT:
    """The student the config describes, with weights from `checkpoint`: a weight file (timm/DeiT or an
    export), or a training checkpoint (a run dir, checkpoints dir or checkpoint dir), consolidated. None
    means `model.checkpoint` (none: timm's init, or its hub weights with `pretrained`)."""
    m, p = cfg.model, cfg.prune
    source = checkpoint if checkpoint is not None else (m.checkpoint or None)
    from_training_run = source is not None and os.path.isdir(source)
    student = create_student(m.arch, gate=p.gate, keep_ratio=p.keep_ratio, flops_budget=p.flops_budget,
                             locations=p.locations or None, chain_masks=p.chain_masks, attention=p.attention,
                             img_size=m.img_size,
                             num_classes=m.num_classes,
                             checkpoint=None if from_training_run else source, allow_pickle=cfg.ckpt.allow_pickle,
                             drop_path_rate=m.drop_path, **timm_kwargs(m.kwargs, m.pretrained))
    if from_training_run:
        weights = ckpt.consolidated_state_dict(ckpt.resolve_checkpoint(source), cfg.ckpt.allow_pickle)
        student.load_state_dict(weights, strict=True)
    return student


def build_teacher(cfg: Config, device: torch.device) -> Teacher | None:
    """The dense teacher (defaults: the student's arch, weights and kwargs), in inference dtype on `device`."""
    m, t = cfg.model, cfg.teacher
    if not t.enabled:
        return None
    checkpoint = (t.checkpoint or m.checkpoint) or None
    teacher = create_teacher(t.arch or m.arch, checkpoint=checkpoint, allow_pickle=cfg.ckpt.allow_pickle,
                             img_size=m.img_size, num_classes=m.num_classes,
                             **timm_kwargs(t.kwargs or m.kwargs, m.pretrained and checkpoint is None))
    # Inference only: never handed to a backend. bf16 on GPU halves its cost; fp32 on CPU.
    return teacher.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


def resolved_augment(cfg: Config, student: PrunedViT) -> AugmentConfig:
    """The data section's augmentation knobs, with the eval crop taken from the model when unset (0)."""
    knobs = {f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(AugmentConfig)}
    crop_pct = cfg.data.crop_pct or student.vit.pretrained_cfg.get("crop_pct", 0.875)
    return AugmentConfig(**(knobs | {"crop_pct": crop_pct}))


def build_loaders(cfg: Config, aug: AugmentConfig, device: torch.device) -> tuple[TrainLoader, EvalLoader | None]:
    """The train stream (equal steps on every rank, checked) and the exact eval loader (None without data.val)."""
    rank, world, img, d = dist.rank(), dist.world_size(), cfg.model.img_size, cfg.data
    net = net_options(d)
    plan = StreamPlan(resolve_split(d.train, d.train_split, net, d.count_samples).shards, d.batch_size,
                      world, max(1, d.workers), cfg.train.seed, d.shuffle_buffer, cfg.model.num_classes, net)
    if not dist.same_on_all_ranks(plan.fingerprint(), device):
        raise TrainingError(f"data.train={redact(d.train)!r}: the ranks found different shards (files changed during "
                            f"start-up, or nodes list them differently); every rank must read the same list: "
                            f"use a shard directory with _info.json, or restart once the files are in place")
    # any_rank: a skip-rate stop is taken by all ranks at the same batch, never by one alone (no hang); agreed
    # through the store, so no device collective runs between log steps.
    loader = TrainLoader(plan, rank, train_transform(img, aug), cfg.data.max_skip_fraction,
                         cfg.data.skip_check_min_samples, pin_memory=device.type == "cuda",
                         use_processes=cfg.data.workers > 0, any_rank=StoreAnyRank("data-skip-rate"))
    if not cfg.data.val:
        return loader, None
    return loader, build_eval_loader(cfg, aug, d.val, d.val_split, d.eval_batch_size or d.batch_size, rank, world,
                                     d.workers)


def build_eval_loader(cfg: Config, aug: AugmentConfig, source: str, split: str, batch_size: int, rank: int = 0,
                      world: int = 1, workers: int = 0) -> EvalLoader:
    """The exact eval loader of `source` (a split of a shard folder, or a pattern) at the model's input size."""
    img, net = cfg.model.img_size, net_options(cfg.data)
    shards = resolve_split(source, split, net, cfg.data.count_samples).shards
    return EvalLoader(shards, batch_size, rank, world, eval_transform(img, aug), cfg.model.num_classes, workers,
                      image_shape=(3, img, img), net=net)


def total_steps(cfg: Config, loader: TrainLoader) -> int:
    """Optimizer steps of the run: train.steps, or epochs worth of micro-batches / accumulation."""
    if cfg.train.steps:
        return cfg.train.steps
    whole = int(cfg.train.epochs)
    micro = sum(loader.steps_per_epoch(e) for e in range(whole))
    micro += round((cfg.train.epochs - whole) * loader.steps_per_epoch(whole))
    return max(1, micro // cfg.optim.accum_steps)


def build_schedule(cfg: Config, steps: int, steps_per_epoch: float) -> LRSchedule:
    """Warm-up + cosine, the base LR scaled by global batch / optim.lr_reference_batch (the DeiT rule) when
    optim.scale_lr. Warm-up: optim.warmup_epochs when set, else optim.warmup_steps (-1 = 5% of the run)."""
    o = cfg.optim
    global_batch = cfg.data.batch_size * dist.world_size() * o.accum_steps
    base_lr = o.lr * (global_batch / o.lr_reference_batch if o.scale_lr else 1.0)
    if o.warmup_epochs >= 0:
        warmup = round(o.warmup_epochs * steps_per_epoch)
    else:
        warmup = o.warmup_steps if o.warmup_steps >= 0 else int(0.05 * steps)
    return LRSchedule(base_lr, steps, min(warmup, steps), min(o.min_lr, base_lr))


def build_ema_model(cfg: Config, device: torch.device) -> PrunedViT:
    """A bare fp32 student (no weight file read) to load EMA weights into for evaluation."""
    bare = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint="", pretrained=False))
    return build_student(bare).to(device=device, dtype=torch.float32).eval()


def freeze_params(student: PrunedViT, names: list[str]) -> list[str]:
    """requires_grad=False on parameters named (or ending in) `names`, so the optimizer never sees them;
    returns the frozen names. A name that matches nothing is an error (a typo would silently train it)."""
    frozen = []
    for pattern in names:
        hits = [n for n, p in student.named_parameters() if n == pattern or n.endswith("." + pattern)]
        if not hits:
            raise TrainingError(f"optim.frozen_params: {pattern!r} matches no parameter of the student")
        for name in hits:
            student.get_parameter(name).requires_grad_(False)
        frozen += hits
    return frozen


def resolve_resume(cfg: Config) -> tuple[str | None, list[str]]:
    """(the checkpoint to resume from or None, torn checkpoint names ignored); complete checkpoints only."""
    if cfg.ckpt.resume == "none":
        return None, []
    root = checkpoint_root(cfg)
    torn = ckpt.incomplete_checkpoints(root)
    for path in torn:
        dist.print0(f"ignoring incomplete checkpoint (no {ckpt.MARKER} marker, a save was interrupted): {path}")
    names = [os.path.basename(p) for p in torn]
    if cfg.ckpt.resume == "auto":
        return ckpt.find_latest(root), names
    if not ckpt.is_complete(cfg.ckpt.resume):
        raise TrainingError(f"ckpt.resume={cfg.ckpt.resume!r}: not a complete checkpoint (no {ckpt.MARKER})")
    return cfg.ckpt.resume, names


def calibrate_asvit_thresholds(cfg: Config, student: PrunedViT, loader: TrainLoader, device_aug: DeviceAugment) -> None:
    """Start AS-ViT's thresholds at the FLOPs budget, calibrated on one training batch of a throwaway
    loader (the real stream is untouched). Backends broadcast rank 0's weights at wrap time."""
    probe = next(iter(TrainLoader(loader.plan, dist.rank(), loader.transform, use_processes=False)))
    with torch.no_grad():
        counts = student.calibrate_thresholds(device_aug.normalize(probe["image"]).cpu())
    dist.print0(f"AS-ViT thresholds calibrated to flops_budget={cfg.prune.flops_budget}: keep {counts}")


def restore(run: Run, checkpoint: str) -> None:
    """Load a complete checkpoint into the wrapped model, the data position and the counters."""
    world = dist.world_size()
    saved_world = ckpt.checkpoint_world_size(checkpoint)
    if saved_world != world:
        raise TrainingError(
            f"{checkpoint} was written by {saved_world} ranks, this run has {world}: resume with "
            f"{saved_world} ranks, or export the weights (python -m trainer.export --checkpoint "
            f"{checkpoint} --out w.safetensors) and start a new run with model.checkpoint=w.safetensors")
    run.backend.load(checkpoint)
    if run.ema is not None:
        run.ema.load(checkpoint)
    state = ckpt.load_trainer_state(checkpoint, dist.rank())
    if not faults.forget("data"):
        run.loader.load_state_dict(state["data"])
    run.start_step = state["step"]
    run.bad_steps, run.skipped_steps = state.get("bad_steps", 0), state.get("skipped_steps", 0)
    run.rng_base = run.start_step if faults.forget("rng") else 0
    dist.print0(f"resumed from {checkpoint} at step {run.start_step}")


def printable_config(cfg: Config) -> dict:
    """The resolved config as it may be written or shown: data sources without their credentials."""
    values = cfg.to_dict()
    for key in ("train", "val"):
        values["data"][key] = redact(values["data"][key])
    return values


def write_config(cfg: Config) -> None:
    """`<run>/config.yaml`, the resolved config (rank 0), credentials redacted."""
    if dist.rank() == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(printable_config(cfg), f, sort_keys=False)


def build_run(cfg: Config) -> Run:
    """Start the process group and build the run; resumes from the latest complete checkpoint (ckpt.resume)."""
    backend = create_backend(cfg, dist.world_size())
    write_config(cfg)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    student = build_student(cfg)
    teacher = build_teacher(cfg, backend.device)
    aug = resolved_augment(cfg, student)
    loader, eval_loader = build_loaders(cfg, aug, backend.device)
    device_aug = DeviceAugment(aug, cfg.model.num_classes, backend.device)
    steps = total_steps(cfg, loader)
    schedule = build_schedule(cfg, steps, loader.steps_per_epoch(0) / cfg.optim.accum_steps)
    o = cfg.optim
    freeze_params(student, o.frozen_params)
    if cfg.train.activation_checkpointing:
        student.vit.set_grad_checkpointing(True)  # PrunedViT runs each block through torch's checkpoint
    if cfg.train.compile:
        student.compile_blocks()
        if teacher is not None:
            teacher.compile_blocks()
    optimizer = build_optimizer(student, schedule.base_lr, o.weight_decay, tuple(o.betas), o.eps, o.backbone_lr_scale,
                                int(o.backbone_frozen_fraction * steps),
                                gate_weight_decay=None if o.gate_weight_decay < 0 else o.gate_weight_decay,
                                threshold_lr_scale=o.threshold_lr_scale, fused=backend.fused_optimizer)
    resume_from, torn = resolve_resume(cfg)
    if cfg.prune.gate == "asvit" and cfg.prune.calibrate_thresholds and not resume_from:
        calibrate_asvit_thresholds(cfg, student, loader, device_aug)
    backend.prepare(student, optimizer)
    run = Run(cfg, backend, backend.module, teacher,
              next(teacher.parameters()).dtype if teacher is not None else torch.float32,
              count_flops(student.vit, cfg.model.img_size), loader, eval_loader, device_aug, schedule,
              LossWeights.from_config(cfg.prune, distill=teacher is not None), steps, ignored_checkpoints=torn)
    if cfg.ema.enabled:
        shapes = {name: tuple(p.shape) for name, p in run.student.named_parameters()}
        run.ema = WeightEMA(backend.master_shards, shapes, cfg.ema.decay)
    if resume_from:
        restore(run, resume_from)
    return run
