"""Building the timm ViT and the two pieces of its forward that the student calls around its block loop."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

import model.conv_stem  # noqa: F401  (registers vit_convstem_tiny with timm)

# The tiny flavour used by tests and smoke runs: the same code path as DeiT, milliseconds on a CPU.
TINY_ARCH = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {
    "img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2, "num_classes": 10,
}

_VIT_PARTS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head")


def build_vit(
    arch: str, img_size: int | None = None, num_classes: int | None = None, **timm_kwargs: Any
) -> nn.Module:
    """timm.create_model(arch, pretrained=False unless asked, ...); user kwargs override the arch's."""
    kwargs = dict(timm_kwargs)
    pretrained = bool(kwargs.pop("pretrained", False))
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    vit = timm.create_model(arch, pretrained=pretrained, **kwargs)
    missing = [p for p in _VIT_PARTS if not hasattr(vit, p)]
    if missing:
        raise TypeError(f"{arch!r} is not a timm VisionTransformer (lacks {missing})")
    return vit


def embed(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens entering the first block: timm's patch embed, pos embed (any size), patch drop, pre-norm."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def head(vit: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from final-normed tokens; average pooling skips masked-out patch tokens.

    With a CLS head (DeiT) this is timm's forward_head. For 'avg' pooling the masked mean makes
    training agree with the gathered eval forward; other poolings (max, map) see all tokens.
    """
    if keep is None or vit.global_pool != "avg" or getattr(vit, "attn_pool", None) is not None:
        return vit.forward_head(x)
    p = vit.num_prefix_tokens
    w = keep.to(x.dtype).unsqueeze(-1)
    pooled = (x[:, p:] * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    if getattr(vit, "pool_include_prefix", False):
        pooled = (x[:, :p].sum(dim=1) + pooled * w.sum(dim=1)) / (p + w.sum(dim=1))
    return vit.head(vit.head_drop(vit.fc_norm(pooled)))
