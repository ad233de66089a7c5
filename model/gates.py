"""The two gate families: DynamicViT's token predictor and AS-ViT's learnable thresholds.

Gates only decide; the student applies the decisions (masking in training, gathering in eval).
Every decision is computed in fp32, whatever the module or autocast dtype: fp16 Gumbel noise can be
inf, and AS-ViT scores (~1/N) and thresholds (~1e-3) do not survive a 1e-4 temperature in half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import fp32_region
from model.flops import linear_weights

ASVIT_TEMPERATURE = 1e-4  # AS-ViT's sigmoid temperature: the soft mask is a near-step at theta
ASVIT_REFERENCE_PATCHES = 196  # the AS-ViT threshold inits were tuned at 224 (14 x 14 patches)
GUMBEL_TAU = 1.0  # DynamicViT samples hard decisions at temperature 1


class DynamicViTPredictor(nn.Module):
    """DynamicViT's per-gate MLP: local features + kept-token mean -> log-probs (channel 0 = keep)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.linear_per_token = linear_weights(self)  # fixed now: ZeRO-3 later partitions the weights

    def forward(self, tokens: torch.Tensor, prev_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs [B, N, 2] in fp32 for patch tokens [B, N, C]; prev_keep [B, N] weights the mean."""
        z = self.in_conv(tokens)
        half = z.shape[-1] // 2
        local, glob = z[..., :half], z[..., half:]
        # The global context is the mean over tokens still alive; fp32 so long sums stay exact in half.
        with fp32_region(z.device.type):
            if prev_keep is None:
                pooled = glob.float().mean(dim=1, keepdim=True)
            else:
                w = prev_keep.float().unsqueeze(-1)
                # An image whose every patch token was dropped would divide 0 by 0 (NaN loss, seen on the
                # 16-token smoke model); any kept token makes the {0,1} count >= 1, untouched by the clamp.
                pooled = (glob.float() * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(0.5)
        z = torch.cat([local, pooled.to(local.dtype).expand(-1, local.shape[1], -1)], dim=-1)
        logits = self.out_conv(z)
        with fp32_region(logits.device.type):
            return F.log_softmax(logits.float(), dim=-1)

    def gmacs(self, live_patches: float | torch.Tensor, num_prefix: int) -> float | torch.Tensor:
        """Predictor cost: its linear layers on every live patch token (~1.625 C^2 MACs per token)."""
        del num_prefix  # the predictor never sees prefix tokens
        return self.linear_per_token * live_patches / 1e9


def gumbel_keep(log_probs: torch.Tensor, prev_keep: torch.Tensor | None) -> torch.Tensor:
    """Hard Gumbel-softmax keep decision [B, N] in {0, 1}, straight-through, cumulative with prev_keep."""
    with fp32_region(log_probs.device.type):
        log_probs = log_probs.float()
        # Same sampler as F.gumbel_softmax, but pinned to fp32: -log(Exp(1)) is Gumbel(0, 1).
        gumbels = -torch.empty_like(log_probs).exponential_().log()
        soft = ((log_probs + gumbels) / GUMBEL_TAU).softmax(dim=-1)
        hard = F.one_hot(soft.argmax(dim=-1), num_classes=2).to(soft.dtype)
        keep = (hard - soft.detach() + soft)[..., 0]
        return keep if prev_keep is None else keep * prev_keep.float()


class ThresholdGate(nn.Module):
    """AS-ViT's learnable score threshold for one stage (a [1] tensor: ZeRO-friendly, no 0-d param)."""

    def __init__(self, init: float, attn_dim: int) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.full((1,), float(init)))
        self.attn_dim = attn_dim  # of the scored block: sets the scoring cost
        self.calibrate_to: int | None = None  # set by PrunedViT.calibrate_thresholds for one forward
        self.last_above: torch.Tensor | None = None  # [B] tokens above theta in the last eval forward

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """Straight-through mask [B, N] in {0, 1}: hard step forward, sigmoid((S - theta)/T) backward."""
        with fp32_region(scores.device.type):
            soft = torch.sigmoid((scores.float() - self.threshold.float()) / ASVIT_TEMPERATURE)
            hard = (soft > 0.5).to(soft.dtype)
            return hard - soft.detach() + soft

    def gmacs(self, live_patches: float | torch.Tensor, num_prefix: int) -> float | torch.Tensor:
        """Scoring cost: the CLS attention row (q_cls . k) and the per-head context norms, 2 n A MACs."""
        return 2 * self.attn_dim * (live_patches + num_prefix) / 1e9

    def keep_count(self, scores: torch.Tensor) -> int:
        """Eval keep count: tokens above theta for one image, the batch-mean count for a batch (>= 1)."""
        if self.calibrate_to is not None:
            return self._calibrate(scores)
        with fp32_region(scores.device.type):
            above = (scores.float() > self.threshold.float()).sum(dim=-1).float()
        self.last_above = above  # per image: what an export's calibration averages over many batches
        return max(1, min(scores.shape[-1], int(torch.round(above.mean()).item())))


    @torch.no_grad()
    def _calibrate(self, scores: torch.Tensor) -> int:
        # theta halfway between the (kB)-th and (kB+1)-th best score of the whole batch, so exactly
        # k tokens per image pass on average: the batch-mean rule then keeps k.
        batch, tokens = scores.shape
        k = max(1, min(self.calibrate_to, tokens))
        self.calibrate_to = None
        top = scores.float().flatten().topk(min(k * batch + 1, batch * tokens)).values
        theta = (top[k * batch - 1] + top[-1]) / 2 if k < tokens else top[-1] - 1e-6
        self.threshold.fill_(theta.item())
        return k


def asvit_threshold_init(stage: int, num_patches: int) -> float:
    """AS-ViT init (s+1) * 1e-3 at 196 patches, scaled by 196/N: scores are attention mass ~ 1/N."""
    return (stage + 1) * 1e-3 * ASVIT_REFERENCE_PATCHES / num_patches


def dynamicvit_keep_count(num_patches: int, keep_ratio: float, stage: int) -> int:
    """DynamicViT eval keep count int(N * rho^(s+1)), relative to the original N (>= 1).

    The 1e-6 guards float error only (0.7 * 100 must give 70, not 69); 196 -> 137/96/67 at rho 0.7.
    """
    return max(1, int(num_patches * keep_ratio ** (stage + 1) + 1e-6))


def default_locations(gate: str, depth: int) -> list[int]:
    """Gate block indices: 3/6/9 (DynamicViT) and 4/7/10 (AS-ViT) of 12 blocks, scaled to depth."""
    if gate == "none":
        return []
    # Fractions of depth from the papers' 12-block placement; AS-ViT needs a block before each gate.
    twelfths = (3, 6, 9) if gate == "dynamicvit" else (4, 7, 10)
    lowest = 0 if gate == "dynamicvit" else 1
    locs = sorted({min(depth - 1, max(lowest, round(t * depth / 12))) for t in twelfths})
    return locs


def validate_locations(gate: str, locations: list[int], depth: int) -> list[int]:
    """Check gate locations are ints, strictly increasing and inside the model; return them as a list."""
    locs = [int(loc) for loc in locations]
    if any(loc != orig for loc, orig in zip(locs, locations, strict=True)):
        raise ValueError(f"gate locations must be integers, got {list(locations)}")
    lowest = 1 if gate == "asvit" else 0
    if gate != "none" and not locs:
        raise ValueError(f"gate {gate!r} needs at least one location")
    if any(b <= a for a, b in zip(locs, locs[1:], strict=False)):
        raise ValueError(f"gate locations must be strictly increasing, got {locs}")
    if locs and (locs[0] < lowest or locs[-1] > depth - 1):
        why = " (AS-ViT scores tokens with the block before each gate)" if gate == "asvit" else ""
        raise ValueError(f"gate locations {locs} must lie in [{lowest}, {depth - 1}] for {depth} blocks{why}")
    return locs
