"""Backend factory: imports deepspeed or accelerate only when that backend is asked for."""

from __future__ import annotations

from trainer.backends.base import Backend
from trainer.config import Config, load_ds_config
from trainer.dist import single_process_env


def create_backend(cfg: Config, world_size: int) -> Backend:
    """Start the process group and return the configured backend."""
    single_process_env()
    if cfg.backend.name == "deepspeed":
        from trainer.backends.deepspeed_backend import DeepSpeedBackend

        backend: Backend = DeepSpeedBackend(load_ds_config(cfg, world_size))
    else:
        from trainer.backends.accelerate_backend import AccelerateBackend

        backend = AccelerateBackend(cfg.precision, cfg.optim.accum_steps, cfg.optim.grad_clip)
    backend.allow_pickle = cfg.ckpt.allow_pickle
    return backend


__all__ = ["Backend", "create_backend"]
