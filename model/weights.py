"""Weight files (one .pth/.pt/.bin/.safetensors file of tensors): read, check and load them into the timm
model (unchanged) and, when present, the gates. Training checkpoints (directories) live in trainer/infra.

Weight files are untrusted input: `.pth`/`.pt`/`.bin` go through `torch.load(weights_only=True)` (plain
tensors and containers only, nothing executed) and `.safetensors` through safetensors. A file that
needs real pickle (a custom class inside) is refused with `UnsafeCheckpointError` unless the caller
passes `allow_pickle=True` (config: `ckpt.allow_pickle=true`).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from timm.models import vision_transformer
from torch import nn

# Containers seen in the wild: DeiT {"model": ...}, Lightning {"state_dict": ...}, DeepSpeed {"module": ...}.
_WRAPPER_KEYS = ("model", "state_dict", "module")
_MAX_LISTED = 12
_log = logging.getLogger(__name__)


ALLOW_PICKLE_HINT = "ckpt.allow_pickle=true (--set ckpt.allow_pickle=true; allow_pickle=True in Python)"
# timm and DeiT training scripts save their argparse.Namespace beside the weights; rebuilding one is an
# attribute bag, no code of the file's choosing (timm's own loader allows it too).
DEFAULT_SAFE_GLOBALS = (argparse.Namespace,)


class UnsafeCheckpointError(ValueError):
    """A file that needs pickle beyond plain tensors: loading it could run code, so it is refused."""


def _unpickler_reason(err: Exception) -> str:
    """The one useful line of torch's weights_only error (which global was refused)."""
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global.*)?$", str(err), re.M)
    return found.group(1).strip() if found else str(err).splitlines()[0]


def safe_torch_load(path: str | Path, allow_pickle: bool = False, safe_globals: Iterable[type] = ()) -> object:
    """torch.load with weights_only=True (plus `safe_globals`, known data-only classes); refuses otherwise.

    The check is the load itself, not a scan of the pickle's globals: a static scan misses globals built
    on the stack at run time, the weights_only unpickler does not. Zip files are memory-mapped, so a
    check of a large file reads little. With allow_pickle the file is unpickled in full (trusted files only).
    """
    path = str(path)
    mmap = zipfile.is_zipfile(path)  # legacy (non-zip) torch files cannot be memory-mapped
    allowed = [*DEFAULT_SAFE_GLOBALS, *safe_globals]
    try:
        # safe_globals (torch >= 2.5) scopes the allowlist to this load; nothing is allowed process-wide.
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it needs pickle beyond plain tensors ({_unpickler_reason(e)}), and "
                f"unpickling an untrusted file can run arbitrary code. Convert it to .safetensors, or, only if "
                f"you trust the file, set {ALLOW_PICKLE_HINT}") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def read_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin (weights_only torch.load, see safe_torch_load) or .safetensors file, unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path), device="cpu")
    else:
        obj = safe_torch_load(path, allow_pickle)
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


# DynamicViT's own checkpoints (github.com/raoyongming/DynamicViT, models/dyvit.py; the NeurIPS release's vit.py
# is the same file) keep the DeiT at the top level under timm's names and the predictors as score_predictor.<s>.*,
# whose modules match DynamicViTPredictor index for index (in_conv.0/1, out_conv.0/2/4; their out_conv.5 is
# a weightless LogSoftmax). Only the prefixes differ, so a rename makes them student files.
_OFFICIAL_DYNAMICVIT_GATES = "score_predictor."


def from_official_dynamicvit(sd: StateDict) -> StateDict:
    """An official DynamicViT state dict (score_predictor.* keys, no vit./gates.) with student keys:
    score_predictor.<s>.X -> gates.<s>.X, every other key K -> vit.K; any other dict is returned unchanged.

    Loading stays strict: a key that is neither timm's nor a predictor's is then reported by name."""
    if not any(k.startswith(_OFFICIAL_DYNAMICVIT_GATES) for k in sd) or any(
            k.startswith(("vit.", "gates.")) for k in sd):
        return sd  # not the official layout (a mixed file is reported by split_student_state)
    n = len(_OFFICIAL_DYNAMICVIT_GATES)
    return {(f"gates.{k[n:]}" if k.startswith(_OFFICIAL_DYNAMICVIT_GATES) else f"vit.{k}"): v for k, v in sd.items()}


def split_student_state(sd: StateDict) -> tuple[StateDict, StateDict]:
    """(timm weights, gate weights): a student file has vit./gates. prefixes, a timm file has neither, and an
    official DynamicViT file (score_predictor.*) is renamed to a student's first (from_official_dynamicvit)."""
    sd = from_official_dynamicvit(sd)
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


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str, keep_init: Iterable[str] = ()) -> None:
    """load_state_dict, failing first with a ValueError that names every bad key and shape; only the keys in
    `keep_init` (a re-initialised classifier) may be absent from sd."""
    check_strict(module, sd, what, keep_init)
    module.load_state_dict(sd, strict=not keep_init)


def check_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str, keep_init: Iterable[str] = ()) -> None:
    """ValueError naming every missing, unexpected or mis-shaped key; works on a meta-device module."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd) - set(keep_init))
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


def _filtered(vit: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter for the model's family (pos-embed resize, conv patch embed)."""
    module = sys.modules.get(type(vit).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", vision_transformer.checkpoint_filter_fn)
    return filter_fn(sd, vit)


def other_label_set(vit: nn.Module, sd: dict[str, torch.Tensor], source: str) -> tuple[StateDict, list[str]]:
    """(sd without a classifier whose class count differs from the model's, the keys left to their init).

    timm's rule for fine-tuning to another label set: the head of the file does not fit, so the model keeps
    its freshly initialised one, and a log line says so."""
    own = vit.state_dict()
    classifiers = vit.pretrained_cfg.get("classifier", "head") if hasattr(vit, "pretrained_cfg") else "head"
    keep_init: list[str] = []
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        keys = [k for k in (f"{name}.weight", f"{name}.bias") if k in sd and k in own]
        if keys and sd[keys[0]].shape != own[keys[0]].shape:
            _log.warning("%s: re-initialising the classifier %r: the file has %d classes, the model %d "
                         "(fine-tuning to another label set)", source, name, sd[keys[0]].shape[0],
                         own[keys[0]].shape[0])
            keep_init += keys
    return {k: v for k, v in sd.items() if k not in keep_init}, keep_init


def load_vit_weights(vit: nn.Module, sd: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load timm-format weights through timm's own filter (pos-embed resize, conv patch embed), strictly but
    for a classifier of another class count, which keeps its init."""
    sd, keep_init = other_label_set(vit, _filtered(vit, sd), source)
    load_strict(vit, sd, what=f"{source} into {type(vit).__name__}", keep_init=keep_init)


def check_weights(vit: nn.Module, path: str | Path, allow_pickle: bool = False) -> None:
    """Raise (ValueError, UnsafeCheckpointError) unless `path` would load into `vit`; `vit` may live on
    the meta device, so config validation checks a DeiT-B file in well under a second."""
    vit_sd, _ = split_student_state(read_weights(path, allow_pickle))
    sd, keep_init = other_label_set(vit, _filtered(vit, vit_sd), str(path))
    check_strict(vit, sd, what=f"{path} into {type(vit).__name__}", keep_init=keep_init)


def load_weights(model: nn.Module, path: str | Path, allow_pickle: bool = False) -> None:
    """Load a file into a student or teacher: dense weights into model.vit, gate weights if both have them."""
    vit_sd, gate_sd = split_student_state(read_weights(path, allow_pickle))
    load_vit_weights(model.vit, vit_sd, str(path))
    gates = getattr(model, "gates", None)
    if gate_sd and gates is not None and len(gates):
        load_strict(gates, gate_sd, what="gate weights (the keys after gates. or score_predictor.)")
