"""A timm ViT with a convolutional stem ("Early Convolutions Help Transformers See Better", Xiao et al. 2021),
registered with timm as `vit_convstem_tiny`: the demo's teacher and students.

The stem replaces the single patch-sized linear projection with stride-2 3x3 convolutions (GroupNorm, GELU)
down to the patch grid, then a 1x1 projection to the embedding width. The token grid, the positional
embedding and every block are timm's, so gating, pruning and FLOPs counting work unchanged. It exists for the
demo: a from-scratch ViT on a few thousand small images learns where the object is far faster with it.
timm's own hybrid stems (`HybridEmbed` over a ResNet) are larger than the whole demo model.
"""

from __future__ import annotations

import math
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed (same grid, checks and output) whose `proj` is a conv stem of total stride patch_size."""

    def __init__(self, img_size: Any = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 **kwargs: Any) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        stride = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or stride < 2 or stride & (stride - 1):
            raise ValueError(f"a conv stem needs a square power-of-two patch size, got {self.patch_size}")
        layers: list[nn.Module] = []
        stages = int(math.log2(stride))
        channels = in_chans
        for stage in range(stages):
            width = max(8, embed_dim >> (stages - 1 - stage))  # ..., embed/4, embed/2, embed
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, width),
                       nn.GELU()]
            channels = width
        layers.append(nn.Conv2d(channels, embed_dim, 1, bias=kwargs.get("bias", True)))
        self.proj = nn.Sequential(*layers)

    def macs_per_patch(self) -> int:
        """Multiply-accumulates per output token: each conv's weight size times its outputs per patch."""
        total, side = 0, self.patch_size[0]
        for layer in self.proj:
            if isinstance(layer, nn.Conv2d):
                side //= layer.stride[0]
                total += layer.weight.numel() * side * side
        return total


# timm reads the pretrained config (input size, crop, normalisation) from here; there are no weights.
default_cfgs = generate_default_cfgs({"vit_convstem_tiny.untrained": {
    "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 1.0, "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj.0",
    "classifier": "head"}})


@register_model
def vit_convstem_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny widths (192, 12 blocks, 3 heads) with a conv stem at patch 8; no pretrained weights."""
    if pretrained:
        raise ValueError("vit_convstem_tiny has no pretrained weights")
    args = dict(patch_size=8, embed_dim=192, depth=12, num_heads=3, embed_layer=ConvStemPatchEmbed)
    return _create_vision_transformer("vit_convstem_tiny", pretrained=False, **dict(args, **kwargs))
