"""Backend factory: imports deepspeed or accelerate only when that backend is asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.infra.backends.base import Backend
from trainer.infra.dist import single_process_env

if TYPE_CHECKING:
    from trainer.config import Config


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass called `name` (`deepspeed` | `accelerate`), importing only its library."""
    if name == "deepspeed":
        from trainer.infra.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend
    if name == "accelerate":
        from trainer.infra.backends.accelerate_backend import AccelerateBackend

        return AccelerateBackend
    raise ValueError(f"unknown backend {name!r} (deepspeed | accelerate)")


def create_backend(cfg: Config, world_size: int) -> Backend:
    """Start the process group and return the configured backend."""
    single_process_env()
    backend = backend_class(cfg.backend.name).from_config(cfg, world_size)
    backend.allow_pickle = cfg.ckpt.allow_pickle
    return backend


__all__ = ["Backend", "backend_class", "create_backend"]
