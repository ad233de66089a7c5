"""Model EMA in fp32 over the optimizer's master weights, sharded the way the backend shards them.

Why not timm's ModelEmaV3 (which the official DynamicViT and AS-ViT code use, as timm's ModelEma): it
averages a module's parameters. Under DeepSpeed bf16 those are the bf16 copies, and an average kept
in bf16 never moves at AS-ViT's decay (0.99996 x w + 4e-5 x w' rounds back to w: the step is far below
bf16's resolution); under ZeRO-1/2 the fp32 master weights are not in the module at all but split
across ranks inside DeepSpeed's optimizer. So each rank averages the fp32 master values it owns
(`Backend.master_shards`: DeepSpeed's `_hp_mapping` fragments, the mapping its own
`safe_get_full_fp32_param` reads; the module's fp32 parameters under Accelerate). That costs 1/world
of a model per rank under ZeRO and no communication per step; the full weights are gathered only to
evaluate (`full_state_dict`, a collective) or assembled from the checkpoint files to export
(`read_ema_weights`, no process group). Same update as timm: ema = decay * ema + (1 - decay) * w,
every optimizer step, no warm-up (as the official code).

On disk: `ema_rank<r>.safetensors` in the checkpoint directory, this rank's averages (bitwise), with
each fragment's offset and full shape in the metadata.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.infra import dist

EMA_FILE = "ema_rank{rank}.safetensors"


@dataclass(frozen=True)
class MasterShard:
    """The fp32 master values of one parameter that this rank holds."""

    name: str
    values: torch.Tensor  # updated in place by the optimizer: a view, never a copy
    start: int  # offset of `values` in the flattened full parameter
    shape: tuple[int, ...]  # the full parameter's shape
    trainable: bool = True  # frozen parameters are averaged trivially (they never change)
    replicated: bool = False  # every rank holds the same full values (not a ZeRO fragment)


class WeightEMA:
    """fp32 EMA of the master shards `shards()` returns (asked again after a checkpoint load: DeepSpeed
    relinks its fp32 partitions there). `shapes` lists every parameter of the model (name -> full shape),
    the same on every rank: a rank may hold no fragment of some."""

    def __init__(self, shards: Callable[[], list[MasterShard]], shapes: dict[str, tuple[int, ...]],
                 decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.shards, self.shapes, self.decay = shards, dict(shapes), decay
        self.layout = shards()
        self.average = [s.values.detach().float().clone() for s in self.layout]
        self.updates = 0
        self._link(self.layout)

    def _link(self, layout: list[MasterShard]) -> None:
        """The (average, master values) pairs `update` moves: the trainable shards (frozen ones never change)."""
        pairs = [(avg, s.values) for avg, s in zip(self.average, layout, strict=True) if s.trainable]
        self._averages = [avg for avg, _ in pairs]
        self._masters = [values for _, values in pairs]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current master weights (on the device, no host sync)."""
        if self._averages:
            torch._foreach_lerp_(self._averages, [v.float() for v in self._masters], 1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def full_state_dict(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The full fp32 EMA weights on every rank (a collective: all ranks call)."""
        offsets, total = _offsets(self.shapes)
        flat = torch.zeros(total, dtype=torch.float32, device=device)
        for shard, avg in zip(self.layout, self.average, strict=True):
            # Replicated values are added by rank 0 only: the sum over ranks must count them once.
            if not shard.replicated or dist.rank() == 0:
                begin = offsets[shard.name] + shard.start
                flat[begin:begin + avg.numel()] = avg.flatten().to(device)
        dist.all_reduce(flat)
        return {name: flat[offsets[name]:offsets[name] + math.prod(shape)].reshape(shape).cpu().clone()
                for name, shape in self.shapes.items()}

    def save(self, directory: str) -> None:
        """This rank's averages and layout to `ema_rank<r>.safetensors`."""
        from safetensors.torch import save_file

        starts = {s.name: s.start for s in self.layout}
        shapes = {name: list(shape) for name, shape in self.shapes.items()}
        meta = {"decay": repr(self.decay), "updates": str(self.updates), "starts": json.dumps(starts),
                "shapes": json.dumps(shapes)}
        tensors = {s.name: avg.detach().cpu().contiguous() for s, avg in zip(self.layout, self.average, strict=True)}
        save_file(tensors, os.path.join(directory, EMA_FILE.format(rank=dist.rank())), metadata=meta)

    def load(self, directory: str) -> None:
        """Restore what `save` wrote for this rank, bitwise; the layout must match (same world size and model)."""
        from safetensors import safe_open

        path = os.path.join(directory, EMA_FILE.format(rank=dist.rank()))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the checkpoint has no EMA for this rank (ema.enabled was off when it "
                                    "was written?); resume with ema.enabled=false, or export its weights and start a "
                                    "new run from them")
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            mine = {s.name for s in self.layout}
            if names != mine:
                raise ValueError(f"{path}: EMA parameters differ from this run's: missing {sorted(mine - names)[:5]}, "
                                 f"unexpected {sorted(names - mine)[:5]}")
            for shard, avg in zip(self.layout, self.average, strict=True):
                saved = f.get_tensor(shard.name)
                if saved.shape != avg.shape:
                    raise ValueError(f"{path}: EMA shard {shard.name} has {tuple(saved.shape)}, this run "
                                     f"{tuple(avg.shape)} (another ZeRO partitioning?)")
                avg.copy_(saved)
            self.updates = int(f.metadata().get("updates", "0"))
        self._link(self.shards())  # the backend's load may have relinked its master partitions


def read_ema_weights(directory: str) -> dict[str, torch.Tensor]:
    """The full fp32 EMA weights from a checkpoint's `ema_rank*.safetensors` files (no process group)."""
    from safetensors import safe_open

    files = sorted(n for n in os.listdir(directory) if n.startswith("ema_rank") and n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no EMA weights in this checkpoint (train with ema.enabled=true)")
    full: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            meta = f.metadata()
            for param, shape in json.loads(meta["shapes"]).items():
                full.setdefault(param, torch.zeros(shape, dtype=torch.float32))
            for param, start in json.loads(meta["starts"]).items():
                part = f.get_tensor(param).flatten()
                full[param].view(-1)[start:start + part.numel()] = part
    return full


def _offsets(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], int]:
    """Each parameter's offset in one flat buffer of all full parameters."""
    offsets: dict[str, int] = {}
    total = 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += math.prod(shape)
    return offsets, total
