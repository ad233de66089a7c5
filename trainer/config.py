"""The typed run configuration: dataclasses loaded from YAML and overridden with `--set a.b=v`.

Every check that can fail runs here, before any process group or model exists, and names the key and
the value. Defaults are the DeiT-S/224 DynamicViT recipe (docs/ARCHITECTURE.md; recipes in trainer/configs).
Choices are `Literal` types: a value outside them fails at load, naming the key and the choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import yaml

from data.augment_config import AugmentConfig
from data.sources import NetOptions
from model.gate_types import AttentionImpl, GateType

Precision = Literal["bf16", "fp16", "fp32"]
BackendName = Literal["deepspeed", "accelerate"]
Progress = Literal["auto", "bar", "lines"]
FlopsLoss = Literal["absolute", "normalized"]


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the value."""


@dataclass
class DataConfig(AugmentConfig, NetOptions):
    """Where the shards are and how they are read. The augmentation knobs are AugmentConfig's fields, the
    waits for remote shards NetOptions' (`connect_timeout`, `read_timeout`, `retries`, `backoff`, ...)."""

    train: str = ""
    """Train shards: a folder with `_info.json` (a directory, or a URL ending in `/`: http(s), s3://, gs://,
    hf://), or a brace pattern of shards (paths and globs, URLs, `pipe:` commands)."""
    val: str = ""
    """Eval shards, the same forms; empty disables evaluation."""
    train_split: str = "train"
    """Split of a folder's `_info.json` to train on."""
    val_split: str = "val"
    """Split to evaluate on (`val` also finds timm's `validation`)."""
    count_samples: bool = False
    """Count the samples of remote shards that no `_info.json` lists by downloading each once (every rank)."""
    batch_size: int = 64
    """Micro-batch per device (per rank)."""
    global_batch_size: int = 0
    """Optional check: must equal batch_size x world size x accum_steps when set (0 = derived)."""
    eval_batch_size: int = 0
    """Eval batch per device (0 = batch_size)."""
    workers: int = 4
    """Loader worker processes per rank (0 = decode in the training process)."""
    shuffle_buffer: int = 2000
    """Samples held in each worker's shuffle buffer."""
    max_skip_fraction: float = 0.01
    """Stop the run when more than this fraction of the samples read were unusable."""
    skip_check_min_samples: int = 256
    """Samples a rank must have read before max_skip_fraction is enforced (a rate over a handful is noise)."""
    log_keys: bool = False
    """Debug: write every consumed sample key to `<run>/keys_rank<r>.txt`."""


@dataclass
class ModelConfig:
    arch: str = "deit_small_patch16_224"
    """Any timm ViT name."""
    img_size: int = 224
    """Training and eval resolution."""
    num_classes: int = 1000
    """Classifier width."""
    checkpoint: str = ""
    """Local weights for the student's backbone (timm/DeiT format or an export of ours); a head of another class
    count is re-initialised (fine-tuning to your own labels)."""
    pretrained: bool = False
    """Start the student (and a teacher without its own weights) from timm's pretrained weights: the hub when
    online, or a local copy with model.kwargs.pretrained_cfg_overlay={file: PATH}."""
    drop_path: float = 0.1
    """Stochastic depth rate."""
    kwargs: dict = field(default_factory=dict)
    """Extra timm.create_model kwargs (e.g. a tiny test model: patch_size, depth, embed_dim, num_heads)."""


@dataclass
class TeacherConfig:
    enabled: bool = True
    """Distil from a dense teacher (needed for the kd and tok terms)."""
    arch: str = ""
    """timm name (empty = model.arch)."""
    checkpoint: str = ""
    """Local teacher weights; empty = the student's checkpoint (the dense model being pruned)."""
    kwargs: dict = field(default_factory=dict)
    """Extra timm kwargs (empty = model.kwargs)."""


@dataclass
class PruneConfig:
    gate: GateType = "dynamicvit"
    """dynamicvit | asvit | none."""
    keep_ratio: float = 0.7
    """DynamicViT rho: stage s keeps rho^s of the patch tokens."""
    flops_budget: float = 0.65
    """AS-ViT target FLOPs as a fraction of the dense model."""
    locations: list = field(default_factory=list)
    """0-based block indices of the gates (empty = the paper defaults, scaled with depth)."""
    w_ratio: float = 2.0
    """DynamicViT keep-ratio loss weight (5 for DeiT-B)."""
    w_flops: float = 2.0
    """AS-ViT FLOPs-budget loss weight."""
    w_kd: float = 0.5
    """Logit distillation weight (KL teacher || student)."""
    w_tok: float = 0.5
    """Token distillation weight (DynamicViT only)."""
    kd_temperature: float = 1.0
    """Distillation temperature."""
    flops_loss: FlopsLoss = "absolute"
    """AS-ViT budget loss: absolute (|mean GMACs - f x dense GMACs| in GMACs, the official form) | normalized
    (the same divided by the dense GMACs: scale-free, so w_flops needs ~2 x dense GMACs to push as hard)."""
    chain_masks: bool | None = None
    """Multiply each stage's keep decision by the previous stage's (null = each paper's code: DynamicViT
    chains, AS-ViT does not). The forward is the same either way; the gradients differ."""
    attention: AttentionImpl = "bias"
    """Key-masked attention of training (eval never masks): bias (additive log-mask through SDPA) | fold
    (log-mask folded into extra q/k channels plus a self key for the diagonal: maskless SDPA, so flash/cuDNN
    can run) | flex (FlexAttention; CUDA only) | chunked (fp32 score tiles, bounded memory) | reference
    (DynamicViT's explicit fp32 N x N softmax). fp16 runs chunked for bias and fold."""
    calibrate_thresholds: bool = True
    """AS-ViT: set the thresholds from the first training batch so the start meets flops_budget (false = the
    official fixed inits (s+1) x 1e-3 at 196 patches, scaled by 196/N)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Gate LR for a global batch of 1024 (scaled linearly with the global batch when scale_lr)."""
    scale_lr: bool = True
    """Scale lr linearly by global batch / lr_reference_batch (the DeiT rule)."""
    lr_reference_batch: int = 1024
    """The global batch `lr` is given for (DynamicViT 1024, AS-ViT 512)."""
    min_lr: float = 1e-6
    """Cosine floor."""
    warmup_steps: int = -1
    """Linear warm-up steps (-1 = 5% of training, unless warmup_epochs is set)."""
    warmup_epochs: float = -1.0
    """Linear warm-up in epochs of data.train; overrides warmup_steps when >= 0 (DynamicViT 5, AS-ViT 0)."""
    weight_decay: float = 0.05
    """AdamW weight decay (none on norms, biases, tokens, thresholds)."""
    gate_weight_decay: float = -1.0
    """Weight decay of the gate parameters (-1 = weight_decay: DynamicViT's code decays its predictor)."""
    frozen_params: list = field(default_factory=list)
    """Parameter names (or name suffixes, e.g. cls_token, pos_embed) left out of training (DynamicViT's code
    leaves cls_token and pos_embed out of its optimizer)."""
    backbone_lr_scale: float = 0.01
    """Backbone LR relative to the gates."""
    threshold_lr_scale: float = 0.02
    """LR multiplier of AS-ViT's thresholds vs the gate lr: they live on the ~1/N attention-mass scale."""
    backbone_frozen_fraction: float = 1 / 6
    """Fraction of training during which the backbone LR is 0."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW eps."""
    grad_clip: float = 1.0
    """Global grad-norm clip (0 = off); set explicitly because DeepSpeed's default changed in 0.19.3."""
    accum_steps: int = 1
    """Micro-batches per optimizer step."""


@dataclass
class EMAConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights (fp32, over the optimizer's master weights),
    evaluated beside the raw model, saved in checkpoints, exported with `trainer.export --ema`."""
    decay: float = 0.9999
    """EMA decay per optimizer step (DynamicViT 0.9999, AS-ViT 0.99996)."""


@dataclass
class TrainSchedule:
    steps: int = 0
    """Optimizer steps (0 = derived from epochs)."""
    epochs: float = 0.0
    """Epochs over data.train when steps is 0."""
    seed: int = 0
    """Seeds the data order, augmentation and model randomness (all pure functions of the step)."""
    compile: bool = False
    """torch.compile the student's and the teacher's blocks (block by block; the first steps pay the compile)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward (timm's grad checkpointing): less memory, ~1/3 more
    compute."""
    max_bad_steps: int = 5
    """Stop after this many consecutive skipped steps with a non-finite loss or gradients (bf16/fp32)."""


@dataclass
class BackendConfig:
    name: BackendName = "deepspeed"
    """deepspeed | accelerate."""
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON; fields we own are "auto" and filled from this config."""


@dataclass
class LogConfig:
    every: int = 10
    """Log metrics every this many steps."""
    eval_every: int = 0
    """Evaluate every this many steps (0 = only at the end)."""
    tensorboard: bool = True
    """Write TensorBoard events under <run>/tb."""
    token_images: int = 4
    """Eval images with kept-token overlays per eval."""
    progress: Progress = "auto"
    """auto (tqdm on a terminal) | bar | lines."""


@dataclass
class CkptConfig:
    every: int = 0
    """Checkpoint every this many steps (0 = only at the end)."""
    keep: int = 3
    """Complete checkpoints kept."""
    resume: str = "auto"
    """auto (from <run>/checkpoints/latest if any) | none | a checkpoint directory."""
    allow_pickle: bool = False
    """Allow checkpoints that need pickle (only for files you trust)."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: the run directory is runs/<name> unless dir is set."""
    dir: str = ""
    """Run directory."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSchedule = field(default_factory=TrainSchedule)
    ema: EMAConfig = field(default_factory=EMAConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    precision: Precision = "bf16"
    """bf16 | fp16 | fp32."""
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> str:
        return self.run.dir or os.path.join("runs", self.run.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Loading: YAML + overrides, with type checks that name the key.


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    prefix, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join((prefix + '.' if prefix else '') + c for c in close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid here: {', '.join(valid)})")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the field type; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        _check(value in get_args(typ), key, value, f"must be one of {get_args(typ)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
        origin = typing.get_origin(typ)
    base = origin or typ
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", ".nan"):
        return float(value.replace(".", ""))
    if base is float and isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
        return float(value)  # YAML 1.1 reads 2e-5 (no dot) as a string; it is plainly a number
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' expects {getattr(base, '__name__', base)}, "
                      f"got {type(value).__name__} {value!r}")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    types_ = _field_types(type(obj))
    for name, value in values.items():
        key = prefix + name
        if name not in types_:
            raise _unknown_key(key, list(types_))
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, types_[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=v` -> ('a.b', v) with v parsed as YAML (so 0.5, true, [3, 6, 9] get their types)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "a: b" inside a value (a curl header in a pipe: source) is text, not a mapping
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `--set` overrides, type-checked; call `validate` next."""
    cfg = Config()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML ({e})") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _apply(cfg, values)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value))
    return cfg


def find_run_config(checkpoint: str) -> str | None:
    """config.yaml of the run a checkpoint belongs to (run dir, or two levels above a checkpoint)."""
    here = os.path.abspath(checkpoint)
    for candidate in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here)),
                      os.path.dirname(os.path.dirname(os.path.dirname(here)))):
        path = os.path.join(candidate, "config.yaml")
        if os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------------------------------------------
# Validation: everything that can be checked without a process group or a model.


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def validate(cfg: Config, world_size: int | None = 1, check_paths: bool = True, check_model: bool = True) -> Config:
    """Raise ConfigError naming the first invalid key; returns cfg for chaining.

    world_size None means "not known yet" (launch.sh before the ranks exist): checks that need it are skipped.
    Checks run cheapest first; check_model=False leaves out the ones that import torch and timm (model
    shape, checkpoint files), so `trainer.cli` can reject most bad configs in a fraction of a second.
    """
    _validate_choices(cfg)
    _validate_prune(cfg.prune)
    _validate_data(cfg.data)
    _validate_optim(cfg.optim)
    if cfg.data.global_batch_size and world_size is not None:
        d, o = cfg.data, cfg.optim
        _check(d.global_batch_size == d.batch_size * world_size * o.accum_steps, "data.global_batch_size",
               d.global_batch_size,
               f"must equal data.batch_size ({d.batch_size}) x world size ({world_size}) x optim.accum_steps "
               f"({o.accum_steps}) = {d.batch_size * world_size * o.accum_steps}")
    _validate_schedule_and_logging(cfg)
    if cfg.teacher.enabled is False:
        _check(cfg.prune.w_kd == 0 and cfg.prune.w_tok == 0, "teacher.enabled", False,
               "prune.w_kd and prune.w_tok must be 0 without a teacher")
    _validate_ema(cfg)
    if cfg.backend.name == "deepspeed":
        from trainer.infra.backends.deepspeed_config import load_ds_config

        stage = load_ds_config(cfg, world_size or 1).get("zero_optimization", {}).get("stage", 0)
        _check(not (cfg.ema.enabled and stage == 3), "ema.enabled", True,
               f"not supported with ZeRO-3 ({cfg.backend.ds_config}): ZeRO-3 shards the parameters themselves, "
               "and the EMA follows the ZeRO-1/2 shards of the fp32 master weights; use ZeRO-1/2 or set "
               "ema.enabled=false")
    if check_paths:
        _validate_paths(cfg)
    if check_model:
        validate_model(cfg, check_paths)
    return cfg


def _validate_choices(cfg: Config) -> None:
    """The Literal-typed keys, for configs built in code (loading already checks them)."""
    for key, value, typ in (("prune.gate", cfg.prune.gate, GateType), ("precision", cfg.precision, Precision),
                            ("backend.name", cfg.backend.name, BackendName),
                            ("log.progress", cfg.log.progress, Progress),
                            ("prune.flops_loss", cfg.prune.flops_loss, FlopsLoss),
                            ("prune.attention", cfg.prune.attention, AttentionImpl)):
        _check(value in get_args(typ), key, value, f"must be one of {get_args(typ)}")


def _validate_prune(p: PruneConfig) -> None:
    _check(_finite(p.keep_ratio) and 0 < p.keep_ratio <= 1, "prune.keep_ratio", p.keep_ratio, "must be in (0, 1]")
    _check(_finite(p.flops_budget) and 0 < p.flops_budget <= 1, "prune.flops_budget", p.flops_budget,
           "must be in (0, 1]")
    for name in ("w_ratio", "w_flops", "w_kd", "w_tok"):
        v = getattr(p, name)
        _check(_finite(v) and v >= 0, f"prune.{name}", v, "must be a finite number >= 0")
    _check(_finite(p.kd_temperature) and p.kd_temperature > 0, "prune.kd_temperature", p.kd_temperature,
           "must be > 0")
    _check(all(isinstance(i, int) and i >= 0 for i in p.locations), "prune.locations", p.locations,
           "must be non-negative block indices")
    _check(list(p.locations) == sorted(set(p.locations)), "prune.locations", p.locations,
           "must be strictly increasing")


def _validate_data(d: DataConfig) -> None:
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _check(d.eval_batch_size >= 0, "data.eval_batch_size", d.eval_batch_size, "must be >= 0")
    _check(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 1")
    _check(_finite(d.max_skip_fraction) and 0 <= d.max_skip_fraction <= 1, "data.max_skip_fraction",
           d.max_skip_fraction, "must be in [0, 1]")
    for name in ("train_split", "val_split"):
        _check(bool(getattr(d, name)), f"data.{name}", getattr(d, name), "must name a split")
    _check(d.skip_check_min_samples >= 0, "data.skip_check_min_samples", d.skip_check_min_samples, "must be >= 0")
    _check(len(d.scale) == 2 and all(_finite(v) for v in d.scale) and 0 < d.scale[0] <= d.scale[1] <= 1,
           "data.scale", d.scale, "must be [min, max] with 0 < min <= max <= 1")
    for name in ("hflip", "mixup_prob", "mixup_switch_prob"):
        v = getattr(d, name)
        _check(_finite(v) and 0 <= v <= 1, f"data.{name}", v, "must be in [0, 1]")
    _check(_finite(d.color_jitter) and d.color_jitter >= 0, "data.color_jitter", d.color_jitter, "must be >= 0")
    for name in ("reprob", "smoothing"):
        v = getattr(d, name)
        _check(_finite(v) and 0 <= v < 1, f"data.{name}", v, "must be in [0, 1)")
    _check(_finite(d.mixup) and d.mixup >= 0 and _finite(d.cutmix) and d.cutmix >= 0, "data.mixup/cutmix",
           (d.mixup, d.cutmix), "alphas must be >= 0")
    _check(_finite(d.crop_pct) and 0 <= d.crop_pct <= 1, "data.crop_pct", d.crop_pct, "must be in [0, 1]")
    for name in ("connect_timeout", "read_timeout"):
        v = getattr(d, name)
        _check(_finite(v) and v > 0, f"data.{name}", v, "must be > 0 seconds")
    _check(d.retries >= 0, "data.retries", d.retries, "must be >= 0")
    for name in ("backoff", "backoff_max", "read_ahead_mb", "cache_max_gb"):
        v = getattr(d, name)
        _check(_finite(v) and v >= 0, f"data.{name}", v, "must be >= 0")


def _validate_optim(o: OptimConfig) -> None:
    _check(o.accum_steps >= 1, "optim.accum_steps", o.accum_steps, "must be >= 1")
    _check(_finite(o.lr) and o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(_finite(o.min_lr) and 0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, "must be in [0, optim.lr]")
    for name in ("weight_decay", "backbone_lr_scale", "threshold_lr_scale"):
        v = getattr(o, name)
        _check(_finite(v) and v >= 0, f"optim.{name}", v, "must be >= 0")
    _check(_finite(o.gate_weight_decay) and (o.gate_weight_decay >= 0 or o.gate_weight_decay == -1),
           "optim.gate_weight_decay", o.gate_weight_decay, "must be >= 0, or -1 (= optim.weight_decay)")
    _check(o.lr_reference_batch >= 1, "optim.lr_reference_batch", o.lr_reference_batch, "must be >= 1")
    _check(_finite(o.warmup_epochs) and (o.warmup_epochs >= 0 or o.warmup_epochs == -1), "optim.warmup_epochs",
           o.warmup_epochs, "must be >= 0, or -1 (= use optim.warmup_steps)")
    _check(all(isinstance(n, str) and n for n in o.frozen_params), "optim.frozen_params", o.frozen_params,
           "must be a list of parameter names or name suffixes")
    _check(_finite(o.backbone_frozen_fraction) and 0 <= o.backbone_frozen_fraction < 1,
           "optim.backbone_frozen_fraction", o.backbone_frozen_fraction, "must be in [0, 1)")
    _check(_finite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    _check(len(o.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
           "must be two numbers in [0, 1)")


def _validate_ema(cfg: Config) -> None:
    e = cfg.ema
    _check(_finite(e.decay) and 0 < e.decay < 1, "ema.decay", e.decay, "must be in (0, 1)")


def _validate_schedule_and_logging(cfg: Config) -> None:
    t, m = cfg.train, cfg.model
    _check(t.steps >= 0, "train.steps", t.steps, "must be >= 0")
    _check(_finite(t.epochs) and t.epochs >= 0, "train.epochs", t.epochs, "must be >= 0")
    _check(t.steps > 0 or t.epochs > 0, "train.steps", t.steps, "set train.steps or train.epochs")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    _check(m.img_size >= 1, "model.img_size", m.img_size, "must be >= 1")
    _check(m.num_classes >= 1, "model.num_classes", m.num_classes, "must be >= 1")
    _check(_finite(m.drop_path) and 0 <= m.drop_path < 1, "model.drop_path", m.drop_path, "must be in [0, 1)")
    _check(cfg.log.every >= 1, "log.every", cfg.log.every, "must be >= 1")
    _check(cfg.log.eval_every >= 0, "log.eval_every", cfg.log.eval_every, "must be >= 0")
    _check(cfg.ckpt.every >= 0, "ckpt.every", cfg.ckpt.every, "must be >= 0")
    _check(cfg.ckpt.keep >= 1, "ckpt.keep", cfg.ckpt.keep, "must be >= 1")


def _meta_vit(key: str, arch: str, kwargs: dict, num_classes: int, **size: int):
    """The timm model on the meta device: allocates nothing, so even DeiT-B takes milliseconds."""
    import timm
    import torch

    # pretrained=False whatever the kwargs say: a shape check needs no weights (and no hub download).
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    with torch.device("meta"):
        try:
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, **size, **kwargs)
        except TypeError as e:
            raise ConfigError(f"{key}={kwargs!r}: rejected by timm ({e})") from e


def validate_model(cfg: Config, check_files: bool = True) -> None:
    """Resolution vs patch size, gate locations vs depth, and whether the weight files fit the models."""
    import timm

    import model.conv_stem  # noqa: F401  (registers this project's archs with timm)

    m, t = cfg.model, cfg.teacher
    _check(timm.is_model(m.arch), "model.arch", m.arch, "not a timm model name")
    if t.arch:
        _check(timm.is_model(t.arch), "teacher.arch", t.arch, "not a timm model name")
    vit = _meta_vit("model.kwargs", m.arch, m.kwargs, m.num_classes)
    patch = vit.patch_embed.patch_size[0]
    depth = len(vit.blocks)
    _check(m.img_size % patch == 0, "model.img_size", m.img_size, f"must be divisible by the patch size {patch}")
    if cfg.prune.locations:
        _check(max(cfg.prune.locations) < depth, "prune.locations", cfg.prune.locations,
               f"must be < the model depth {depth}")
    if not check_files:
        return
    # The same checks create_student/create_teacher run when loading, here before any process group starts.
    # (config key, file, kwargs key, arch, kwargs) per model that loads a file.
    files = [("model.checkpoint", m.checkpoint, "model.kwargs", m.arch, m.kwargs)]
    if t.enabled:
        files.append(("teacher.checkpoint" if t.checkpoint else "model.checkpoint", t.checkpoint or m.checkpoint,
                      "teacher.kwargs", t.arch or m.arch, t.kwargs or m.kwargs))
    checked: list[tuple] = []
    for key, path, kwargs_key, arch, kwargs in files:
        # By default the teacher is the student's model from the student's file: read that file once.
        if path and (path, arch, kwargs) not in checked:
            checked.append((path, arch, kwargs))
            # img_size: the pos-embed shape the file must be resampled to
            vit = _meta_vit(kwargs_key, arch, kwargs, m.num_classes, img_size=m.img_size)
            _check_weights_file(key, path, vit, cfg.ckpt.allow_pickle)


def _check_weights_file(key: str, path: str, vit: Any, allow_pickle: bool) -> None:
    from model.weights import UnsafeCheckpointError, check_weights

    try:
        check_weights(vit, path, allow_pickle)
    except UnsafeCheckpointError as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None
    except (ValueError, RuntimeError, OSError) as e:  # wrong keys/shapes, or not a weights file at all
        raise ConfigError(f"{key}={path!r}: does not fit the configured model: {e}") from None


def _validate_paths(cfg: Config) -> None:
    from data.info import resolve_split
    from data.sources import redact, source_kind

    d = cfg.data
    _check(bool(d.train), "data.train", d.train, "required: a shard directory or pattern")
    for key, spec, split in (("data.train", d.train, d.train_split), ("data.val", d.val, d.val_split)):
        if not spec or (d.count_samples and source_kind(spec) != "local"):
            continue  # a counting pass downloads every shard: the ranks do it, not the config check
        try:
            resolve_split(spec, split, net_options(d))
        except (OSError, ValueError, ImportError) as e:  # ImportError: an fsspec protocol not installed
            raise ConfigError(f"{key}={redact(spec)!r}: {e}") from e
    for key, path in (("model.checkpoint", cfg.model.checkpoint), ("teacher.checkpoint", cfg.teacher.checkpoint)):
        _check(not path or os.path.isfile(path), key, path, "file not found")


def net_options(d: DataConfig) -> NetOptions:
    """The data section's waits for remote shards as data.sources.NetOptions."""
    return NetOptions(**{f.name: getattr(d, f.name) for f in dataclasses.fields(NetOptions)})
