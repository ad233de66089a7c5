"""The pruned student: an unmodified timm ViT whose block loop is re-done with gates between blocks.

Training (`.train()`): every token stays in the sequence; gates produce cumulative {0,1} keep masks
(straight-through), and dropped tokens are masked as attention keys. Eval (`.eval()`): dropped tokens
are gathered away, so later blocks really run on fewer tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from model.attention import (
    attention_dtype,
    check_attention,
    cls_attention_scores,
    keep_bias,
    run_block,
    tap_attention,
)
from model.backbone import build_vit, embed, head
from model.flops import dense_gmacs, num_patches, pruned_gmacs, vit_cost
from model.gate_types import GATE_TYPES
from model.gates import (
    DynamicViTPredictor,
    ThresholdGate,
    asvit_threshold_init,
    default_locations,
    dynamicvit_keep_count,
    gumbel_keep,
    validate_locations,
)
from model.weights import load_weights


class StudentOutput(NamedTuple):
    """Training-mode output; everything the losses need.

    A NamedTuple rather than a dataclass: output-walking wrappers (Accelerate's fp32 conversion of
    autocast outputs) recurse into tuples and would pass a dataclass through untouched.
    """

    logits: torch.Tensor  # [B, K]
    tokens: torch.Tensor  # [B, N, C] final-normed patch tokens (prefix tokens excluded)
    keep_masks: list[torch.Tensor]  # per stage [B, N] float {0,1}, cumulative, straight-through
    gmacs: torch.Tensor  # [B] GMACs per sample from the live token counts (differentiable)
    keep_ratios: torch.Tensor  # [S] batch-mean kept fraction per stage (detached)
    dense_gmacs: float = 0.0  # GMACs of the dense model at this input size (AS-ViT budget reference)

    @property
    def flops(self) -> torch.Tensor:
        """Deprecated name of `gmacs`."""
        warnings.warn("StudentOutput.flops is deprecated: use StudentOutput.gmacs (GMACs per sample)",
                      DeprecationWarning, stacklevel=2)
        return self.gmacs


class PrunedViT(nn.Module):
    """A timm ViT (`.vit`, unmodified) with token-pruning gates (`.gates`) before `.locations` blocks.

    Eval keep counts: DynamicViT keeps int(N rho^(s+1)) of the original N at stage s; AS-ViT keeps
    the tokens with S > theta for one image and, for a batch, the batch-mean count as top-k (so
    its results depend on the batch size: report it). After an eval forward, `last_keep_counts`
    (list[int] per stage, same for the whole batch) and `last_keep_indices` (list of [B, k_s]
    original patch indices) describe what was kept.

    `attention` picks the key-masked attention of training (`model.attention.ATTENTION_IMPLS`:
    bias | fold | flex | chunked | reference); eval gathers tokens and never masks.
    """

    def __init__(
        self,
        vit: nn.Module,
        gate: str = "dynamicvit",
        keep_ratio: float = 0.7,
        flops_budget: float = 0.65,
        locations: list[int] | None = None,
        chain_masks: bool | None = None,
        attention: str = "bias",
    ) -> None:
        super().__init__()
        self.attention = check_attention(attention)
        if gate not in GATE_TYPES:
            raise ValueError(f"gate must be one of {GATE_TYPES}, got {gate!r}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if not 0.0 < flops_budget <= 1.0:
            raise ValueError(f"flops_budget must be in (0, 1], got {flops_budget}")
        depth = len(vit.blocks)
        if gate == "none" and locations:
            raise ValueError(f"gate='none' takes no locations, got {locations}")
        locs = default_locations(gate, depth) if locations is None else list(locations)
        if gate == "asvit" and getattr(vit, "cls_token", None) is None:
            raise ValueError("AS-ViT scores tokens by CLS attention, but this model has no class token")
        self.vit = vit
        self.gate_type = gate
        self.keep_ratio = keep_ratio
        self.flops_budget = flops_budget
        self.locations = validate_locations(gate, locs, depth)
        # Each paper's code: DynamicViT multiplies a stage's decision by the previous one, AS-ViT does not
        # (a dropped token gets ~0 CLS attention and falls below the next threshold anyway). The forward
        # is the same; the gradient into earlier gates is not.
        self.chain_masks = gate == "dynamicvit" if chain_masks is None else chain_masks
        self._cost = vit_cost(vit)
        self.gates = nn.ModuleList(self._make_gates())
        ref = next(vit.parameters())
        self.gates.to(device=ref.device, dtype=ref.dtype)
        self._stage_at = {loc: s for s, loc in enumerate(self.locations)}
        self._scored_blocks = {loc - 1 for loc in self.locations} if gate == "asvit" else set()
        self._block_runner = run_block  # compile_blocks swaps in the compiled version
        self.last_keep_counts: list[int] | None = None
        self.last_keep_indices: list[torch.Tensor] | None = None
        self.last_num_patches: int | None = None

    def _make_gates(self) -> list[nn.Module]:
        if self.gate_type == "dynamicvit":
            return [DynamicViTPredictor(self.vit.embed_dim) for _ in self.locations]
        if self.gate_type == "asvit":
            patches = getattr(self.vit.patch_embed, "num_patches", 196)
            return [
                ThresholdGate(asvit_threshold_init(s, patches), self._cost.block_attn_dim[loc - 1])
                for s, loc in enumerate(self.locations)
            ]
        return []

    @property
    def target_keep_ratios(self) -> list[float]:
        """DynamicViT's per-stage keep targets rho^(s+1) (for the ratio loss); [] for other gates."""
        if self.gate_type != "dynamicvit":
            return []
        return [self.keep_ratio ** (s + 1) for s in range(len(self.locations))]

    def forward(self, images: torch.Tensor) -> StudentOutput | torch.Tensor:
        """Train mode: StudentOutput from the masked forward. Eval mode: logits from the pruned forward."""
        if self.training:
            return self.forward_masked(images)
        return self.forward_pruned(images)

    def _run(
        self, blk: nn.Module, x: torch.Tensor, keep_full: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        runner = self._block_runner
        if getattr(self.vit, "grad_checkpointing", False) and torch.is_grad_enabled():
            return activation_checkpoint(runner, blk, x, keep_full, bias, self.attention, use_reentrant=False)
        return runner(blk, x, keep_full, bias, self.attention)

    def compile_blocks(self) -> None:
        """torch.compile the training forward of each block (`train.compile`). Block by block: the gates'
        data-dependent choices and AS-ViT's attention taps stay eager between them; weights, state dict
        and the eval forward are untouched."""
        self._block_runner = torch.compile(run_block)

    def forward_masked(
        self, images: torch.Tensor, keep_masks: list[torch.Tensor] | None = None
    ) -> StudentOutput:
        """Masked forward (all tokens stay, dropped ones masked as keys); keep_masks replays decisions."""
        vit, prefix = self.vit, self.vit.num_prefix_tokens
        if keep_masks is not None and len(keep_masks) != len(self.locations):
            raise ValueError(f"need {len(self.locations)} keep masks (one per gate), got {len(keep_masks)}")
        x = embed(vit, images)
        batch, patches = x.shape[0], x.shape[1] - prefix
        bias_dtype = attention_dtype(x)
        keep = keep_full = bias = scores = None
        masks: list[torch.Tensor] = []
        for index, blk in enumerate(vit.blocks):
            stage = self._stage_at.get(index)
            if stage is not None:
                if keep_masks is not None:
                    keep = keep_masks[stage].float()
                else:
                    keep = self._train_keep(stage, x[:, prefix:], keep, scores)
                masks.append(keep)
                keep_full = torch.cat([keep.new_ones(batch, prefix), keep], dim=1)
                # One bias per stage for the `bias` path (other paths, and fp16, build what they need).
                fused_bias = self.attention == "bias" and bias_dtype != torch.float16
                bias = keep_bias(keep_full, bias_dtype) if fused_bias else None
            if index in self._scored_blocks and keep_masks is None:
                with tap_attention(blk.attn) as tap:
                    x = run_block(blk, x, keep_full, bias, self.attention)
                scores = cls_attention_scores(blk.attn, tap, keep_full, prefix)
            else:
                x = self._run(blk, x, keep_full, bias)
        x = vit.norm(x)
        dense = dense_gmacs(self._cost, patches)
        if masks:
            gmacs = self.gmacs(patches, [m.sum(dim=-1) for m in masks])
            keep_ratios = torch.stack([m.detach().mean() for m in masks])
        else:
            gmacs = torch.full((batch,), dense, device=x.device)
            keep_ratios = torch.zeros(0, device=x.device)
        return StudentOutput(head(vit, x, keep), x[:, prefix:], masks, gmacs, keep_ratios, dense)

    def _train_keep(
        self, stage: int, patch_tokens: torch.Tensor, keep: torch.Tensor | None, scores: torch.Tensor | None
    ) -> torch.Tensor:
        gate = self.gates[stage]
        previous = keep if self.chain_masks else None
        if self.gate_type == "dynamicvit":
            return gumbel_keep(gate(patch_tokens, keep), previous)
        mask = gate(scores)
        return mask if previous is None else mask * previous

    def forward_pruned(self, images: torch.Tensor) -> torch.Tensor:
        """Pruned forward: at each gate keep the top-k patch tokens (CLS/prefix always kept) and go on."""
        logits, indices = self.pruned_forward(images)
        self.last_keep_counts = [index.shape[1] for index in indices]
        self.last_keep_indices = indices
        self.last_num_patches = self.patches_at(tuple(images.shape[-2:]))
        return logits

    def pruned_forward(
        self, images: torch.Tensor, keep_counts: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the kept original patch indices per stage ([B, k_s]), without touching `last_*`.

        `keep_counts` fixes k_s per stage (an exported AS-ViT: static shapes instead of thresholds); None,
        or a None entry, uses the gate's own rule (DynamicViT's int(N rho^(s+1)), AS-ViT's thresholds).
        """
        vit, prefix = self.vit, self.vit.num_prefix_tokens
        if keep_counts is not None and len(keep_counts) != len(self.locations):
            raise ValueError(f"need {len(self.locations)} keep counts (one per gate), got {list(keep_counts)}")
        x = embed(vit, images)
        patches = x.shape[1] - prefix
        index = scores = None
        indices: list[torch.Tensor] = []
        for i, blk in enumerate(vit.blocks):
            stage = self._stage_at.get(i)
            if stage is not None:
                count = None if keep_counts is None else keep_counts[stage]
                x, index = self._gather(stage, x, scores, index, patches, count)
                indices.append(index)
            if i in self._scored_blocks:
                with tap_attention(blk.attn) as tap:
                    x = blk(x)
                scores = cls_attention_scores(blk.attn, tap, None, prefix)
            else:
                x = blk(x)
        return vit.forward_head(vit.norm(x)), indices

    def _gather(
        self,
        stage: int,
        x: torch.Tensor,
        scores: torch.Tensor | None,
        index: torch.Tensor | None,
        patches: int,
        count: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self.vit.num_prefix_tokens
        tokens = x[:, prefix:]
        gate = self.gates[stage]
        if self.gate_type == "dynamicvit":
            scores = gate(tokens)[..., 0]
            k = dynamicvit_keep_count(patches, self.keep_ratio, stage) if count is None else count
        else:
            k = gate.keep_count(scores) if count is None else count
        k = min(k, tokens.shape[1])
        # Sorting the top-k restores spatial order: cheaper to reason about, and index maps stay monotone.
        top = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        kept = tokens.gather(1, top.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        index = top if index is None else index.gather(1, top)
        return torch.cat([x[:, :prefix], kept], dim=1), index

    def gmacs(self, patches: int, kept: list[float | torch.Tensor]) -> float | torch.Tensor:
        """GMACs with kept[s] patch tokens after gate s, including the gates' own cost."""
        entering = [patches, *kept[:-1]]
        prefix = self._cost.num_prefix
        gate_gmacs = [gate.gmacs(n, prefix) for gate, n in zip(self.gates, entering, strict=True)]
        return pruned_gmacs(self._cost, patches, self.locations, list(kept), gate_gmacs)

    def patches_at(self, img_size: int | tuple[int, int]) -> int:
        """Patch tokens (prefix excluded) entering the first block at img_size."""
        return num_patches(self._cost, img_size)

    def eval_keep_counts(self, img_size: int | tuple[int, int]) -> list[int]:
        """Kept patch tokens per stage in eval at img_size (see model.count_flops for the rules)."""
        patches = num_patches(self._cost, img_size)
        if self.last_keep_counts is not None and self.last_num_patches == patches:
            return list(self.last_keep_counts)
        if self.gate_type == "dynamicvit":
            return [dynamicvit_keep_count(patches, self.keep_ratio, s) for s in range(len(self.locations))]
        return self._probe_keep_counts(img_size)

    def budget_keep_counts(self, patches: int) -> list[int]:
        """Counts int(N r^(s+1)) with r chosen so the model costs flops_budget x dense (bisection)."""
        target = self.flops_budget * dense_gmacs(self._cost, patches)
        counts = lambda r: [max(1, int(patches * r ** (s + 1))) for s in range(len(self.locations))]
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if self.gmacs(patches, counts(mid)) < target else (low, mid)
        return counts(low)

    @torch.no_grad()
    def calibrate_thresholds(self, images: torch.Tensor) -> list[int]:
        """AS-ViT: set thresholds so an eval forward on images meets flops_budget; returns the counts.

        A start for fine-tuning ("calibrate on the first batch", DESIGN 4) and a way to benchmark
        an untrained model at a realistic sparsity. Each stage sees the tokens kept by the previous one.
        """
        if self.gate_type != "asvit":
            raise ValueError(f"only AS-ViT thresholds are calibrated, this gate is {self.gate_type!r}")
        patches = num_patches(self._cost, tuple(images.shape[-2:]))
        for gate, count in zip(self.gates, self.budget_keep_counts(patches), strict=True):
            gate.calibrate_to = count
        was_training = self.training
        try:
            self.eval()
            self.forward_pruned(images)
        finally:
            self.train(was_training)
            for gate in self.gates:
                gate.calibrate_to = None
        return list(self.last_keep_counts)

    @torch.no_grad()
    def _probe_keep_counts(self, img_size: int | tuple[int, int]) -> list[int]:
        # AS-ViT counts depend on the image; a fixed seeded image at batch 1 shows what the thresholds give.
        ref = next(self.parameters())
        if ref.device.type == "meta":
            raise ValueError("AS-ViT keep counts depend on the input: pass keep_counts=, or build off meta")
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        chans = getattr(getattr(self.vit.patch_embed, "proj", None), "in_channels", 3)
        image = torch.randn(1, chans, h, w, generator=torch.Generator().manual_seed(0))
        image = image.to(ref.device, ref.dtype)
        saved = (self.last_keep_counts, self.last_keep_indices, self.last_num_patches)
        was_training = self.training
        try:
            self.eval()
            self.forward_pruned(image)
            return list(self.last_keep_counts)
        finally:
            self.last_keep_counts, self.last_keep_indices, self.last_num_patches = saved
            self.train(was_training)


def create_student(
    arch: str,
    gate: str = "dynamicvit",
    keep_ratio: float = 0.7,
    flops_budget: float = 0.65,
    locations: list[int] | None = None,
    img_size: int | None = None,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    allow_pickle: bool = False,
    chain_masks: bool | None = None,
    attention: str = "bias",
    **timm_kwargs: Any,
) -> PrunedViT:
    """A timm ViT `arch` wrapped with `gate` pruning; checkpoint loads dense (and gate) weights from a file.

    timm_kwargs go to timm.create_model and override the arch's (depth=4, embed_dim=32, ...);
    pretrained=True uses timm's normal download path. A checkpoint may be a timm/DeiT file or one
    saved from a student (vit./gates. keys); gates keep their init unless the file has them, and
    gate weights of another gate type are an error. A file that needs pickle (not just tensors) is
    refused unless allow_pickle=True (only for files you trust). `attention` selects the masked
    attention of training (see PrunedViT).
    """
    if gate not in GATE_TYPES:
        raise ValueError(f"gate must be one of {GATE_TYPES}, got {gate!r}")
    vit = build_vit(arch, img_size=img_size, num_classes=num_classes, **timm_kwargs)
    student = PrunedViT(vit, gate=gate, keep_ratio=keep_ratio, flops_budget=flops_budget, locations=locations,
                        chain_masks=chain_masks, attention=attention)
    if checkpoint is not None:
        load_weights(student, checkpoint, allow_pickle)
    return student
