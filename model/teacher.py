"""The frozen dense teacher: a plain timm ViT that supplies logits and final tokens for distillation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from model.backbone import build_vit
from model.weights import load_weights


class TeacherOutput(NamedTuple):
    """Distillation targets (a NamedTuple, like StudentOutput)."""

    logits: torch.Tensor  # [B, K]
    tokens: torch.Tensor  # [B, N, C] final-normed patch tokens, same layout as StudentOutput.tokens


class Teacher(nn.Module):
    """Dense timm ViT (`.vit`), always in eval mode with frozen weights; run it under inference_mode."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval whatever is asked: a loop calling model.train() must not turn on dropout here."""
        del mode
        return super().train(False)

    def compile_blocks(self) -> None:
        """torch.compile each block's forward in place (`train.compile`); the state dict is unchanged."""
        for blk in self.vit.blocks:
            blk.compile()

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """Logits and final-normed patch tokens (prefix tokens excluded)."""
        features = self.vit.forward_features(images)
        return TeacherOutput(self.vit.forward_head(features), features[:, self.vit.num_prefix_tokens:])


def create_teacher(arch: str, checkpoint: str | Path | None = None, allow_pickle: bool = False,
                   **timm_kwargs: Any) -> Teacher:
    """Frozen dense teacher of `arch`; checkpoint: a timm/DeiT file or a saved student (gates ignored).
    A file that needs pickle is refused unless allow_pickle=True."""
    teacher = Teacher(build_vit(arch, **timm_kwargs))
    if checkpoint is not None:
        load_weights(teacher, checkpoint, allow_pickle)
    return teacher
