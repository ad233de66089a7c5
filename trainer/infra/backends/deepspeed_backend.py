"""DeepSpeed ZeRO (1/2/3, bf16/fp16) behind the Backend interface. The only module importing deepspeed."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from trainer.config import Config
from trainer.infra.backends.base import Backend
from trainer.infra.backends.deepspeed_config import load_ds_config
from trainer.infra.checkpoint import verify_checkpoint_dir
from trainer.infra.ema import MasterShard

# Data-only classes DeepSpeed pickles into its ZeRO optimizer files (checked on ZeRO-1/2/3 bf16 and fp32
# checkpoints; the loss scalers carry fp16 state). Constructing them runs no code of the file's choosing.
SAFE_GLOBALS = (LossScaler, DynamicLossScaler, fragment_address, ZeroStageEnum)


class DeepSpeedBackend(Backend):
    """`deepspeed.initialize` with our optimizer and a ds_config whose "auto" fields we filled."""

    name = "deepspeed"

    def __init__(self, ds_config: dict[str, Any], timeout_minutes: int = 30):
        from datetime import timedelta

        cuda = torch.cuda.is_available()
        if ds_config.get("fp16", {}).get("enabled") and not cuda:
            raise ValueError("precision=fp16: DeepSpeed's CPU accelerator has no fp16 support; "
                             "use precision=bf16 or fp32 without a GPU")
        # On CPU DeepSpeed picks its CPU accelerator; gloo is the backend that needs nothing installed.
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.ds_config = ds_config
        if ds_config.get("bf16", {}).get("enabled"):
            # The ZeRO optimizers skip a bf16 step with non-finite gradients only with this on (default
            # on in DeepSpeed 0.19.8; without it ZeRO-1/2 apply NaN updates, measured). The trainer relies
            # on it and checks every step that a non-finite one was skipped (trainer.loop.step.BadSteps).
            if ds_config["bf16"].get("check_grad_overflow") is False:
                raise ValueError("ds_config bf16.check_grad_overflow=false: the trainer needs DeepSpeed to skip "
                                 "steps with non-finite gradients; remove the key")
            if _knows_bf16_overflow_check():
                ds_config["bf16"]["check_grad_overflow"] = True
            self.input_dtype = torch.bfloat16
        elif ds_config.get("fp16", {}).get("enabled"):
            self.input_dtype = torch.float16
        self.engine = None
        self._skipped_before = 0

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> DeepSpeedBackend:
        return cls(load_ds_config(cfg, world_size))

    @staticmethod
    def consolidated_weights(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
        """fp32 state dict from a ZeRO-1/2/3 checkpoint, via DeepSpeed's own zero_to_fp32 (which unpickles
        with weights_only=False, hence the check first)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        verify_checkpoint_dir(directory, SAFE_GLOBALS, allow_pickle)
        root, tag = os.path.split(os.path.normpath(directory))
        return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.to(self.device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.engine.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        # The engine divides by the accumulation steps itself; no manual scaling here.
        self.engine.backward(loss)

    def step(self) -> dict[str, float]:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return {}
        # The norm stays as DeepSpeed gives it (a tensor on the device, or a float it read itself): the loop
        # reads it at log steps. The skip count is DeepSpeed's own host counter.
        norm = self.engine.get_global_grad_norm()  # None when DeepSpeed did not compute one
        skipped = self.engine.skipped_steps > self._skipped_before
        self._skipped_before = self.engine.skipped_steps
        return {"skipped": skipped} | ({"grad_norm": norm} if norm is not None else {})

    def save(self, directory: str) -> None:
        # save_latest=False: DeepSpeed writes `latest` before every rank has finished; ours is written
        # only after the completion marker (trainer.infra.checkpoint).
        root, tag = os.path.split(os.path.normpath(directory))
        self.engine.save_checkpoint(root, tag=tag, save_latest=False)

    def load(self, directory: str) -> None:
        # DeepSpeed unpickles with weights_only=False: refuse files that need more than tensors first.
        verify_checkpoint_dir(directory, SAFE_GLOBALS, self.allow_pickle)
        root, tag = os.path.split(os.path.normpath(directory))
        path, _ = self.engine.load_checkpoint(root, tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint to load")
        self._skipped_before = self.engine.skipped_steps  # restored by the load: not a skip of this run

    def master_shards(self) -> list[MasterShard]:
        """Each trainable parameter's fp32 master fragment on this rank, from the `_hp_mapping` the ZeRO-1/2
        and bf16 optimizers link to every parameter (None: this rank holds none of it). Parameters without
        one have no separate master (fp32 without ZeRO) or are frozen: the module's values, full."""
        shards = []
        for name, p in self.engine.module.named_parameters():
            mapping = getattr(p, "_hp_mapping", False)
            if mapping is False or not p.requires_grad:
                shards.append(MasterShard(name, p.detach(), 0, tuple(p.shape), p.requires_grad, replicated=True))
            elif mapping is not None:
                shards.append(MasterShard(name, mapping.get_hp_fragment(), mapping.lp_fragment_address.start,
                                          tuple(p.shape)))
        return shards

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        if self.engine.zero_optimization_stage() == 3:
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()))
        return contextlib.nullcontext()

    def loss_scale(self) -> float | None:
        if self.ds_config.get("fp16", {}).get("enabled"):
            return float(self.engine.optimizer.cur_scale) if hasattr(self.engine.optimizer, "cur_scale") else None
        return None


def _knows_bf16_overflow_check() -> bool:
    """Whether this DeepSpeed has the bf16 `check_grad_overflow` key (older ones reject unknown keys)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return False
    return "check_grad_overflow" in DeepSpeedBF16Config.model_fields
