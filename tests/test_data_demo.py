"""data.demo: digits-in-clutter canvases -> ImageFolder + boxes -> shards, deterministic, disjoint splits."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data.demo import CLASSES, box_patch_mask, build_demo, eval_box, load_source_digits, main, split_sources
from data.info import load_info, resolve_split
from data.transforms import AugmentConfig, eval_transform

TINY = {"train_per_class": 4, "val_per_class": 2, "seed": 5}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(str(tmp_path_factory.mktemp("demo")), workers=1, **TINY)


def _shard_hashes(shard_dir):
    return {name: hashlib.sha256(open(os.path.join(shard_dir, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(shard_dir)) if name.endswith(".tar")}


def _samples(stats, split):
    paths = [s.path for s in resolve_split(stats["shards"], split).shards]
    return list(wds.WebDataset(paths, shardshuffle=False))


def test_same_seed_gives_byte_identical_shards_whatever_the_worker_count(demo, tmp_path, capsys):
    main([str(tmp_path / "again"), "--train-per-class", "4", "--val-per-class", "2", "--seed", "5",
          "--workers", "2"])
    assert "demo: 60 images (train 40, val 20), 10 classes" in capsys.readouterr().out
    expected = _shard_hashes(demo["shards"])
    assert len(expected) >= 12
    assert _shard_hashes(str(tmp_path / "again" / "shards")) == expected
    other = build_demo(str(tmp_path / "other"), workers=1, **{**TINY, "seed": 6})
    assert _shard_hashes(other["shards"]) != expected


def test_shards_resolve_with_ten_classes_and_enough_shards_for_two_ranks_by_two_workers(demo):
    info = load_info(demo["shards"])
    assert info["num_classes"] == 10 and info["classes"] == list(CLASSES)
    train, val = resolve_split(demo["shards"], "train"), resolve_split(demo["shards"], "val")
    assert (train.num_samples, val.num_samples) == (40, 20)
    assert len(train.shards) >= 8 and len(val.shards) >= 4
    assert demo["num_shards"] == {"train": len(train.shards), "val": len(val.shards)}


def test_labels_match_the_class_folder_and_travel_with_the_shards(demo):
    for split in ("train", "val"):
        for name in CLASSES:
            folder = os.path.join(demo["imagefolder"], split, name)
            sidecars = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
            assert len(sidecars) == TINY[f"{split}_per_class"]
            for f in sidecars:
                assert json.load(open(os.path.join(folder, f)))["label"] == int(name)
        for s in _samples(demo, split):
            meta = json.loads(s["json"])
            assert meta["label"] == int(s["cls"])
            assert s["__key__"].startswith(f"{meta['label']}_{split}_{meta['label']}_")


def test_box_lies_inside_the_canvas_and_covers_a_minority_of_patches(demo):
    digits, _ = load_source_digits()
    for split in ("train", "val"):
        for s in _samples(demo, split):
            img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L"), dtype=np.float32)
            assert img.shape == (64, 64)
            x0, y0, x1, y1 = json.loads(s["json"])["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert box_patch_mask((x0, y0, x1, y1), 64, 8).mean() < 0.5
            # The box holds the bright digit: its brightest pixels are brighter than the canvas on average.
            assert np.percentile(img[y0:y1, x0:x1], 90) > img.mean() + 30
    assert 0.08 < demo["mean_box_patch_fraction"] < 0.3
    assert demo["max_box_patch_fraction"] < 0.5


def test_train_and_val_source_digits_are_disjoint(demo):
    _, labels = load_source_digits()
    pools = split_sources(labels)
    assert not set(pools["train"]) & set(pools["val"])
    assert len(pools["train"]) + len(pools["val"]) == len(labels) == 1797
    assert all((labels[pools["val"]] == k).sum() >= 30 for k in range(10))
    used = {split: {json.loads(s["json"])["source"] for s in _samples(demo, split)} for split in ("train", "val")}
    assert used["train"] <= set(pools["train"]) and used["val"] <= set(pools["val"])
    for split in ("train", "val"):
        # And each composite's source digit is of the composite's class.
        assert all(labels[json.loads(s["json"])["source"]] == int(s["cls"]) for s in _samples(demo, split))


def test_box_patch_mask_marks_every_patch_the_box_touches():
    # 32 px, patch 8: x in [5, 17) touches columns 0, 1, 2; y in [8, 16) is exactly row 1.
    expected = np.zeros((4, 4), dtype=bool)
    expected[1, 0:3] = True
    np.testing.assert_array_equal(box_patch_mask((5, 8, 17, 16), 32, 8), expected)
    assert box_patch_mask((0, 0, 32, 32), 32, 8).all()
    assert box_patch_mask((0, 0, 16, 8), (8, 32), 8).tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="multiple"):
        box_patch_mask((0, 0, 1, 1), 30, 8)


@pytest.mark.parametrize("img_size, crop_pct", [(64, 1.0), (64, 0.875), (48, 0.9)])
def test_eval_box_follows_timm_resize_and_centre_crop(img_size, crop_pct):
    box = (20, 12, 36, 40)
    canvas = np.zeros((64, 64, 3), dtype=np.uint8)
    canvas[box[1]:box[3], box[0]:box[2]] = 255
    out = eval_transform(img_size, AugmentConfig(crop_pct=crop_pct))(Image.fromarray(canvas))
    ys, xs = np.nonzero(out[0].numpy() > 127)
    seen = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    np.testing.assert_allclose(seen, eval_box(box, 64, img_size, crop_pct), atol=1.0)
    if crop_pct == 1.0 and img_size == 64:
        assert eval_box(box, 64, 64, 1.0) == box
