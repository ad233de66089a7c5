"""Analytic GMACs of a timm ViT, dense or with live-token counts per stage (what the papers report).

Compute has one unit in this project: GMACs (multiply-accumulates / 1e9), the unit of the DynamicViT and
AS-ViT tables, which call it "FLOPs"; `count_flops` keeps that public name and returns GMACs.

Per block: (sum of its linear weights) * n + 2 * n^2 * A, with n = live tokens incl. prefix tokens
and A the attention width; for DeiT this is the familiar 12 n C^2 + 2 n^2 C. Plus the patch embed,
the classifier head and the gates' own cost. Norms, activations and softmax are not counted (as in
the DynamicViT / AS-ViT tables). Works on meta-device models: only weight shapes are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTCost:
    """Shape facts of a timm ViT that fix its GMACs."""

    patch_size: tuple[int, int]
    num_prefix: int
    patch_linear: int  # weights applied per patch: conv kernel volume x embed dim
    head_linear: int  # weights of the classifier head(s), applied once per image
    block_linear: tuple[int, ...]  # per token, per block
    block_attn_dim: tuple[int, ...]


def full_numel(param: torch.Tensor) -> int:
    """Element count of a parameter, also when ZeRO-3 has partitioned it (it then keeps `ds_numel`)."""
    return int(getattr(param, "ds_numel", param.numel()))


def linear_weights(module: nn.Module) -> int:
    """Sum of Linear/Conv2d weight sizes: multiply-accumulates per token (per patch for the patch embed)."""
    return sum(full_numel(m.weight) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def patch_embed_macs(patch_embed: nn.Module) -> int:
    """MACs per patch token of the patch embedding: its weight sizes (one output per patch), or what a
    multi-layer stem reports itself (`macs_per_patch`, model.conv_stem)."""
    per_patch = getattr(patch_embed, "macs_per_patch", None)
    return per_patch() if callable(per_patch) else linear_weights(patch_embed)


def vit_cost(vit: nn.Module) -> ViTCost:
    """Read the compute-relevant shapes off a timm VisionTransformer."""
    patch = vit.patch_embed.patch_size
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    attn_dims = []
    for blk in vit.blocks:
        attn = blk.attn
        attn_dims.append(getattr(attn, "attn_dim", attn.num_heads * attn.head_dim))
    heads = [getattr(vit, name, None) for name in ("head", "head_dist")]  # distilled DeiT has two
    heads = [h for h in heads if isinstance(h, nn.Module)]
    return ViTCost(
        patch_size=patch,
        num_prefix=vit.num_prefix_tokens,
        patch_linear=patch_embed_macs(vit.patch_embed),
        head_linear=sum(linear_weights(h) for h in heads),
        block_linear=tuple(linear_weights(blk) for blk in vit.blocks),
        block_attn_dim=tuple(attn_dims),
    )


def num_patches(cost: ViTCost, img_size: int | tuple[int, int]) -> int:
    """Patch tokens at an input size: (H // p) * (W // p); 196 at 224/16, 576 at 384/16."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    return (h // cost.patch_size[0]) * (w // cost.patch_size[1])


def block_gmacs(cost: ViTCost, index: int, tokens: float | torch.Tensor) -> float | torch.Tensor:
    """GMACs of block `index` on `tokens` live tokens (incl. prefix); tensors stay differentiable."""
    return (cost.block_linear[index] * tokens + 2 * tokens * tokens * cost.block_attn_dim[index]) / 1e9


def pruned_gmacs(
    cost: ViTCost,
    patches: int,
    locations: list[int],
    kept: list[float | torch.Tensor],
    gate_gmacs: list[float | torch.Tensor],
) -> float | torch.Tensor:
    """Whole-model GMACs when kept[s] patch tokens live from block locations[s] on (gate_gmacs: the gates' own).

    Entries of kept may be numbers or per-sample tensors [B] (then the result is [B], and carries
    the gradient of a straight-through mask sum: the AS-ViT budget loss needs it).
    """
    total = (cost.patch_linear * patches + cost.head_linear) / 1e9 + sum(gate_gmacs)
    live: float | torch.Tensor = patches
    stage = 0
    for index in range(len(cost.block_linear)):
        if stage < len(locations) and index == locations[stage]:
            live = kept[stage]
            stage += 1
        total = total + block_gmacs(cost, index, live + cost.num_prefix)
    return total


def dense_gmacs(cost: ViTCost, patches: int) -> float:
    """GMACs of the unpruned model on `patches` patch tokens."""
    return float(pruned_gmacs(cost, patches, [], [], []))


def count_flops(
    model: nn.Module, img_size: int | tuple[int, int], keep_counts: list[int] | None = None
) -> float:
    """GMACs per image of a timm ViT, a Teacher, or a PrunedViT student at img_size.

    Students: keep_counts if given; else the kept counts of the last eval forward at this size;
    else DynamicViT's deterministic int(N rho^s) schedule; for AS-ViT (whose counts depend on the
    image) one eval forward of a fixed synthetic image at batch 1, i.e. what the thresholds give.
    """
    vit = getattr(model, "vit", model)
    cost = vit_cost(vit)
    patches = num_patches(cost, img_size)
    if not hasattr(model, "gates") or not len(model.gates):
        return dense_gmacs(cost, patches)
    counts = list(keep_counts) if keep_counts is not None else model.eval_keep_counts(img_size)
    if len(counts) != len(model.locations):
        raise ValueError(f"keep_counts needs {len(model.locations)} entries (one per gate), got {counts}")
    return float(model.gmacs(patches, counts))
