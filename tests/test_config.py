"""Config: YAML + --set, type checks, and every invalid value rejected before training, naming the key."""

import json
import os
import time

import pytest

from tests.helpers import make_shards
from trainer.config import ConfigError, load_config, validate
from trainer.infra.backends.deepspeed_config import load_ds_config

TINY = ["model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.num_classes=4",
        "model.kwargs={patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2}", "train.steps=2"]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfgshards")
    make_shards(str(root), [2, 2])
    return str(root)


def _cfg(shard_dir, *overrides):
    return load_config(None, [*TINY, f"data.train={shard_dir}/train-*.tar", *overrides])


def test_yaml_and_overrides_get_their_types(tmp_path, shard_dir):
    path = tmp_path / "c.yaml"
    path.write_text("prune:\n  keep_ratio: 0.6\noptim:\n  lr: 1\n")
    cfg = load_config(str(path), ["prune.locations=[1, 2]", "log.every=5", "data.log_keys=true"])
    assert cfg.prune.keep_ratio == 0.6 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.prune.locations == [1, 2] and cfg.log.every == 5 and cfg.data.log_keys is True


def test_shipped_configs_load_and_validate_their_shape():
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "trainer", "configs")
    for name in sorted(os.listdir(root)):
        cfg = load_config(os.path.join(root, name))
        validate(cfg, world_size=None, check_paths=False)


def test_unknown_key_names_the_closest_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'prune.keep_ration'.*prune.keep_ratio"):
        load_config(None, ["prune.keep_ration=0.5"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("prune.keep_ratio=0", "prune.keep_ratio"),
        ("prune.keep_ratio=-0.1", "prune.keep_ratio"),
        ("prune.keep_ratio=1.5", "prune.keep_ratio"),
        ("prune.keep_ratio=nan", "prune.keep_ratio"),
        ("prune.flops_budget=0", "prune.flops_budget"),
        ("prune.gate=tome", "prune.gate"),
        ("prune.locations=[1, 9]", "prune.locations"),
        ("prune.locations=[2, 1]", "prune.locations"),
        ("model.img_size=33", "model.img_size"),
        ("model.arch=not_a_model", "model.arch"),
        ("precision=fp8", "precision"),
        ("backend.name=horovod", "backend.name"),
        ("backend.ds_config=ds_configs/zero4.json", "backend.ds_config"),
        ("data.global_batch_size=10", "data.global_batch_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.lr=-1", "optim.lr"),
        ("data.scale=[0.5, 0.2]", "data.scale"),
        ("data.hflip=2", "data.hflip"),
        ("train.steps=0", "train.steps"),
        ("model.checkpoint=/nonexistent/w.pth", "model.checkpoint"),
        ("teacher.checkpoint=/nonexistent/t.pth", "teacher.checkpoint"),
        ("data.val=/nonexistent/val", "data.val"),
    ],
)
def test_invalid_value_is_rejected_fast_naming_the_key(shard_dir, override, key):
    start = time.time()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_cfg(shard_dir, override), world_size=2)
    assert time.time() - start < 5


@pytest.mark.parametrize("override", ["data.batch_size=abc", "train.steps=1.5", "prune.keep_ratio=[1]"])
def test_wrong_type_names_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_missing_train_data_is_rejected(shard_dir):
    with pytest.raises(ConfigError, match="data.train"):
        validate(load_config(None, [*TINY, "data.train=/nonexistent/shards"]))


def test_ds_config_auto_fields_are_filled_and_conflicts_rejected(tmp_path, shard_dir):
    cfg = _cfg(shard_dir, "data.batch_size=8", "optim.accum_steps=2", "precision=fp16")
    ds = load_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 64
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["gradient_clipping"] == 1.0
    conflicting = tmp_path / "bf16_on.json"
    conflicting.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="bf16.enabled"):
        load_ds_config(_cfg(shard_dir, "precision=fp16", f"backend.ds_config={conflicting}"), 1)
    stage4 = tmp_path / "stage4.json"
    stage4.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="stage"):
        validate(_cfg(shard_dir, f"backend.ds_config={stage4}"))


def test_a_set_value_with_a_colon_stays_text():
    """A pipe: source with a curl header ("Authorization: Bearer ...") is a string, not a YAML mapping."""
    from trainer.config import parse_override

    key, value = parse_override("data.train=pipe:curl -s -H 'Authorization: Bearer x' https://h/a-{0..3}.tar")
    assert key == "data.train" and value == "pipe:curl -s -H 'Authorization: Bearer x' https://h/a-{0..3}.tar"
    assert parse_override("model.kwargs={depth: 4}")[1] == {"depth": 4}
