"""Accelerate (DDP + autocast) behind the Backend interface. The only module importing accelerate."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from accelerate import Accelerator

from trainer.config import Config
from trainer.infra.backends.base import Backend
from trainer.infra.checkpoint import verify_checkpoint_dir

try:  # the numpy types Accelerate itself allows when it loads its RNG file with weights_only=True
    from accelerate.utils.other import TORCH_SAFE_GLOBALS as SAFE_GLOBALS
except ImportError:  # pragma: no cover - the same list, for Accelerate versions that moved it
    import codecs

    import numpy as np

    SAFE_GLOBALS = [np.ndarray, np.dtype, codecs.encode, getattr(np, "_core", np.core).multiarray._reconstruct]

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


class AccelerateBackend(Backend):
    """Model and optimizer go through `accelerator.prepare`; the data loader never does (it would make
    rank 0 read everything): our loaders split by rank themselves."""

    name = "accelerate"
    fused_optimizer = True  # its step skips non-finite updates through the fused AdamW's found_inf

    def __init__(self, precision: str, accum_steps: int, grad_clip: float):
        self.accelerator = Accelerator(mixed_precision=MIXED_PRECISION[precision],
                                       gradient_accumulation_steps=accum_steps, cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.grad_clip = grad_clip
        self._model = self._optimizer = None

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> AccelerateBackend:
        del world_size  # Accelerate reads it from the launcher's environment
        return cls(cfg.precision, cfg.optim.accum_steps, cfg.optim.grad_clip)

    @staticmethod
    def consolidated_weights(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
        """The student's weights from an Accelerate checkpoint: model.safetensors, nothing to unpickle."""
        from safetensors.torch import load_file

        del allow_pickle  # safetensors holds tensors only
        path = os.path.join(directory, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: no model.safetensors (not an Accelerate checkpoint?)")
        return load_file(path)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._model, self._optimizer = self.accelerator.prepare(model, optimizer)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def module(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self._model)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def accumulate(self) -> contextlib.AbstractContextManager:
        return self.accelerator.accumulate(self._model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> dict[str, Any]:
        if not self.accelerator.sync_gradients:
            return {}
        params = [p for p in self._model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = self.accelerator.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.accelerator.scaler is not None:
            # fp16: the GradScaler skips overflowing steps itself (and must see them to lower its scale).
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
            return {"grad_norm": norm, "skipped": self._optimizer.step_was_skipped}
        # bf16/fp32: skip non-finite gradients on the device, with no host read: the fused AdamW takes the
        # flag GradScaler would give it (`found_inf`) and leaves weights, moments and step count untouched.
        # DDP averaged the gradients, so every rank computes the same flag.
        skipped = (~torch.isfinite(norm.detach())).float()
        inner = self._optimizer.optimizer
        inner.found_inf = skipped
        try:
            self._optimizer.step()
        finally:
            del inner.found_inf
        self._optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "skipped": skipped}

    def save(self, directory: str) -> None:
        self.accelerator.save_state(directory, safe_serialization=True)

    def load(self, directory: str) -> None:
        # Accelerate loads with weights_only=True except custom objects (custom_checkpoint_*.pkl); the check
        # keeps both under one rule.
        verify_checkpoint_dir(directory, SAFE_GLOBALS, self.allow_pickle)
        self.accelerator.load_state(directory)

    def loss_scale(self) -> float | None:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else None
