"""The recipe YAMLs carry the official values of their method (docs/recipes.md lists each with its source)."""

import os

import pytest

from trainer.config import load_config, validate

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "trainer", "configs")

# raoyongming/DynamicViT main.py + README command @1322e62 (DeiT-B adds --drop_path 0.2 --ratio_weight 5.0).
DYNAMICVIT = {"prune.gate": "dynamicvit", "prune.keep_ratio": 0.7, "prune.locations": [3, 6, 9],
              "prune.w_kd": 0.5, "prune.w_tok": 0.5, "optim.lr": 1e-3, "optim.lr_reference_batch": 1024,
              "optim.min_lr": 1e-6, "optim.warmup_epochs": 5.0, "optim.weight_decay": 0.05,
              "optim.gate_weight_decay": -1.0, "optim.frozen_params": ["cls_token", "pos_embed"],
              "optim.backbone_lr_scale": 0.01, "optim.backbone_frozen_fraction": 0.1667, "optim.grad_clip": 0.0,
              "ema.enabled": True, "ema.decay": 0.9999, "train.epochs": 30.0, "data.mixup": 0.8,
              "data.cutmix": 1.0, "data.smoothing": 0.1, "data.reprob": 0.25,
              "data.auto_augment": "rand-m9-mstd0.5-inc1"}
# Cydia2018/AS-ViT finetune.sh + main.py @ea7ccdb.
ASVIT = {"prune.gate": "asvit", "prune.flops_budget": 0.65, "prune.locations": [4, 7, 10],
         "prune.flops_loss": "absolute", "prune.w_flops": 2.0, "prune.w_kd": 0.5, "prune.w_tok": 0.0,
         "prune.calibrate_thresholds": False, "optim.lr": 2e-5, "optim.lr_reference_batch": 512,
         "optim.min_lr": 2e-6, "optim.warmup_epochs": 0.0, "optim.weight_decay": 1e-6, "optim.frozen_params": [],
         "optim.backbone_lr_scale": 1.0, "optim.backbone_frozen_fraction": 0.0, "optim.grad_clip": 0.0,
         "ema.enabled": True, "train.epochs": 30.0, "data.mixup": 0.8, "data.cutmix": 1.0}

RECIPES = {
    "deit_s224_dynamicvit.yaml": DYNAMICVIT | {"model.drop_path": 0.0, "prune.w_ratio": 2.0},
    "deit_b384_dynamicvit.yaml": DYNAMICVIT | {"model.drop_path": 0.2, "prune.w_ratio": 5.0},
    "deit_s224_asvit.yaml": ASVIT | {"model.drop_path": 0.0, "optim.threshold_lr_scale": 1.0, "ema.decay": 0.99996},
    # 384 extrapolations (docs/recipes.md "384"): thresholds ~1/N, twice the official global batch.
    "deit_b384_asvit.yaml": ASVIT | {"model.drop_path": 0.2, "optim.threshold_lr_scale": 0.34, "ema.decay": 0.99992},
}


def _get(cfg, key):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_has_the_official_values(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    validate(cfg, world_size=None, check_paths=False, check_model=False)
    wrong = {key: (_get(cfg, key), want) for key, want in RECIPES[name].items() if _get(cfg, key) != want}
    assert not wrong, f"{name}: (ours, official) {wrong}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_doc_covers_every_recipe(name):
    with open(os.path.join(os.path.dirname(CONFIGS), "..", "docs", "recipes.md")) as f:
        assert f"`{name}`" in f.read()
