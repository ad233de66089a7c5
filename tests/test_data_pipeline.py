"""Train stream and eval loader: equal steps, no repeats, exact resume, exact eval, bad samples."""

import os
import tarfile
from itertools import islice

import pytest
import torch

from data import (
    SKIP_KINDS,
    AugmentConfig,
    DataQualityError,
    DeviceAugment,
    EvalLoader,
    StreamPlan,
    TrainLoader,
    eval_transform,
    resolve_split,
    train_transform,
)
from tests.helpers import jpeg_bytes, make_shards, write_shard

AUG = AugmentConfig()


def _plan(shard_dir, **kw):
    split = resolve_split(os.path.join(shard_dir, "train-*.tar"), "train")
    defaults = dict(batch_size=2, world_size=2, workers_per_rank=2, seed=5, shuffle_buffer=8, num_classes=4)
    defaults.update(kw)
    return StreamPlan(split.shards, **defaults)


def _epoch_keys(plan, rank, epoch=0):
    loader = TrainLoader(plan, rank, train_transform(32, AUG))
    batches = list(islice(iter(loader), sum(plan.steps_per_epoch(e) for e in range(epoch + 1))))
    return [k for b in batches[-plan.steps_per_epoch(epoch):] for k in b["keys"]]


def test_too_few_shards_for_ranks_times_workers_fails_with_the_number_needed(tmp_path):
    make_shards(str(tmp_path), [4, 4, 4])
    with pytest.raises(ValueError, match="need at least 4 shards"):
        _plan(str(tmp_path))


def test_two_ranks_two_workers_equal_steps_and_no_sample_twice_in_an_epoch(tmp_path):
    make_shards(str(tmp_path), [10, 10, 4, 10, 7, 9])  # uneven on purpose
    plan = _plan(str(tmp_path))
    for epoch in (0, 1):
        per_rank = [_epoch_keys(plan, r, epoch) for r in range(2)]
        steps = plan.steps_per_epoch(epoch)
        assert [len(k) for k in per_rank] == [steps * plan.batch_size] * 2
        everything = per_rank[0] + per_rank[1]
        assert len(everything) == len(set(everything))


def test_shard_split_is_disjoint_across_ranks_and_workers_and_reshuffled_per_epoch(tmp_path):
    make_shards(str(tmp_path), [3] * 8)
    plan = _plan(str(tmp_path))
    for epoch in (0, 1):
        seen = [s.path for r in range(2) for w in range(2) for s in plan.worker_shards(epoch, r, w)]
        assert sorted(seen) == sorted(s.path for s in plan.shards)
    assert plan.shard_order(0) != plan.shard_order(1)


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_continues_the_exact_sample_stream(tmp_path, workers):
    make_shards(str(tmp_path), [9, 8, 9, 7])
    plan = _plan(str(tmp_path), world_size=1, workers_per_rank=workers, batch_size=3)
    transform = train_transform(32, AUG)
    total = plan.steps_per_epoch(0) + 3  # crosses an epoch boundary
    reference = list(islice(iter(TrainLoader(plan, 0, transform)), total))
    for cut in (1, plan.steps_per_epoch(0) - 1, plan.steps_per_epoch(0) + 1):
        first = TrainLoader(plan, 0, transform)
        head = list(islice(iter(first), cut))
        resumed = TrainLoader(plan, 0, transform)
        resumed.load_state_dict(first.state_dict())
        tail = list(islice(iter(resumed), total - cut))
        for a, b in zip(reference, head + tail, strict=True):
            assert a["keys"] == b["keys"]
            assert torch.equal(a["image"], b["image"]), "augmentation randomness not restored"


def test_resume_refuses_a_position_from_another_plan(tmp_path):
    make_shards(str(tmp_path), [4] * 4)
    a = TrainLoader(_plan(str(tmp_path)), 0, train_transform(32, AUG))
    b = TrainLoader(_plan(str(tmp_path), seed=6), 0, train_transform(32, AUG))
    with pytest.raises(ValueError, match="another data plan.*seed"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_sees_every_sample_exactly_once_with_equal_batch_counts(tmp_path, world_size):
    make_shards(str(tmp_path), [5, 3, 4, 6, 2], prefix="val")
    split = resolve_split(os.path.join(str(tmp_path), "val-{000000..000004}.tar"), "val")
    keys, batch_counts = [], []
    for rank in range(world_size):
        loader = EvalLoader(split.shards, batch_size=4, rank=rank, world_size=world_size,
                            transform=eval_transform(32, AUG), workers=2, image_shape=(3, 32, 32))
        batches = list(loader)
        batch_counts.append(len(batches))
        for b in batches:
            assert b["image"].shape[1:] == (3, 32, 32)
            keys += [k for k, v in zip(b["keys"], b["valid"].tolist(), strict=False) if v]
            assert int(b["valid"].sum()) == len(b["keys"])
    assert sorted(keys) == sorted(f"s{k}_{i}" for k, n in enumerate([5, 3, 4, 6, 2]) for i in range(n))
    assert len(set(batch_counts)) == 1


def _bad_samples():
    good = lambda i: jpeg_bytes(500 + i)  # noqa: E731
    return [
        {"__key__": "ok_0", "jpg": good(0), "cls": 1},
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff garbage", "cls": 1},
        {"__key__": "truncated", "jpg": good(1)[:200], "cls": 1},
        {"__key__": "png_in_jpg", "jpg": jpeg_bytes(2, fmt="PNG"), "cls": 2},
        {"__key__": "cmyk", "jpg": jpeg_bytes(3, mode="CMYK"), "cls": 2},
        {"__key__": "gray", "jpg": jpeg_bytes(4, mode="L"), "cls": 2},
        {"__key__": "no_label", "jpg": good(5)},
        {"__key__": "big_label", "jpg": good(6), "cls": 99},
        {"__key__": "text_label", "jpg": good(7), "cls": b"cat"},
        {"__key__": "no_image", "cls": 1},
        {"__key__": "ok_1", "jpg": good(8), "cls": 3},
    ]


def test_bad_samples_are_skipped_and_counted_by_kind_and_unusual_images_load(tmp_path):
    write_shard(str(tmp_path / "train-000000.tar"), _bad_samples())
    plan = _plan(str(tmp_path), world_size=1, workers_per_rank=1, batch_size=5, shuffle_buffer=1)
    loader = TrainLoader(plan, 0, train_transform(32, AUG), max_skip_fraction=1.0)
    (batch,) = list(islice(iter(loader), 1))
    assert sorted(batch["keys"]) == ["cmyk", "gray", "ok_0", "ok_1", "png_in_jpg"]
    assert dict(loader.skips) == {"bad_image": 1, "truncated_image": 1, "missing_label": 1, "label_out_of_range": 1,
                                  "bad_label": 1, "missing_image": 1}
    assert set(loader.skips) <= set(SKIP_KINDS)


def test_truncated_tar_is_counted_and_the_rest_of_the_data_still_flows(tmp_path):
    make_shards(str(tmp_path), [6, 6])
    path = str(tmp_path / "train-000000.tar")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2 + 100])
    plan = _plan(str(tmp_path), world_size=1, workers_per_rank=1, batch_size=2)
    loader = TrainLoader(plan, 0, train_transform(32, AUG), max_skip_fraction=1.0)
    batches = list(islice(iter(loader), plan.steps_per_epoch(0)))
    assert len(batches) == plan.steps_per_epoch(0)
    assert loader.skips["bad_tar"] >= 1


def test_skip_rate_above_the_limit_stops_with_the_worst_shard_named(tmp_path):
    samples = [{"__key__": f"bad{i}", "jpg": b"nope", "cls": 0} for i in range(6)]
    samples += [{"__key__": f"ok{i}", "jpg": jpeg_bytes(i), "cls": 0} for i in range(6)]
    write_shard(str(tmp_path / "train-000000.tar"), samples)
    plan = _plan(str(tmp_path), world_size=1, workers_per_rank=1, batch_size=2, shuffle_buffer=1)
    loader = TrainLoader(plan, 0, train_transform(32, AUG), max_skip_fraction=0.1, min_samples_for_skip_check=4)
    with pytest.raises(DataQualityError, match="worst shard: .*train-000000.tar"):
        list(islice(iter(loader), 3))


def test_pickle_fields_in_a_shard_are_never_read(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    write_shard(str(tmp_path / "train-000000.tar"),
                [{"__key__": f"k{i}", "jpg": jpeg_bytes(i), "cls": 0, "pyd": pickle.dumps(Payload())}
                 for i in range(4)])
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert any(n.endswith(".pyd") for n in tar.getnames())
    plan = _plan(str(tmp_path), world_size=1, workers_per_rank=1, batch_size=2)
    batches = list(islice(iter(TrainLoader(plan, 0, train_transform(32, AUG))), 2))
    assert all("pyd" not in b for b in batches)
    assert not marker.exists()


@pytest.mark.parametrize("size", [32, 384])
def test_transforms_produce_the_requested_resolution(size):
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(jpeg_bytes(0, (500, 375)))).convert("RGB")
    for t in (train_transform(size, AUG), eval_transform(size, AUG)):
        out = t(img)
        assert out.shape == (3, size, size) and out.dtype == torch.uint8


def test_device_augment_normalises_and_mixes_to_soft_targets():
    aug = DeviceAugment(AUG, num_classes=5)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x, target = aug.train(images, torch.tensor([0, 1, 2, 3]))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    assert target.shape == (4, 5) and torch.allclose(target.sum(1), torch.ones(4))
    x, target = aug.train(images[:3], torch.tensor([0, 1, 2]))  # odd batch: smoothed one-hot
    assert torch.allclose(target.sum(1), torch.ones(3)) and target.argmax(1).tolist() == [0, 1, 2]


def test_train_transform_survives_zero_bit_posterize_with_current_pillow():
    """DeiT's RandAugment can ask for 0 posterize bits; Pillow 13 raises there, we give black like Pillow 12."""
    import io

    from PIL import Image

    from data.transforms import posterize_or_black

    transform = train_transform(32, AUG)
    ops = [op for t in transform.transforms if hasattr(t, "ops") for op in t.ops if op.name.startswith("Posterize")]
    assert ops and all(op.aug_fn is posterize_or_black for op in ops)
    img = Image.open(io.BytesIO(jpeg_bytes(1, (64, 48)))).convert("RGB")
    assert posterize_or_black(img, 0).getextrema() == ((0, 0),) * 3
    assert posterize_or_black(img, 8) is img
    for op in ops:
        op.magnitude, op.magnitude_std, op.prob = 10, 0, 1.0  # force the 0-bit case
        op(img)


def test_loader_workers_survive_stop_signals_from_others_and_still_end_with_their_parent(tmp_path):
    """SLURM sends SIGTERM/SIGUSR1 to every process of a task: the workers must leave them to the training
    process (which stops at a step boundary with a checkpoint), yet end when the loader shuts them down."""
    import signal
    import subprocess
    import sys
    import textwrap

    make_shards(str(tmp_path), [8, 8])
    # The loader runs in a child (its workers are the grandchildren); this test process is "someone else".
    script = textwrap.dedent(f"""
        import os, sys
        from itertools import islice
        from data import StreamPlan, TrainLoader, resolve_split, train_transform
        from data.augment_config import AugmentConfig
        split = resolve_split({os.path.join(str(tmp_path), 'train-*.tar')!r}, "train")
        plan = StreamPlan(split.shards, batch_size=2, world_size=1, workers_per_rank=2, shuffle_buffer=4)
        batches = iter(TrainLoader(plan, 0, train_transform(32, AugmentConfig())))
        next(batches)
        print("ready", flush=True)
        sys.stdin.readline()
        print("after signals", len(list(islice(batches, 5))), flush=True)
        del batches
        print("shut down", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert proc.stdout.readline().strip() == "ready"
        import psutil

        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        for w in workers:
            os.kill(w.pid, signal.SIGTERM)
            os.kill(w.pid, signal.SIGUSR1)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "after signals 5"
        assert proc.stdout.readline().strip() == "shut down"
        assert proc.wait(timeout=30) == 0
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        proc.kill()
