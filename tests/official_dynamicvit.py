"""DynamicViT's own DeiT model, inference only, re-written from the official code for checkpoint tests.

Source: github.com/raoyongming/DynamicViT, models/dyvit.py (`VisionTransformerDiffPruning`, `PredictorLG`,
`batch_index_select` from utils.py); the NeurIPS release (commit c6ccb9e, vit.py) is the same file. Module
and parameter names are the official ones, so `state_dict()` is an official-format checkpoint. Imports
nothing from `model/`: it is the reference our loader and pruned forward are compared with.

Kept from the official eval forward: the keep count int(init_n * token_ratio[s]) with token_ratio
[rho, rho**2, rho**3] (main.py), the top-k by descending argsort of the keep log-prob (tokens stay in
score order, not spatial order), the predictor's mean over the tokens still alive, an explicit softmax
attention. One change: the official code hard-codes init_n = 14 * 14 (DeiT at 224 px, patch 16); here it
is the model's patch count, which is the same at that size and lets the tests run a tiny model.
Also recorded for the tests (not in the official code): `kept_patches`, the original patch indices kept at
each stage, and `stage_scores`, the scores each stage ranked.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn


def batch_index_select(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-sample gather along dim 1: x [B, N] or [B, N, C], idx [B, K] -> [B, K] or [B, K, C]."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # eval: no policy, plain softmax
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class PredictorLG(nn.Module):
    """Local + global features -> keep/drop log-probs; LayerNorm at its default eps (1e-5), as officially."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        b, n, c = x.shape
        local_x = x[:, :, : c // 2]
        global_x = (x[:, :, c // 2:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local_x, global_x.expand(b, n, c // 2)], dim=-1))


class VisionTransformerDiffPruning(nn.Module):
    """The official DeiT with predictors before the `pruning_loc` blocks (eval forward only)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, pruning_loc: tuple[int, ...] = (3, 6, 9),
                 token_ratio: tuple[float, ...] = (0.7, 0.7 ** 2, 0.7 ** 3)) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes)
        self.score_predictor = nn.ModuleList([PredictorLG(embed_dim) for _ in pruning_loc])
        self.pruning_loc = list(pruning_loc)
        self.token_ratio = list(token_ratio)
        self.kept_patches: list[torch.Tensor] = []
        self.stage_scores: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise NotImplementedError("only the official eval (inference) forward is re-implemented")
        b = x.shape[0]
        x = torch.cat((self.cls_token.expand(b, -1, -1), self.patch_embed(x)), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        init_n = self.patch_embed.num_patches  # official: 14 * 14
        prev_decision = torch.ones(b, init_n, 1, dtype=x.dtype, device=x.device)
        original = torch.arange(init_n, device=x.device).expand(b, -1)
        self.kept_patches, self.stage_scores = [], []
        p_count = 0
        for i, blk in enumerate(self.blocks):
            if i in self.pruning_loc:
                pred_score = self.score_predictor[p_count](x[:, 1:], prev_decision).reshape(b, -1, 2)
                score = pred_score[:, :, 0]
                num_keep_node = int(init_n * self.token_ratio[p_count])
                keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep_node]
                cls_policy = torch.zeros(b, 1, dtype=keep_policy.dtype, device=keep_policy.device)
                x = batch_index_select(x, torch.cat([cls_policy, keep_policy + 1], dim=1))
                prev_decision = batch_index_select(prev_decision, keep_policy)
                original = batch_index_select(original, keep_policy)
                self.stage_scores.append(score)
                self.kept_patches.append(original)
                p_count += 1
            x = blk(x)
        x = self.norm(x)
        return self.head(self.pre_logits(x[:, 0]))
