"""DeiT transforms, built with timm (never re-written here).

Workers produce uint8 tensors (timm's prefetcher layout): a quarter of the bytes of float32 through
the worker queue and the host-to-device copy. Normalisation, random erasing and mixup/cutmix run on
the batch, on the training device, in `DeviceAugment`, like timm's PrefetchLoader does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing

from data.augment_config import DEFAULT_CROP_PCT, AugmentConfig

# Normalisation of the DeiT weights (timm's ImageNet constants); the knobs in AugmentConfig never change it.
MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def train_transform(img_size: int, aug: AugmentConfig) -> Callable:
    """PIL image -> uint8 CHW tensor: random-resized crop, flip, RandAugment (timm)."""
    transform = create_transform(img_size, is_training=True, scale=tuple(aug.scale), hflip=aug.hflip,
                                 color_jitter=aug.color_jitter or None, auto_augment=aug.auto_augment or None,
                                 interpolation=aug.interpolation, mean=MEAN, std=STD, use_prefetcher=True)
    tolerate_zero_bit_posterize(transform)
    return transform


def posterize_or_black(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, with 0 bits kept giving a black image (what Pillow < 13 did) instead of a ValueError."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def tolerate_zero_bit_posterize(transform: Callable) -> int:
    """Swap the posterize function of a transform's RandAugment ops; returns how many were swapped.

    timm's PosterizeIncreasing maps magnitude 10 (DeiT's m9 + mstd0.5 noise, clipped at 10) to 0 bits,
    which Pillow 13 rejects: ~0.1% of train_transform calls raised, a crash every ~900 images. The
    replacement keeps the old result (black), so the augmentation is the one DeiT trained with.
    """
    patched = 0
    for t in getattr(transform, "transforms", ()):
        for op in t.ops if isinstance(t, RandAugment) else ():
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_or_black
                patched += 1
    return patched


def eval_transform(img_size: int, aug: AugmentConfig) -> Callable:
    """PIL image -> uint8 CHW tensor: resize to img_size / crop_pct, centre crop (timm)."""
    return create_transform(img_size, is_training=False, crop_pct=aug.crop_pct or DEFAULT_CROP_PCT,
                            interpolation=aug.interpolation, mean=MEAN, std=STD, use_prefetcher=True)


class DeviceAugment:
    """Batch-level, on-device half of the pipeline: normalise, random erasing, mixup/cutmix."""

    def __init__(self, aug: AugmentConfig, num_classes: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mean = torch.tensor([255 * m for m in MEAN], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in STD], device=self.device).view(1, 3, 1, 1)
        self.erase = (RandomErasing(aug.reprob, mode="pixel", max_count=1, device=str(self.device))
                      if aug.reprob > 0 else None)
        active = aug.mixup > 0 or aug.cutmix > 0
        self.mixup = (Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                            switch_prob=aug.mixup_switch_prob, label_smoothing=aug.smoothing,
                            num_classes=num_classes) if active else None)
        self.smoothing, self.num_classes = aug.smoothing, num_classes

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> float32 normalised, on the device."""
        images = images.to(self.device, non_blocking=True).float()
        return (images - self.mean) / self.std

    def train(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch -> (normalised, erased, mixed images, soft targets [B, num_classes])."""
        x = self.normalize(images)
        y = labels.to(self.device, non_blocking=True)
        if self.erase is not None:
            x = self.erase(x)
        # timm's Mixup needs an even batch; with an odd one we fall back to smoothed one-hot targets.
        if self.mixup is not None and x.shape[0] % 2 == 0:
            return self.mixup(x, y)
        off = self.smoothing / self.num_classes
        target = torch.full((y.shape[0], self.num_classes), off, device=self.device)
        target.scatter_(1, y.unsqueeze(1), 1.0 - self.smoothing + off)
        return x, target
