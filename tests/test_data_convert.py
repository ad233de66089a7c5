"""data.convert: ImageFolder -> shuffled shards + _info.json, readable by timm and webdataset."""

import io
import json
import os

import pytest
import webdataset as wds
from PIL import Image

from data.convert import convert, main
from data.info import load_info, resolve_split
from tests.helpers import jpeg_bytes, make_image_folder


def _read_all(paths):
    return list(wds.WebDataset(paths, shardshuffle=False))


@pytest.fixture
def converted(tmp_path):
    src = make_image_folder(str(tmp_path / "src"), num_classes=3, per_class=10)
    # A corrupt file, a nested folder with an upper-case extension, and a PNG: all must be handled.
    with open(os.path.join(src, "class_1", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    os.makedirs(os.path.join(src, "class_2", "nested"))
    with open(os.path.join(src, "class_2", "nested", "deep.JPEG"), "wb") as f:
        f.write(jpeg_bytes(7))
    with open(os.path.join(src, "class_0", "pic.png"), "wb") as f:
        f.write(jpeg_bytes(8, fmt="PNG"))
    with open(os.path.join(src, "class_0", "pic.json"), "w") as f:
        json.dump({"box": [1, 2, 3, 4]}, f)
    out = str(tmp_path / "out")
    info = convert(src, out, shard_size=8, val_fraction=0.2, seed=3, workers=2)
    return src, out, info


def test_convert_counts_classes_and_reports_the_corrupt_file(converted):
    src, out, info = converted
    assert info["classes"] == ["class_0", "class_1", "class_2"]
    total = sum(s["num_samples"] for s in info["splits"].values())
    assert total == 32  # 30 + nested + png; the broken file is not written
    for split in info["splits"].values():
        assert sum(split["shard_lengths"]) == split["num_samples"]
        assert all(os.path.isfile(os.path.join(out, f)) for f in split["filenames"])
    skipped = json.load(open(os.path.join(out, "_skipped.json")))
    assert [os.path.basename(s["path"]) for s in skipped] == ["broken.jpg"]
    # 20% of each class (2 of 11) is held out before decoding, so the broken file may be one of them.
    assert info["splits"]["val"]["num_samples"] == 6 - sum(s["split"] == "val" for s in skipped)


def test_convert_shuffles_globally_and_keeps_labels_right(converted):
    src, out, info = converted
    samples = _read_all([os.path.join(out, f) for f in info["splits"]["train"]["filenames"]])
    labels = [int(s["cls"]) for s in samples]
    assert labels != sorted(labels), "shards are class-ordered"
    for s in samples:
        # Keys are derived from the class folder, so each label can be checked against its source.
        assert s["__key__"].startswith(f"class_{int(s['cls'])}_")
        assert "." not in s["__key__"]
        Image.open(io.BytesIO(s["jpg"])).load()


def test_convert_reencodes_png_and_carries_the_json_sidecar(converted):
    src, out, info = converted
    paths = [os.path.join(out, f) for split in info["splits"].values() for f in split["filenames"]]
    pic = next(s for s in _read_all(paths) if s["__key__"] == "class_0_pic")
    assert Image.open(io.BytesIO(pic["jpg"])).format == "JPEG"
    assert json.loads(pic["json"]) == {"box": [1, 2, 3, 4]}


def test_original_jpeg_bytes_are_kept_unless_resized(tmp_path):
    src = make_image_folder(str(tmp_path / "src"), num_classes=1, per_class=2, size=(64, 48))
    original = open(os.path.join(src, "class_0", "img_0.jpg"), "rb").read()
    info = convert(src, str(tmp_path / "a"), workers=1)
    kept = {s["__key__"]: s["jpg"] for s in _read_all([str(tmp_path / "a" / info["splits"]["train"]["filenames"][0])])}
    assert kept["class_0_img_0"] == original
    info = convert(src, str(tmp_path / "b"), max_side=24, workers=1)
    small = _read_all([str(tmp_path / "b" / info["splits"]["train"]["filenames"][0])])[0]
    assert min(Image.open(io.BytesIO(small["jpg"])).size) == 24


def test_timm_wds_reader_reads_our_shards(converted):
    from timm.data import create_dataset

    _, out, info = converted
    ds = create_dataset("wds/demo", root=out, split="val", is_training=False, batch_size=1)
    items = list(ds)
    assert len(items) == info["splits"]["val"]["num_samples"]
    img, target = items[0]
    assert isinstance(img, Image.Image) and 0 <= target < 3


def test_resolve_split_accepts_directory_and_brace_pattern(converted):
    _, out, info = converted
    by_dir = resolve_split(out, "train")
    n = len(info["splits"]["train"]["filenames"])
    by_pattern = resolve_split(os.path.join(out, f"train-{{000000..{n - 1:06d}}}.tar"), "train")
    assert by_dir.shards == by_pattern.shards
    assert by_dir.classes == ("class_0", "class_1", "class_2")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_split(os.path.join(out, "nope-{0..3}.tar"), "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        resolve_split(out, "test")


def test_separate_val_tree_and_cli(tmp_path, capsys):
    train = make_image_folder(str(tmp_path / "train"), num_classes=2, per_class=3)
    val = make_image_folder(str(tmp_path / "val"), num_classes=2, per_class=2)
    main([train, str(tmp_path / "out"), "--val", val, "--shard-size", "4", "--workers", "1"])
    info = load_info(str(tmp_path / "out"))
    assert info["splits"]["train"]["num_samples"] == 6 and info["splits"]["val"]["num_samples"] == 4
    assert "wrote 10 images" in capsys.readouterr().out


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(str(tmp_path / "missing"), str(tmp_path / "out"))
