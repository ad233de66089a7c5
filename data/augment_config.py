"""The DeiT recipe's augmentation knobs, in one dataclass without torch.

The run config's `data` section extends it (`trainer.config.DataConfig`), so every knob is declared once
and reaches `train_transform`, `eval_transform` and `DeviceAugment` as it is: `data.auto_augment`,
`data.scale`, ... are these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_CROP_PCT = 0.875  # timm's default eval crop, for models whose pretrained config has none


@dataclass
class AugmentConfig:
    """Defaults are DeiT's (timm's `create_transform` and `Mixup` arguments of the same names)."""

    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm RandAugment spec ('' disables)."""
    scale: list = field(default_factory=lambda: [0.08, 1.0])
    """Random-resized-crop area range (DeiT: 0.08-1; raise the floor when objects are small)."""
    hflip: float = 0.5
    """Horizontal-flip probability (0 for data where mirroring changes the class, e.g. digits)."""
    color_jitter: float = 0.4
    """Brightness/contrast/saturation jitter strength (timm's default); timm skips it when auto_augment is set."""
    interpolation: str = "bicubic"
    """Resize interpolation of the train and eval transforms."""
    reprob: float = 0.25
    """Random-erasing probability."""
    mixup: float = 0.8
    """Mixup alpha (0 disables)."""
    cutmix: float = 1.0
    """CutMix alpha (0 disables)."""
    mixup_prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are on."""
    smoothing: float = 0.1
    """Label smoothing."""
    crop_pct: float = 0.0
    """Eval centre-crop fraction (0 = the timm model's pretrained config, else 0.875)."""
