"""Reliability (issue 6, guarantees 4, 5, 8, 9): bad data is skipped and counted, never fatal by accident and
never silent; uneven shards never hang; a world-size change on resume is refused with the way out; untrusted
shards and checkpoints cannot run code.

The real-run tests share one 2-rank run (`bad_run`) over shards carrying every kind of bad data: the
in-process tests pin exact counts, the run proves the same through worker processes, ranks, TensorBoard
and summary.json.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tarfile
import threading
import time
from collections import Counter
from itertools import islice

import pytest
import torch

from data import (
    SKIP_KINDS,
    AugmentConfig,
    DataQualityError,
    EvalLoader,
    StreamPlan,
    TrainLoader,
    eval_transform,
    resolve_split,
    train_transform,
)
from tests.helpers import CreatesFile, jpeg_bytes, write_shard
from tests.launch import run_training, trainer_states

AUG = AugmentConfig()
INJECTED_KINDS = ("bad_image", "truncated_image", "missing_label", "bad_label", "label_out_of_range", "bad_tar",
                  "empty_shard", "missing_shard")


class Planted:
    """A custom class: a checkpoint holding one needs real pickle to load."""

    def __init__(self, note: str):
        self.note = note


def _good(key: str, seed: int, label: int, variant: int = 0) -> dict:
    """A valid sample; variants 1-3 are valid but unusual: PNG bytes, CMYK JPEG, grayscale JPEG in `.jpg`."""
    image = [jpeg_bytes(seed), jpeg_bytes(seed, fmt="PNG"), jpeg_bytes(seed, mode="CMYK"),
             jpeg_bytes(seed, mode="L")][variant]
    return {"__key__": key, "jpg": image, "cls": label}


def _bad_samples(prefix: str) -> list[dict]:
    """One sample of each sample-level kind; keys start with `bad_` so the key log shows none trained."""
    truncated = jpeg_bytes(901, (64, 48))
    return [
        {"__key__": f"bad_{prefix}_corrupt", "jpg": truncated[:300] + bytes(range(256)) * 8, "cls": 1},  # junk body
        {"__key__": f"bad_{prefix}_truncated", "jpg": truncated[: len(truncated) // 2], "cls": 1},
        {"__key__": f"bad_{prefix}_nocls", "jpg": jpeg_bytes(902)},
        {"__key__": f"bad_{prefix}_bigcls", "jpg": jpeg_bytes(903), "cls": 99},
        {"__key__": f"bad_{prefix}_textcls", "jpg": jpeg_bytes(904), "cls": b"cat"},
    ]


def _with_payload(samples: list[dict], marker: str) -> list[dict]:
    """Every sample also carries `.pyd` and `.pickle` fields that would create `marker` if unpickled."""
    payload = pickle.dumps(CreatesFile(marker))
    return [{**s, "pyd": payload, "pickle": payload} for s in samples]


def _shard(path: str, n: int, first_seed: int, marker: str, extra: list[dict] = ()) -> None:
    """n samples (every third one unusual-but-valid), then `extra`, all with pickle payloads."""
    stem = os.path.basename(path).split(".")[0]
    samples = [_good(f"{stem}_{i}", first_seed + i, i % 4, variant=i % 4) for i in range(n)] + list(extra)
    write_shard(path, _with_payload(samples, marker))


def _truncated_tar(path: str, marker: str) -> None:
    _shard(path, 10, 700, marker)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * 0.6)])


def _empty_tar(path: str) -> None:
    with tarfile.open(path, "w"):
        pass


# --------------------------------------------------------------------------------------------------
# In process: exact counts (every item read exactly once) and the mid-run deletion.


def test_every_kind_of_bad_data_is_counted_exactly_once_and_unusual_images_load(tmp_path):
    """EvalLoader reads every sample once, through the same tar reader and decoder as training."""
    marker = str(tmp_path / "payload_ran")
    d = tmp_path / "val"
    d.mkdir()
    _shard(str(d / "val-000000.tar"), 8, 100, marker, extra=_bad_samples("a"))
    _truncated_tar(str(d / "val-000001.tar"), marker)
    _empty_tar(str(d / "val-000002.tar"))
    (d / "val-000003.tar").write_bytes(b"")  # a zero-byte file: also an empty shard
    _shard(str(d / "val-000004.tar"), 3, 200, marker)
    split = resolve_split(str(d / "val-*.tar"), "val")
    os.remove(d / "val-000004.tar")  # disappears after the run resolved its shards
    loader = EvalLoader(split.shards, batch_size=4, rank=0, world_size=1, transform=eval_transform(32, AUG),
                        num_classes=4, image_shape=(3, 32, 32))
    keys = [k for b in loader for k in b["keys"]]
    assert dict(loader.skips) == {"bad_image": 1, "truncated_image": 1, "missing_label": 1, "bad_label": 1,
                                  "label_out_of_range": 1, "bad_tar": 1, "empty_shard": 2, "missing_shard": 1}
    assert set(loader.skips) == set(INJECTED_KINDS) and set(SKIP_KINDS) >= set(INJECTED_KINDS)
    assert not [k for k in keys if k.startswith("bad_")]
    assert {f"val-000000_{i}" for i in range(8)} <= set(keys)  # PNG, CMYK and grayscale among them
    assert not os.path.exists(marker), "a pickle field was unpickled"


def test_a_shard_deleted_mid_run_is_counted_and_training_goes_on(tmp_path):
    marker = str(tmp_path / "payload_ran")
    for k, n in enumerate([6, 6, 6, 6]):
        _shard(str(tmp_path / f"train-{k:06d}.tar"), n, 100 * k, marker)
    plan = StreamPlan(resolve_split(str(tmp_path / "train-*.tar"), "train").shards, batch_size=2, world_size=1,
                      workers_per_rank=1, seed=0, shuffle_buffer=4, num_classes=4)
    loader = TrainLoader(plan, 0, train_transform(32, AUG), max_skip_fraction=1.0)
    batches = iter(loader)
    next(batches)
    os.remove(plan.shards[2].path)
    steps = [next(batches) for _ in range(2 * plan.steps_per_epoch(0))]  # into the next epoch
    assert len(steps) == 2 * plan.steps_per_epoch(0) and loader.epoch >= 1
    assert loader.skips["missing_shard"] >= 1
    assert loader.skips_by_shard[plan.shards[2].path] == loader.skips["missing_shard"]


def test_skip_rate_stop_is_taken_by_all_ranks_together_naming_the_worst_shard(tmp_path):
    """Rank 0 reads bad data, rank 1 clean data: both stop at the same batch (a rank stopping alone would
    leave the other in its next collective until the process-group timeout). Ranks are threads here; the
    `any_rank` hook is the all-reduce the trainer passes in."""
    bad = [{"__key__": f"bad_{i}", "jpg": b"not an image", "cls": 0} for i in range(6)]
    write_shard(str(tmp_path / "train-000000.tar"), bad + [_good(f"a_{i}", i, 0) for i in range(8)])  # bad first
    write_shard(str(tmp_path / "train-000001.tar"), [_good(f"b_{i}", 50 + i, 0) for i in range(8)])
    plan = StreamPlan(resolve_split(str(tmp_path / "train-*.tar"), "train").shards, batch_size=2, world_size=2,
                      workers_per_rank=1, seed=0, shuffle_buffer=1, num_classes=4)
    barrier, votes = threading.Barrier(2), [False, False]

    def any_rank_for(rank: int):
        def any_rank(flag: bool) -> bool:
            votes[rank] = flag
            barrier.wait()
            out = any(votes)
            barrier.wait()
            return out
        return any_rank

    results: dict[int, tuple[int, str]] = {}

    def run(rank: int) -> None:
        loader = TrainLoader(plan, rank, train_transform(32, AUG), max_skip_fraction=0.1,
                             min_samples_for_skip_check=4, use_processes=False, any_rank=any_rank_for(rank),
                             skip_check_every=1)
        n = 0
        try:
            for _ in islice(loader, 40):  # bounded: a rank that never stops fails the test, never hangs it
                n += 1
        except DataQualityError as e:
            results[rank] = (n, str(e))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [0, 1], "a rank did not stop (it would hang in a real run)"
    assert results[0][0] == results[1][0], "ranks stopped at different batches"
    bad_shard = plan.shards[0].path
    messages = {r: msg for r, (_, msg) in results.items()}
    worst = next(m for m in messages.values() if "worst shard:" in m)
    assert bad_shard in worst and "data.max_skip_fraction=0.1" in worst
    assert any("another rank" in m for m in messages.values())


# --------------------------------------------------------------------------------------------------
# One real 2-rank run (torchrun, DeepSpeed ZeRO-2 bf16, 2 data workers per rank) over every kind of bad data.


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory) -> dict:
    """Shards 10/10/4/... (uneven) over 2 ranks x 2 workers, with every bad kind, pickle payloads in all train
    and val shards, and one shard deleted while the run is going. Runs two epochs."""
    root = tmp_path_factory.mktemp("baddata")
    marker = str(root / "payload_ran")
    names = [f"train-{k:06d}.tar" for k in range(8)]
    sizes = {0: 10, 1: 10, 2: 4, 4: 10, 6: 10, 7: 7}
    for k, n in sizes.items():
        _shard(str(root / names[k]), n, 100 * k, marker)
    _truncated_tar(str(root / names[3]), marker)
    _empty_tar(str(root / names[5]))
    pattern = str(root / "train-*.tar")
    shards = resolve_split(pattern, "train").shards
    by_path = {s.path: s for s in shards}
    empty, truncated = str(root / names[5]), str(root / names[3])

    def layout(seed: int) -> tuple[StreamPlan, str, str] | None:
        """(plan, shard for the bad samples, shard to delete) if this seed's shard split suits the test.

        The sample-level bad kinds go into a shard of the poorest worker of epoch 0: a worker short of its
        quota decodes its whole pass, so every bad sample is met (a richer worker may stop before them).
        The shard deleted mid-run must never be the only readable shard of a worker (that worker could
        not fill its batches: the run would stop, loudly, which is another test)."""
        plan = StreamPlan(shards, batch_size=2, world_size=2, workers_per_rank=2, seed=seed, shuffle_buffer=16,
                          num_classes=4)
        split = {e: [[s.path for s in plan.worker_shards(e, r, w)] for r in range(2) for w in range(2)]
                 for e in (0, 1)}
        totals = [sum(by_path[p].num_samples for p in ws) for ws in split[0]]
        poorest = split[0][totals.index(min(totals))]
        target = next((p for p in poorest if p not in (empty, truncated) and by_path[p].num_samples >= 6), None)
        doomed = next((p for p in sorted(by_path) if p not in (empty, truncated, target)
                       and all(not (p in ws and empty in ws) for e in (0, 1) for ws in split[e])), None)
        return (plan, target, doomed) if target and doomed else None

    seed = next(s for s in range(100) if layout(s))
    plan, target, doomed = layout(seed)
    n = by_path[target].num_samples
    k = int(os.path.basename(target)[6:12])
    _shard(target, n - 5, 100 * k, marker, extra=_bad_samples("t"))  # same count: the plan is unchanged
    val = root / "val"
    val.mkdir()
    _shard(str(val / "val-000000.tar"), 5, 500, marker, extra=_bad_samples("v")[:1])
    _shard(str(val / "val-000001.tar"), 4, 600, marker)
    steps = plan.steps_per_epoch(0) + plan.steps_per_epoch(1)
    run_dir = str(root / "run")
    deleted = {}

    def delete_after_first_step() -> None:  # "a shard that disappears mid-run"
        metrics = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.time() + 240
        while time.time() < deadline:
            if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
                with open(metrics) as f:
                    deleted["after_steps"] = sum(1 for line in f if '"kind": "train"' in line)
                os.remove(doomed)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=delete_after_first_step, daemon=True)
    watcher.start()
    start = time.time()
    proc = run_training("torchrun", 2, [
        f"data.train={pattern}", f"data.val={val}/val-*.tar", f"run.dir={run_dir}", "data.workers=2",
        "data.batch_size=2", "data.shuffle_buffer=16", "data.log_keys=true", "data.max_skip_fraction=1.0",
        f"train.seed={seed}", f"train.steps={steps}", "log.every=1", "ckpt.every=0"], timeout=300)
    wall = time.time() - start
    watcher.join(timeout=5)
    # Put the deleted shard back (same samples): a resume must find the data plan it saved.
    _shard(doomed, by_path[doomed].num_samples, 100 * int(os.path.basename(doomed)[6:12]), marker)
    return {"root": str(root), "run_dir": run_dir, "proc": proc, "wall": wall, "steps": steps, "marker": marker,
            "doomed": doomed, "deleted": deleted, "plan": plan, "epoch_steps": plan.steps_per_epoch(0), "seed": seed}


def _keys_by_step(run_dir: str, rank: int) -> dict[int, list[str]]:
    """Consumed sample keys per optimizer step from the debug key log (either line format)."""
    out: dict[int, list[str]] = {}
    with open(os.path.join(run_dir, f"keys_rank{rank}.txt")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            step, *keys = line.split()
            out.setdefault(int(step), []).extend(keys)
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_bad_data_run_skips_and_counts_every_kind_and_never_trains_on_it(bad_run):
    run_dir = bad_run["run_dir"]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    skipped = summary["skipped_samples"]
    print(f"bad-data run: {bad_run['steps']} steps in {bad_run['wall']:.1f} s; shard deleted after step "
          f"{bad_run['deleted'].get('after_steps')}; skipped by kind: {json.dumps(skipped)}")
    assert bad_run["deleted"].get("after_steps", bad_run["epoch_steps"]) < bad_run["epoch_steps"], \
        "the shard was not deleted before the second epoch started"
    missing = [k for k in INJECTED_KINDS if skipped.get(k, 0) < 1]
    assert not missing, f"kinds injected but not counted: {missing}; counts {skipped}"
    assert skipped["missing_image"] == 0, "a valid sample was counted as bad"
    assert summary["steps"] == bad_run["steps"]

    # Rank sums: the summary equals the ranks' own counters saved in the final checkpoint.
    (ckpt_dir,) = [os.path.join(run_dir, "checkpoints", n) for n in os.listdir(os.path.join(run_dir, "checkpoints"))
                   if n.startswith("step_")]
    states = trainer_states(ckpt_dir)
    per_rank = sum((Counter(s["data"]["skips"]) for s in states), Counter())
    assert {k: v for k, v in skipped.items() if v} == dict(per_rank)

    # TensorBoard shows the same numbers, one tag per kind.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    events.Reload()
    for kind in SKIP_KINDS:
        series = events.Scalars(f"train/data/skipped_{kind}")
        assert series[-1].step == bad_run["steps"] and series[-1].value == skipped[kind], kind

    # Nothing bad was trained on; valid-but-unusual images were (every third sample is PNG/CMYK/gray).
    keys = [k for r in (0, 1) for ks in _keys_by_step(run_dir, r).values() for k in ks]
    assert not [k for k in keys if k.startswith("bad_")]
    unusual = {k for k in keys if int(k.rsplit("_", 1)[1]) % 4}
    assert len(unusual) >= 10, "PNG/CMYK/grayscale samples were not trained on"
    # Eval ran over val shards carrying a bad sample and pickle payloads; the bad one is counted.
    assert summary["eval_skipped"] == 1 and summary["count"] == 9


@pytest.mark.dist
@pytest.mark.slow
def test_uneven_shards_give_every_rank_the_same_steps_and_finish_fast(bad_run):
    """10/10/4/... samples per shard over 2 ranks x 2 workers: equal steps on both ranks, no hang."""
    plan = bad_run["plan"]
    totals = [sum(s.num_samples for s in plan.worker_shards(0, r, w)) for r in range(2) for w in range(2)]
    assert len(set(totals)) > 1, f"worker totals not uneven: {totals}"
    per_rank = [_keys_by_step(bad_run["run_dir"], r) for r in (0, 1)]
    first = min(per_rank[0])  # the key log numbers steps from 0 or 1 depending on its format
    assert sorted(per_rank[0]) == sorted(per_rank[1]) == list(range(first, first + bad_run["steps"]))
    assert all(len(v) == 2 for r in per_rank for v in r.values())  # one micro-batch of 2 per step
    print(f"uneven shards {[s.num_samples for s in plan.shards]}, worker totals {totals}: both ranks ran "
          f"{len(per_rank[0])} steps; run wall {bad_run['wall']:.1f} s vs a 30 min process-group timeout")
    assert bad_run["wall"] < 180


def test_three_shards_for_two_ranks_times_two_workers_fail_at_start_with_the_number_needed(tmp_path):
    for k, n in enumerate([10, 10, 4]):
        _shard(str(tmp_path / f"train-{k:06d}.tar"), n, 100 * k, str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"3 train shard\(s\) for 2 rank\(s\) x 2 worker\(s\): need at least 4"):
        StreamPlan(resolve_split(str(tmp_path / "train-*.tar"), "train").shards, 2, 2, 2)


@pytest.mark.dist
@pytest.mark.slow
def test_pickle_payloads_in_train_and_val_shards_never_run(bad_run):
    with tarfile.open(os.path.join(bad_run["root"], "train-000000.tar")) as tar:
        assert any(n.endswith(".pyd") for n in tar.getnames()) and any(n.endswith(".pickle") for n in tar.getnames())
    assert not os.path.exists(bad_run["marker"]), "a pickle field in a shard was unpickled"
    with tarfile.open(os.path.join(bad_run["root"], "train-000000.tar")) as tar:  # the negative control
        payload = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".pyd"))).read()
    pickle.loads(payload)
    assert os.path.exists(bad_run["marker"])
    os.remove(bad_run["marker"])


@pytest.mark.dist
@pytest.mark.slow
def test_resume_with_another_world_size_is_refused_with_how_to_convert(bad_run, tmp_path):
    """2 ranks wrote the checkpoint; 1 rank resuming it stops with the export recipe, which works."""
    from trainer.export import export

    proc = run_training("python", 1, [f"data.train={bad_run['root']}/train-*.tar", "data.val=",
                                      f"run.dir={bad_run['run_dir']}", "data.workers=2", "data.batch_size=2",
                                      f"train.steps={bad_run['steps'] + 2}"], check=False, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "written by 2 ranks, this run has 1" in out and "python -m trainer.export --checkpoint" in out, out[-3000:]
    weights = str(tmp_path / "w.safetensors")
    export(bad_run["run_dir"], weights)
    from safetensors.torch import load_file

    from model import create_student
    from tests.launch import SMOKE
    from trainer.config import load_config, validate

    student = create_student("vit_tiny_patch16_224", img_size=32, num_classes=4, checkpoint=weights,
                             patch_size=8, depth=4, embed_dim=32, num_heads=2)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in load_file(weights).items())
    validate(load_config(SMOKE, [f"data.train={bad_run['root']}/train-*.tar", "data.val=",
                                 f"model.checkpoint={weights}"]))


def _planted_copy(bad_run: dict, run_dir: str) -> str:
    """A copy of the bad-data run whose DeepSpeed model-states file also holds a custom object (DeepSpeed
    itself would unpickle it with weights_only=False); returns the checkpoint directory."""
    shutil.copytree(bad_run["run_dir"], run_dir)
    (ckpt_dir,) = [os.path.join(run_dir, "checkpoints", n) for n in os.listdir(os.path.join(run_dir, "checkpoints"))
                   if n.startswith("step_")]
    states = os.path.join(ckpt_dir, "mp_rank_00_model_states.pt")
    planted = torch.load(states, weights_only=False)
    planted["meta"] = Planted("added after training")
    torch.save(planted, states)
    return ckpt_dir


def _resume_overrides(bad_run: dict, run_dir: str, *extra: str) -> list[str]:
    return [f"data.train={bad_run['root']}/train-*.tar", "data.val=", f"run.dir={run_dir}", "data.workers=2",
            "data.batch_size=2", "data.shuffle_buffer=16", f"train.seed={bad_run['seed']}",
            f"train.steps={bad_run['steps'] + 40}", *extra]


@pytest.mark.dist
@pytest.mark.slow
def test_resume_refuses_a_checkpoint_file_that_needs_pickle_naming_it(bad_run, tmp_path):
    """The resume stops before DeepSpeed unpickles the planted file, naming it and ckpt.allow_pickle; the
    untouched checkpoint passes the same check (the allowlist covers what DeepSpeed really writes)."""
    from trainer.infra.backends.deepspeed_backend import SAFE_GLOBALS
    from trainer.infra.checkpoint import UnsafeCheckpointError, torch_files, verify_checkpoint_dir

    (clean,) = [os.path.join(bad_run["run_dir"], "checkpoints", n)
                for n in os.listdir(os.path.join(bad_run["run_dir"], "checkpoints")) if n.startswith("step_")]
    assert verify_checkpoint_dir(clean, SAFE_GLOBALS) == len(torch_files(clean)) >= 3
    run_dir = str(tmp_path / "run")
    ckpt_dir = _planted_copy(bad_run, run_dir)
    with pytest.raises(UnsafeCheckpointError):
        verify_checkpoint_dir(ckpt_dir, SAFE_GLOBALS)
    proc = run_training("torchrun", 2, _resume_overrides(bad_run, run_dir), check=False, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "mp_rank_00_model_states.pt: refused" in out and "Planted" in out, out[-3000:]
    assert "ckpt.allow_pickle=true" in out and "resumed from" not in out


@pytest.mark.dist
@pytest.mark.slow
def test_allow_pickle_loads_it_then_the_skip_rate_limit_stops_both_ranks_naming_the_worst_shard(bad_run, tmp_path):
    """Two checks, one launch: with ckpt.allow_pickle=true the planted checkpoint resumes; the run then meets
    data.max_skip_fraction=0.05 (the skip counters resume too) and stops on both ranks, no hang, naming
    the worst shard."""
    run_dir = str(tmp_path / "run")
    _planted_copy(bad_run, run_dir)
    start = time.time()
    proc = run_training("torchrun", 2, _resume_overrides(
        bad_run, run_dir, "ckpt.allow_pickle=true", "data.max_skip_fraction=0.05", "data.skip_check_min_samples=4"),
        check=False, timeout=180)
    out = proc.stdout + proc.stderr
    ranks = sorted({line.split(":", 1)[0] for line in out.splitlines() if "DataQualityError: rank" in line})
    print(f"allow_pickle resume + skip-rate stop after {time.time() - start:.1f} s; ranks reporting it: {ranks}")
    assert f"resumed from {run_dir}" in out, out[-3000:]
    assert proc.returncode != 0 and "DataQualityError" in out, out[-3000:]
    assert "data.max_skip_fraction=0.05" in out and "worst shard: " in out, out[-3000:]
    worst = out.split("worst shard: ", 1)[1].split(" (", 1)[0]
    assert worst.startswith(bad_run["root"]) and worst.endswith(".tar"), worst


@pytest.mark.dist
@pytest.mark.slow
def test_ranks_that_resolved_different_shards_notice_before_training(tmp_path):
    """A pattern globbed while a shard vanishes (or on two nodes that list a file system differently) gives
    ranks different plans and so different steps per epoch: the plans' fingerprints are compared at start."""
    import subprocess
    import sys

    from tests.launch import REPO, free_port

    for k in range(3):
        _shard(str(tmp_path / f"train-{k:06d}.tar"), 4, 10 * k, str(tmp_path / "m"))
    before = StreamPlan(resolve_split(str(tmp_path / "train-*.tar"), "train").shards, 2)
    os.remove(tmp_path / "train-000002.tar")
    after = StreamPlan(resolve_split(str(tmp_path / "train-*.tar"), "train").shards, 2)
    assert before.fingerprint() != after.fingerprint()
    script = tmp_path / "agree.py"
    script.write_text(
        "import sys, torch.distributed as tdist\nfrom trainer.infra import dist\ntdist.init_process_group('gloo')\n"
        "r = tdist.get_rank()\nout, plans = sys.argv[1], sys.argv[2:]\n"
        "line = f'same={dist.same_on_all_ranks(plans[0])} differ={dist.same_on_all_ranks(plans[r])}'\n"
        "open(f'{out}/rank{r}.txt', 'w').write(line)\n"  # one file per rank: lines on a shared pipe can interleave
        "dist.shutdown()\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(tmp_path), before.fingerprint(), after.fingerprint()],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(2):
        assert (tmp_path / f"rank{r}.txt").read_text() == "same=True differ=False", f"rank {r}"
