"""The DeepSpeed JSON of a run: the file's own settings, plus the fields the trainer owns, filled from the config.

We own micro-batch, accumulation, train batch, gradient clipping and precision; the shipped files say
"auto" for them. A conflicting explicit value is a ConfigError naming the file and key. No deepspeed
import: config validation runs this before any process exists.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from trainer.config import ConfigError

if TYPE_CHECKING:
    from trainer.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _fill(ds: dict, path: tuple[str, ...], value: Any, file: str) -> None:
    node = ds
    for part in path[:-1]:
        node = node.setdefault(part, {})
    key = ".".join(path)
    current = node.get(path[-1], "auto")
    if current == "auto":
        node[path[-1]] = value
    elif current != value:
        raise ConfigError(f"{file}: '{key}' is {current!r} but the run config gives {value!r}; "
                          f"set it to \"auto\" (the trainer fills it) or make them agree")


def load_ds_config(cfg: Config, world_size: int) -> dict:
    """Read backend.ds_config and fill its "auto" fields from our config; conflicts are errors."""
    path = cfg.backend.ds_config
    if not os.path.isfile(path):
        here = os.path.join(REPO, path)  # the shipped ds_configs/ work from any folder
        if not os.path.isfile(here):
            known = sorted(os.listdir(os.path.dirname(here))) if os.path.isdir(os.path.dirname(here)) else []
            raise ConfigError(f"backend.ds_config={path!r}: file not found (shipped: {known})")
        path = here
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"backend.ds_config={path!r}: invalid JSON ({e})") from e
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage!r}: must be 0, 1, 2 or 3")
    micro, accum = cfg.data.batch_size, cfg.optim.accum_steps
    _fill(ds, ("train_micro_batch_size_per_gpu",), micro, path)
    _fill(ds, ("gradient_accumulation_steps",), accum, path)
    _fill(ds, ("train_batch_size",), micro * accum * world_size, path)
    _fill(ds, ("gradient_clipping",), float(cfg.optim.grad_clip), path)
    _fill(ds, ("bf16", "enabled"), cfg.precision == "bf16", path)
    _fill(ds, ("fp16", "enabled"), cfg.precision == "fp16", path)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: no value for \"auto\" field(s) {leftover}; the trainer fills only batch, "
                          f"accumulation, clipping and precision")
    return ds


def _walk(node: dict, prefix: str = ""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
