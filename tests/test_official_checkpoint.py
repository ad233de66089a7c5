"""Official DynamicViT checkpoints ({'model': sd} with score_predictor.* keys) load wherever a weight file is
accepted, and the loaded student's eval logits and kept tokens equal the official inference's
(tests/official_dynamicvit.py, re-written from github.com/raoyongming/DynamicViT models/dyvit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import TINY_ARCH, TINY_VIT_KWARGS, create_student, create_teacher
from tests.official_dynamicvit import VisionTransformerDiffPruning

RHO = 0.7
TINY_LOCATIONS = [1, 2, 3]  # default_locations("dynamicvit", 4): DeiT's 3/6/9 of 12, scaled to 4 blocks
TINY_OFFICIAL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=4, num_heads=2,
                     pruning_loc=TINY_LOCATIONS, token_ratio=[RHO, RHO ** 2, RHO ** 3])  # as main.py builds it
ATOL = 1e-4  # fp32; the two differ only in summation order (token order, fused vs explicit attention)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights at unit scale (logits ~1, keep scores spread out): the default 0.02 init would leave
    near-constant logits and near-tied scores, and compare little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * noise)
            elif p.dim() >= 2:  # Linear / Conv: variance-preserving; x5 on the predictors' last layer
                p.copy_(noise / p[0].numel() ** 0.5 * (5.0 if ".out_conv.4." in name else 1.0))
            elif name.endswith("weight"):  # LayerNorm gains
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def official_file(tmp_path: Path, seed: int = 0, **kwargs) -> tuple[VisionTransformerDiffPruning, Path]:
    official = randomize_(VisionTransformerDiffPruning(**{**TINY_OFFICIAL, **kwargs}), seed)
    path = tmp_path / "dynamicvit_official.pth"
    torch.save({"model": official.state_dict()}, path)  # what DynamicViT's main.py saves (plus optimizer...)
    return official, path


@torch.no_grad()
def assert_matches_official(student: torch.nn.Module, official: VisionTransformerDiffPruning,
                            images: torch.Tensor) -> float:
    """Same logits (max |diff| <= ATOL) and the same kept patches per stage; returns the max |diff|."""
    expected = official(images)
    for s, scores in enumerate(official.stage_scores):  # a near-tie at the cut could flip on float noise
        k = official.kept_patches[s].shape[1]
        ranked = scores.sort(dim=1, descending=True).values
        assert (ranked[:, k - 1] - ranked[:, k]).min() > 1e-4, f"stage {s}: near-tied scores, pick another seed"
    got = student.eval()(images)
    assert student.last_keep_counts == [p.shape[1] for p in official.kept_patches]
    for ours, theirs in zip(student.last_keep_indices, official.kept_patches, strict=True):
        torch.testing.assert_close(ours, theirs.sort(dim=1).values, rtol=0, atol=0)
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"max |logit diff| {diff:.3g}"
    assert expected.abs().max() > 0.5  # logits of unit scale: the tolerance means something
    return diff


def test_official_checkpoint_gives_the_official_logits_and_kept_tokens(tmp_path: Path) -> None:
    official, path = official_file(tmp_path)
    assert any(k.startswith("score_predictor.2.out_conv.4.") for k in official.state_dict())
    student = create_student(TINY_ARCH, gate="dynamicvit", keep_ratio=RHO, locations=TINY_LOCATIONS,
                             checkpoint=path, **TINY_VIT_KWARGS)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_matches_official(student, official, images)
    assert student.last_keep_counts == [11, 7, 5]  # int(16 * 0.7^s): 11.2, 7.84, 5.49
    # The dense teacher takes the same file (predictors ignored): the official DeiT without pruning.
    teacher = create_teacher(TINY_ARCH, checkpoint=path, **TINY_VIT_KWARGS)
    torch.testing.assert_close(teacher.vit.head.weight, official.head.weight, rtol=0, atol=0)


def test_official_checkpoint_through_config_validation_training_init_and_evaluate(tmp_path: Path) -> None:
    from trainer.config import load_config, validate_model
    from trainer.loop.build import build_student

    official, path = official_file(tmp_path, seed=2)
    cfg = load_config(None, [f"model.arch={TINY_ARCH}", "model.img_size=32", "model.num_classes=10",
                             "model.kwargs={patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2}",
                             "prune.gate=dynamicvit", f"prune.keep_ratio={RHO}", "prune.locations=[1, 2, 3]",
                             f"model.checkpoint={path}"])
    validate_model(cfg)  # the config check train.py runs before any process starts
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert_matches_official(build_student(cfg), official, images)  # training init: model.checkpoint
    cfg.model.checkpoint = ""
    assert_matches_official(build_student(cfg, str(path)), official, images)  # trainer.evaluate --checkpoint


def test_unknown_layouts_fail_naming_the_keys(tmp_path: Path) -> None:
    official, _ = official_file(tmp_path)
    sd = official.state_dict()
    kwargs = dict(gate="dynamicvit", keep_ratio=RHO, **TINY_VIT_KWARGS)
    bad = tmp_path / "extra.pth"
    torch.save({"model": {**sd, "foo.weight": torch.zeros(3)}}, bad)
    with pytest.raises(ValueError, match=r"unexpected keys: foo\.weight"):
        create_student(TINY_ARCH, locations=TINY_LOCATIONS, checkpoint=bad, **kwargs)
    # Predictors for 3 stages into a 2-gate student: the third predictor's keys are named.
    good = tmp_path / "official.pth"
    torch.save({"model": sd}, good)
    with pytest.raises(ValueError, match=r"unexpected keys: 2\.in_conv\.0\.bias"):
        create_student(TINY_ARCH, locations=[1, 3], checkpoint=good, **kwargs)
    # Predictor keys beside a student's vit./gates. keys: not one layout or the other.
    mixed = tmp_path / "mixed.pth"
    student_sd = create_student(TINY_ARCH, locations=TINY_LOCATIONS, **kwargs).state_dict()
    torch.save({**student_sd, "score_predictor.0.in_conv.0.weight": torch.ones(32)}, mixed)
    with pytest.raises(ValueError, match=r"outside vit\./gates\.: score_predictor\.0\.in_conv\.0\.weight"):
        create_student(TINY_ARCH, locations=TINY_LOCATIONS, checkpoint=mixed, **kwargs)


def test_deit_small_shaped_official_checkpoint(tmp_path: Path) -> None:
    """The released DeiT-S layout (224 px, 12 blocks, 384 wide, gates before 3/6/9), where the official
    code's hard-coded 14 x 14 patches hold: its keep counts 137/96/67 at rho 0.7 must be ours."""
    torch.manual_seed(0)
    official, path = official_file(tmp_path, seed=5, img_size=224, patch_size=16, embed_dim=384, depth=12,
                                   num_heads=6, num_classes=1000, pruning_loc=[3, 6, 9])
    student = create_student("deit_small_patch16_224", gate="dynamicvit", keep_ratio=RHO, checkpoint=path)
    assert student.locations == [3, 6, 9]
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    assert_matches_official(student, official, images)
    assert student.last_keep_counts == [137, 96, 67]
