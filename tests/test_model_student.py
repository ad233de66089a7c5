"""The pruned student on tiny ViTs: parity, kept counts, masks, gradients, train/eval agreement."""

import pytest
import torch
import torch.nn.functional as F

from model import TINY_ARCH, TINY_VIT_KWARGS, StudentOutput, create_student, default_locations
from model.gates import dynamicvit_keep_count
from trainer.loop.losses import keep_ratio_loss


def tiny(gate: str = "dynamicvit", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_student(TINY_ARCH, gate=gate, **{**TINY_VIT_KWARGS, **overrides})


def images(batch: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def keep_masks_from_indices(indices: list[torch.Tensor], patches: int) -> list[torch.Tensor]:
    """Cumulative {0,1} masks over the original patches from eval-mode kept indices."""
    masks = []
    for index in indices:
        mask = torch.zeros(index.shape[0], patches)
        masks.append(mask.scatter_(1, index, 1.0))
    return masks


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_student_without_gates_equals_plain_timm(mode: str) -> None:
    student = tiny("none")
    getattr(student, mode)()
    x = images()
    out = student(x)
    logits = out.logits if mode == "train" else out
    torch.testing.assert_close(logits, student.vit(x), rtol=0, atol=0)
    if mode == "train":
        assert out.keep_masks == [] and out.keep_ratios.numel() == 0
        torch.testing.assert_close(out.tokens, student.vit.forward_features(x)[:, 1:], rtol=0, atol=0)
        assert torch.allclose(out.gmacs, torch.full((3,), out.dense_gmacs))


def test_timm_kwargs_override_the_arch_and_gate_params_live_under_gates() -> None:
    student = tiny("dynamicvit")
    assert len(student.vit.blocks) == 4 and student.vit.embed_dim == 32 and student.vit.num_classes == 10
    gate_names = [n for n, _ in student.named_parameters() if n.startswith("gates.")]
    assert gate_names and all(not n.startswith("gates.") for n, _ in student.vit.named_parameters())
    assert student.gate_type == "dynamicvit" and student.keep_ratio == 0.7 and student.locations == [1, 2, 3]
    asvit = tiny("asvit")
    assert [n for n, _ in asvit.named_parameters() if n.startswith("gates.")] == [
        "gates.0.threshold", "gates.1.threshold", "gates.2.threshold",
    ]


def test_default_locations_follow_the_papers_and_scale_with_depth() -> None:
    assert default_locations("dynamicvit", 12) == [3, 6, 9]
    assert default_locations("asvit", 12) == [4, 7, 10]
    assert default_locations("dynamicvit", 4) == [1, 2, 3]
    assert default_locations("asvit", 4) == [1, 2, 3]
    assert default_locations("dynamicvit", 24) == [6, 12, 18]
    assert default_locations("none", 12) == []


@pytest.mark.parametrize(
    ("gate", "locations", "message"),
    [
        ("dynamicvit", [2, 1], "strictly increasing"),
        ("dynamicvit", [1, 4], r"\[0, 3\]"),
        ("asvit", [0, 2], "block before each gate"),
        ("dynamicvit", [], "at least one"),
    ],
)
def test_bad_locations_fail_with_a_clear_error(gate: str, locations: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(gate, locations=locations)


@pytest.mark.parametrize("size", [32, 48])
def test_dynamicvit_eval_keeps_exactly_int_n_rho_s_tokens(size: int) -> None:
    student = tiny("dynamicvit", img_size=size).eval()
    patches = (size // 8) ** 2
    logits = student(images(2, size))
    assert logits.shape == (2, 10)
    expected = [dynamicvit_keep_count(patches, 0.7, s) for s in range(3)]
    assert expected == ([11, 7, 5] if size == 32 else [25, 17, 12])
    assert student.last_keep_counts == expected
    prev = None
    for index, k in zip(student.last_keep_indices, expected, strict=True):
        assert index.shape == (2, k) and int(index.max()) < patches
        assert all(len(set(row.tolist())) == k for row in index)
        if prev is not None:  # cumulative: later stages keep a subset
            assert all(set(r.tolist()) <= set(p.tolist()) for r, p in zip(index, prev, strict=True))
        prev = index


def test_token_grid_follows_the_input_with_dynamic_img_size() -> None:
    student = tiny("dynamicvit", dynamic_img_size=True).eval()
    for size, patches in [(32, 16), (64, 64)]:
        student(images(1, size))
        assert student.last_num_patches == patches
        assert student.last_keep_counts == [dynamicvit_keep_count(patches, 0.7, s) for s in range(3)]


@pytest.mark.parametrize("gate", ["dynamicvit", "asvit"])
def test_train_masks_are_binary_and_non_increasing(gate: str) -> None:
    student = tiny(gate).train()
    out = student(images(4))
    assert isinstance(out, StudentOutput)
    assert out.tokens.shape == (4, 16, 32) and out.logits.shape == (4, 10)
    assert len(out.keep_masks) == 3 and out.keep_ratios.shape == (3,)
    for prev, mask in zip(out.keep_masks, out.keep_masks[1:], strict=False):
        assert torch.all(mask <= prev)
    for mask in out.keep_masks:
        assert mask.shape == (4, 16) and mask.dtype == torch.float32
        assert torch.all((mask == 0) | (mask == 1))
    torch.testing.assert_close(out.keep_ratios, torch.stack([m.mean() for m in out.keep_masks]))
    assert out.gmacs.shape == (4,) and torch.all(out.gmacs <= out.dense_gmacs + 1e-3)


def _asvit_scores(student: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-stage AS-ViT scores [B, N] of an unpruned forward (all tokens kept up to each gate)."""
    from model.attention import cls_attention_scores, tap_attention

    scores = []
    with torch.no_grad():
        h = student.vit._pos_embed(student.vit.patch_embed(x))
        for index, blk in enumerate(student.vit.blocks[: student.locations[-1]]):
            with tap_attention(blk.attn) as tap:
                h = blk(h)
            if index + 1 in student.locations:
                scores.append(cls_attention_scores(blk.attn, tap, None, 1))
    return scores


def _make_asvit_thresholds_bite(student: torch.nn.Module, x: torch.Tensor) -> None:
    """Put each threshold on a real token score, so the step sits inside the 1e-4 sigmoid window."""
    with torch.no_grad():
        for gate, scores in zip(student.gates, _asvit_scores(student, x), strict=True):
            gate.threshold.fill_(scores.median().item())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("gate", ["dynamicvit", "asvit"])
def test_gate_gets_gradient_through_attention_from_classification_loss(gate: str, fused: bool) -> None:
    # One gate with a CLS head: the only way the keep mask reaches the loss is through attention.
    student = tiny(gate, locations=[2]).train()
    for blk in student.vit.blocks:
        blk.attn.fused_attn = fused
    x = images(4)
    if gate == "asvit":
        _make_asvit_thresholds_bite(student, x)
    out = student(x)
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    grads = [p.grad for n, p in student.named_parameters() if n.startswith("gates.")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("arch_kwargs", [{}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}])
def test_masked_training_forward_agrees_with_gathered_eval_forward(arch_kwargs: dict) -> None:
    student = tiny("dynamicvit", **arch_kwargs).eval()
    x = images(3)
    final = {}
    student.vit.norm.register_forward_hook(lambda _m, _i, out: final.__setitem__("tokens", out))
    eval_logits = student(x)
    eval_tokens = final["tokens"][:, student.vit.num_prefix_tokens:]
    masks = keep_masks_from_indices(student.last_keep_indices, 16)
    for fused in (True, False):
        for blk in student.vit.blocks:
            blk.attn.fused_attn = fused
        out = student.forward_masked(x, keep_masks=masks)
        torch.testing.assert_close(out.logits, eval_logits, rtol=1e-4, atol=1e-4)
        kept = student.last_keep_indices[-1]
        masked_tokens = out.tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, 32))
        torch.testing.assert_close(masked_tokens, eval_tokens, rtol=1e-4, atol=1e-4)
        counts = torch.tensor(student.last_keep_counts, dtype=torch.float32)
        torch.testing.assert_close(out.keep_ratios, counts / 16)


def test_asvit_eval_keeps_tokens_above_threshold_for_one_image_and_batch_mean_for_a_batch() -> None:
    student = tiny("asvit", locations=[2]).eval()
    x = images(4)
    (scores,) = _asvit_scores(student, x)
    with torch.no_grad():
        student.gates[0].threshold.fill_(scores[0].median().item())
    student(x[:1])
    assert student.last_keep_counts == [8]  # threshold at the median of 16 scores: 8 are above
    theta = scores.quantile(0.6).item()  # images differ in how many tokens pass
    with torch.no_grad():
        student.gates[0].threshold.fill_(theta)
    per_image = (scores > theta).sum(dim=1).float()
    student(x)
    assert student.last_keep_counts == [int(torch.round(per_image.mean()))]
    with torch.no_grad():
        student.gates[0].threshold.fill_(1.0)  # scores are attention mass < 1: none pass, one is kept
    student(x)
    assert student.last_keep_counts == [1]


def test_asvit_thresholds_init_scales_with_patch_count() -> None:
    at_32 = [g.threshold.item() for g in tiny("asvit").gates]
    at_64 = [g.threshold.item() for g in tiny("asvit", img_size=64).gates]
    assert at_32 == pytest.approx([1e-3 * 196 / 16, 2e-3 * 196 / 16, 3e-3 * 196 / 16])
    assert at_64 == pytest.approx([t / 4 for t in at_32])


def test_student_on_deit_b_384_sees_576_patches() -> None:
    with torch.device("meta"):
        student = create_student("deit_base_patch16_384", gate="dynamicvit", img_size=384)
    assert student.vit.patch_embed.num_patches == 576
    assert student.locations == [3, 6, 9]
    assert student.eval_keep_counts(384) == [403, 282, 197]


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    student = tiny("dynamicvit").train()
    x = images(2)
    masks = [torch.ones(2, 16), torch.ones(2, 16), (torch.arange(16) % 2).float().expand(2, 16)]
    grads = []
    for checkpointing in (False, True):
        student.vit.set_grad_checkpointing(checkpointing)
        student.zero_grad()
        student.forward_masked(x, keep_masks=masks).logits.sum().backward()
        grads.append(student.vit.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_mask_chaining_follows_each_papers_code_and_changes_only_gradients() -> None:
    """DynamicViT chains its decisions (official `* prev_decision`), AS-ViT does not (official policy = mask)."""
    assert tiny("dynamicvit").chain_masks and not tiny("asvit").chain_masks
    x = images(batch=4)
    outs = {}
    for chain in (True, False):
        student = tiny("asvit", chain_masks=chain)
        student.calibrate_thresholds(x)  # thresholds between scores: their straight-through gradient is nonzero
        out = student.train()(x)
        out.gmacs.mean().backward()
        outs[chain] = (out, [g.threshold.grad.clone() for g in student.gates])
    (chained, chained_grads), (plain, plain_grads) = outs[True], outs[False]
    # Stage 0 has no previous mask; later stages differ only where a dropped token would come back.
    torch.testing.assert_close(chained.keep_masks[0], plain.keep_masks[0], rtol=0, atol=0)
    for s in range(1, len(plain.keep_masks)):
        assert torch.all(chained.keep_masks[s] <= plain.keep_masks[s])
    assert all(g.abs().sum() > 0 for g in plain_grads)
    # Chained, stage 0's threshold also pays for the tokens it removes from stages 1 and 2.
    assert not torch.equal(chained_grads[0], plain_grads[0])


@pytest.mark.parametrize("gate", ["dynamicvit", "asvit"])
def test_activation_checkpointing_gives_the_same_gradients(gate: str) -> None:
    """train.activation_checkpointing: blocks recomputed in the backward, the same loss and gradients."""
    x = images(batch=4)
    grads = []
    for checkpointing in (False, True):
        student = tiny(gate).train()
        student.vit.set_grad_checkpointing(checkpointing)
        torch.manual_seed(3)  # the same Gumbel noise in both runs
        out = student(x)
        (out.logits.square().mean() + out.tokens.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_ratio_loss_alone_trains_dynamicvit_gates_to_their_targets() -> None:
    # The ratio path end to end (Gumbel straight-through, chaining, predictor): from keep ~0.5/0.25/0.125
    # at init, Adam on the gates alone must reach rho^(s+1) (a sign or detach error would diverge).
    student = tiny(img_size=64, locations=[1, 2, 3]).train()  # 64 patches per image
    gates = [p for name, p in student.named_parameters() if name.startswith("gates.")]
    optimizer = torch.optim.AdamW(gates, lr=1e-3, weight_decay=0.05)
    x, targets = images(16, size=64), student.target_keep_ratios
    recent = []
    for step in range(150):
        out = student(x)
        loss = keep_ratio_loss(out.keep_masks, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 120:
            recent.append(out.keep_ratios)
    reached = torch.stack(recent).mean(0)
    assert torch.allclose(reached, torch.tensor(targets), atol=0.05), (reached.tolist(), targets)
