"""Reliability (issue 6, guarantees 7 and 9): bad configs fail fast, before any process group, naming
the key and the value; weight files that need pickle are refused unless ckpt.allow_pickle is set."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import pytest
import timm
import torch

from tests.helpers import CreatesFile, make_shards
from tests.launch import REPO, SMOKE, free_port
from trainer.config import ConfigError, load_config, validate

TINY = {"patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}


class RunMeta:
    """A custom class saved beside the weights: loading it needs real pickle (importing this module)."""

    def __init__(self, note: str):
        self.note = note


def _tiny_vit_state(**overrides) -> dict[str, torch.Tensor]:
    kwargs = {**TINY, **overrides}
    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=4, **kwargs).state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Shards, DeepSpeed JSONs and weight files for the invalid-config table."""
    root = tmp_path_factory.mktemp("cfgcases")
    make_shards(str(root / "shards"), [4, 4, 4, 4])
    out = {"train": str(root / "shards" / "train-*.tar"), "root": str(root)}
    for name, ds in {"stage4": {"zero_optimization": {"stage": 4}},
                     "fp16_bf16": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                   "fp16": {"enabled": True}}}.items():
        out[name] = str(root / f"{name}.json")
        with open(out[name], "w") as f:
            json.dump(ds, f)
    out["good_weights"] = str(root / "good.pth")
    torch.save(_tiny_vit_state(), out["good_weights"])
    out["wide_weights"] = str(root / "wide.pth")  # embed_dim 48: the wrong shape for the configured model
    torch.save(_tiny_vit_state(embed_dim=48), out["wide_weights"])
    out["namespace_weights"] = str(root / "with_args.pth")  # timm/DeiT-style: weights plus argparse.Namespace
    torch.save({"model": _tiny_vit_state(), "args": argparse.Namespace(lr=5e-4)}, out["namespace_weights"])
    out["custom_weights"] = str(root / "with_meta.pth")  # weights plus an instance of a custom class
    torch.save({"model": _tiny_vit_state(), "meta": RunMeta("trained on a cluster")}, out["custom_weights"])
    out["marker"] = str(root / "payload_ran")
    out["payload_weights"] = str(root / "payload.pth")
    torch.save({"model": _tiny_vit_state(), "x": CreatesFile(out["marker"])}, out["payload_weights"])
    return out


# The list (guarantee 7) plus a shard pattern that matches nothing (guarantee 4): each case is
# (id, overrides, key the message must name, value the message must show).
CASES = [
    ("zero_stage_4", ["backend.ds_config={stage4}"], "zero_optimization.stage", "4"),
    ("unknown_ds_config", ["backend.ds_config=ds_configs/zero4.json"], "backend.ds_config", "zero4.json"),
    ("fp16_and_bf16_in_ds_json", ["backend.ds_config={fp16_bf16}"], "fp16.enabled", "True"),
    ("keep_ratio_0", ["prune.keep_ratio=0"], "prune.keep_ratio", "0.0"),
    ("keep_ratio_negative", ["prune.keep_ratio=-0.1"], "prune.keep_ratio", "-0.1"),
    ("keep_ratio_above_1", ["prune.keep_ratio=1.5"], "prune.keep_ratio", "1.5"),
    ("keep_ratio_nan", ["prune.keep_ratio=nan"], "prune.keep_ratio", "nan"),
    ("flops_budget_0", ["prune.gate=asvit", "prune.flops_budget=0"], "prune.flops_budget", "0.0"),
    ("global_batch_not_ranks_x_accum", ["data.global_batch_size=12", "optim.accum_steps=4"],
     "data.global_batch_size", "12"),
    ("unknown_key", ["prune.keep_ration=0.5"], "prune.keep_ration", "prune.keep_ratio"),
    ("wrong_type", ["data.batch_size=abc"], "data.batch_size", "'abc'"),
    ("missing_data_dir", ["data.train=/nonexistent/imagenet/train"], "data.train", "/nonexistent/imagenet/train"),
    ("pattern_matches_nothing", ["data.train=/nonexistent/train-{000000..000009}.tar"], "data.train",
     "train-{000000..000009}.tar"),
    ("teacher_checkpoint_missing", ["teacher.checkpoint=/nonexistent/teacher.pth"], "teacher.checkpoint",
     "/nonexistent/teacher.pth"),
    ("teacher_checkpoint_wrong_shape", ["teacher.checkpoint={wide_weights}"], "teacher.checkpoint", "wide.pth"),
    ("gate_location_beyond_depth", ["prune.locations=[1, 9]"], "prune.locations", "[1, 9]"),
    ("img_size_not_divisible_by_patch", ["model.img_size=36"], "model.img_size", "36"),
    ("checkpoint_needs_pickle", ["model.checkpoint={custom_weights}"], "ckpt.allow_pickle", "with_meta.pth"),
]
# Cases whose check builds the model or reads a weight file, so they import torch and timm first (~4 s of
# CPU each); the CLI test runs two of them.
NEEDS_MODEL = {"teacher_checkpoint_wrong_shape", "gate_location_beyond_depth", "img_size_not_divisible_by_patch",
               "checkpoint_needs_pickle"}
CLI_SKIPS = {"gate_location_beyond_depth", "checkpoint_needs_pickle"}


def _overrides(files, overrides):
    def fill(text: str) -> str:  # {name} -> a file of the fixture (str.format would choke on brace patterns)
        for name, path in files.items():
            text = text.replace("{" + name + "}", path)
        return text

    return [f"data.train={files['train']}", "data.val=", "data.batch_size=4", *map(fill, overrides)]


@pytest.mark.parametrize(("case", "overrides", "key", "value"), CASES, ids=[c[0] for c in CASES])
def test_invalid_config_is_rejected_naming_key_and_value(files, case, overrides, key, value):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        validate(load_config(SMOKE, _overrides(files, overrides)), world_size=2)
    assert time.perf_counter() - start < 5
    assert key in str(err.value) and value in str(err.value), str(err.value)


def test_the_same_files_are_accepted_when_valid_so_the_table_tests_the_cause(files):
    """Positive controls: right-shaped weight files (one with timm's saved args, which weights_only allows
    like timm does), and the pickle-needing one with ckpt.allow_pickle."""
    for extra in ([f"teacher.checkpoint={files['good_weights']}"], [f"model.checkpoint={files['namespace_weights']}"],
                  [f"model.checkpoint={files['custom_weights']}", "ckpt.allow_pickle=true"],
                  ["data.global_batch_size=32", "optim.accum_steps=4"]):
        validate(load_config(SMOKE, _overrides(files, extra)), world_size=2)


def test_weights_needing_pickle_are_refused_without_running_them_and_load_with_the_flag(files):
    from model import create_student
    from model.weights import UnsafeCheckpointError

    with pytest.raises(ConfigError, match=r"model\.checkpoint=.*payload\.pth.*ckpt\.allow_pickle"):
        validate(load_config(SMOKE, _overrides(files, [f"model.checkpoint={files['payload_weights']}"])))
    with pytest.raises(UnsafeCheckpointError, match=r"payload\.pth.*allow_pickle"):
        create_student("vit_tiny_patch16_224", img_size=32, num_classes=4, checkpoint=files["payload_weights"], **TINY)
    assert not os.path.exists(files["marker"]), "the payload ran"
    with pytest.raises(UnsafeCheckpointError, match=r"with_meta\.pth.*RunMeta.*ckpt\.allow_pickle"):
        create_student("vit_tiny_patch16_224", img_size=32, num_classes=4, checkpoint=files["custom_weights"], **TINY)
    student = create_student("vit_tiny_patch16_224", img_size=32, num_classes=4,
                             checkpoint=files["custom_weights"], allow_pickle=True, **TINY)
    expected = torch.load(files["custom_weights"], weights_only=False)["model"]
    assert all(torch.equal(student.vit.state_dict()[k], v) for k, v in expected.items())
    # The negative control: the payload is live, so "not created" above means it was never unpickled.
    torch.load(files["payload_weights"], weights_only=False)
    assert os.path.exists(files["marker"])
    os.remove(files["marker"])


def _cli(cmd: list[str], env: dict[str, str], timeout: int = 60) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, wall seconds, CPU seconds of the child and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.slow
@pytest.mark.dist
def test_cli_rejects_bad_configs_before_any_process_group_in_under_5_s(files):
    """Through the real CLI, as rank 0 of a 2-rank job whose rank 1 never comes: had a process group been
    started, rank 0 would wait for rank 1 until the subprocess timeout. Then one case under torchrun."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env = {**base, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    wall, cpu = {}, {}
    for case, overrides, key, value in (c for c in CASES if c[0] not in CLI_SKIPS):
        cmd = [sys.executable, "-m", "trainer.train", "--config", SMOKE]
        for o in _overrides(files, overrides):
            cmd += ["--set", o]
        proc, wall[case], cpu[case] = _cli(cmd, env)
        assert proc.returncode == 2, (case, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "config error:" in proc.stderr and key in proc.stderr and value in proc.stderr, (case, proc.stderr)
        assert "init_distributed" not in proc.stdout + proc.stderr
    print("rejection wall seconds:", json.dumps({k: round(v, 2) for k, v in wall.items()}))
    print("rejection CPU seconds:", json.dumps({k: round(v, 2) for k, v in cpu.items()}))
    fast = [c for c in wall if c not in NEEDS_MODEL]
    assert max(wall[c] for c in fast) < 2, wall  # this path imports no torch: ~0.2 s
    # The model-shape cases import torch and timm (~4 s of CPU, all of it imports): bound their CPU time,
    # which a machine shared with other jobs does not inflate, and their wall time loosely.
    assert max(cpu[c] for c in NEEDS_MODEL - CLI_SKIPS) < 5, cpu
    assert max(wall.values()) < 10, wall

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "trainer.train", "--config", SMOKE]
    for o in _overrides(files, ["prune.keep_ratio=1.5"]):
        cmd += ["--set", o]
    proc, seconds, _ = _cli(cmd, {**base, "OMP_NUM_THREADS": "1"})
    print(f"torchrun 2 ranks, keep_ratio=1.5: rejected in {seconds:.2f} s (launcher start included)")
    # The first rank to fail makes torchrun stop the other, which may not get to print its own line.
    assert proc.returncode != 0 and "config error: prune.keep_ratio=1.5" in proc.stderr, proc.stderr[-3000:]
    assert seconds < 15, seconds
