"""Loading local weight files into the timm model (unchanged) and, when present, the gates."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from timm.models import vision_transformer
from torch import nn

# Containers seen in the wild: DeiT {"model": ...}, Lightning {"state_dict": ...}, DeepSpeed {"module": ...}.
_WRAPPER_KEYS = ("model", "state_dict", "module")
_MAX_LISTED = 12


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin (torch.load, weights_only) or .safetensors file, unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap_state_dict(obj, source=str(path))


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Peel {"model": ...}-style wrappers and a DDP "module." prefix off a state dict."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state dict of tensors")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


StateDict = dict[str, torch.Tensor]


def split_student_state(sd: StateDict) -> tuple[StateDict, StateDict]:
    """(timm weights, gate weights): a student file has vit./gates. prefixes, a timm file has neither."""
    if not any(k.startswith("vit.") for k in sd):
        return sd, {}
    vit_sd = {k[len("vit."):]: v for k, v in sd.items() if k.startswith("vit.")}
    gate_sd = {k[len("gates."):]: v for k, v in sd.items() if k.startswith("gates.")}
    other = sorted(k for k in sd if not k.startswith(("vit.", "gates.")))
    if other:
        raise ValueError(f"student checkpoint has keys outside vit./gates.: {_listed(other)}")
    return vit_sd, gate_sd


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), failing first with a ValueError that names every bad key and shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if sd[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listed(shapes)}")
    if problems:
        raise ValueError(f"cannot load {what}: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)


def load_vit_weights(vit: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load timm-format weights through timm's own filter (pos-embed resize, conv patch embed) strictly."""
    module = sys.modules.get(type(vit).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", vision_transformer.checkpoint_filter_fn)
    load_strict(vit, filter_fn(sd, vit), what=f"weights into {type(vit).__name__}")


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a file into a student or teacher: dense weights into model.vit, gate weights if both have them."""
    vit_sd, gate_sd = split_student_state(read_state_dict(path))
    load_vit_weights(model.vit, vit_sd)
    gates = getattr(model, "gates", None)
    if gate_sd and gates is not None and len(gates):
        load_strict(gates, gate_sd, what="gate weights")
