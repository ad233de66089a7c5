"""The one small interface the training loop talks to; DeepSpeed and Accelerate live behind it."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from trainer.infra.ema import MasterShard

if TYPE_CHECKING:
    from trainer.config import Config


class Backend(ABC):
    """Prepare the student, run backward/step, save/load; the teacher never passes through here."""

    name: str
    device: torch.device
    input_dtype: torch.dtype = torch.float32
    """dtype the model's inputs must have (DeepSpeed casts the module itself, Accelerate autocasts)."""
    fused_optimizer: bool = False
    """The optimizer must be torch's fused AdamW (the backend passes it a device-side skip flag)."""
    allow_pickle: bool = False
    """`load` unpickles checkpoint files that need more than tensors (ckpt.allow_pickle; trusted files only)."""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Config, world_size: int) -> Backend:
        """The backend as the run config asks for it (starts the process group)."""

    @staticmethod
    @abstractmethod
    def consolidated_weights(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
        """The student's full weights from a checkpoint directory this backend wrote (any ZeRO stage)."""

    @abstractmethod
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Wrap the student and its optimizer for distributed mixed-precision training."""

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The wrapped student, to call for forward passes."""

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The unwrapped student (for attributes, FLOPs counting, eval overlays)."""

    @property
    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer groups the LR function writes into."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the student's forward (none by default)."""
        return contextlib.nullcontext()

    def accumulate(self) -> contextlib.AbstractContextManager:
        """Context around one micro-batch's forward+backward (gradient sync only at the boundary)."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (loss scaling and accumulation are the backend's)."""

    @abstractmethod
    def step(self) -> dict[str, float]:
        """Clip + optimizer step at an accumulation boundary, then zero grads; returns grad_norm and
        whether the update was skipped. Non-finite gradients (on any rank) must skip the update on every
        rank and drop the whole accumulation window's gradients: the trainer poisons a window with a
        non-finite loss into exactly that case."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write model + optimizer state (all ranks call; each writes its shard)."""

    @abstractmethod
    def load(self, directory: str) -> None:
        """Restore what `save` wrote; first refuses files that need pickle
        (`trainer.infra.checkpoint.verify_checkpoint_dir`) unless `allow_pickle`."""

    def master_shards(self) -> list[MasterShard]:
        """The fp32 master values this rank holds, per parameter (what the EMA averages). Default: the
        module's own parameters, full on every rank (DDP under autocast keeps its fp32 masters there)."""
        return [MasterShard(name, p.detach(), 0, tuple(p.shape), p.requires_grad, replicated=True)
                for name, p in self.module.named_parameters()]

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        """Context in which `module`'s parameters hold their full values (ZeRO-3 gathers: all ranks call)."""
        return contextlib.nullcontext()

    def loss_scale(self) -> float | None:
        """Current fp16 loss scale, if any (for logging)."""
        return None
