"""Kept-token overlays (the DynamicViT figure): the image, then one panel per stage with dropped
patches faded to white."""

from __future__ import annotations

import numpy as np
import torch


def overlay_row(image: torch.Tensor, keep_indices: list[torch.Tensor], grid: tuple[int, int],
                fade: float = 0.75) -> np.ndarray:
    """[3,H,W] uint8 image + per-stage kept patch indices -> HWC uint8 strip (image | stage 1 | ...)."""
    img = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    h, w = img.shape[:2]
    gh, gw = grid
    ph, pw = h // gh, w // gw
    panels = [img]
    for kept in keep_indices:
        keep = np.zeros(gh * gw, dtype=bool)
        keep[kept.cpu().numpy()] = True
        mask = np.repeat(np.repeat(keep.reshape(gh, gw), ph, 0), pw, 1)[..., None]
        faded = img * (1 - fade) + 255 * fade
        panels.append(np.where(mask, img, faded))
    sep = np.full((h, 2, 3), 255, dtype=np.float32)
    strip = [p for panel in panels for p in (panel, sep)][:-1]
    return np.concatenate(strip, axis=1).clip(0, 255).astype(np.uint8)


def overlay_grid(images: torch.Tensor, keep_indices: list[torch.Tensor], grid: tuple[int, int],
                 limit: int) -> np.ndarray | None:
    """Rows of `overlay_row` for the first `limit` images of a batch (None when nothing was pruned)."""
    if not keep_indices:
        return None
    rows = [overlay_row(images[i], [k[i] for k in keep_indices], grid) for i in range(min(limit, len(images)))]
    if not rows:
        return None
    sep = np.full((2, rows[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([p for r in rows for p in (r, sep)][:-1], axis=0)
