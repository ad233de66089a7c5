"""The benchmark CLIs run end to end on CPU (tiny sizes) and print the fields the README quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import make_shards
from tests.launch import REPO

TINY = ["--arch", "vit_tiny_patch16_224", "--img-size", "64", "--batch-size", "4", "--warmup", "1", "--iters", "2",
        "--threads", "1"]


def run_bench(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "trainer.bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_step_bench_times_dense_gated_and_teacher_side_by_side():
    out = run_bench("train-step", *TINY)
    for key in ("dense_step_s", "gated_step_s", "teacher_forward_s", "dense_img_s", "gated_img_s", "step_img_s"):
        assert out[key] > 0, key
    assert out["overhead"] == pytest.approx(out["gated_step_s"] / out["dense_step_s"], rel=0.01)
    assert out["step_img_s"] == pytest.approx(4 / (out["gated_step_s"] + out["teacher_forward_s"]), rel=0.01)
    assert "mfu" not in out  # no known peak for a CPU: MFU is reported on GPUs only


@pytest.mark.parametrize("gate", ["dynamicvit", "asvit"])
def test_inference_bench_reports_speedup_and_gmacs(gate):
    out = run_bench("inference", *TINY, "--gate", gate)
    assert out["gmacs_pruned"] < out["gmacs_dense"]
    assert out["speedup"] == pytest.approx(out["pruned_img_s"] / out["dense_img_s"], rel=0.02)


def test_unknown_bench_prints_usage_and_fails():
    proc = subprocess.run([sys.executable, "-m", "trainer.bench", "nope"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "train-step" in proc.stderr


def test_onnxruntime_inference_bench_times_both_exported_models_at_batch_and_batch_one():
    if os.environ.get("CI") != "true":  # under CI a missing deploy extra fails instead of skipping
        pytest.importorskip("onnxruntime", reason="the deploy extra (make test installs it)")
    out = run_bench("inference", "--runtime", "onnxruntime", *TINY)
    assert out["runtime"] == "onnxruntime" and out["batch_size"] == 4 and out["gmacs_pruned"] < out["gmacs_dense"]
    assert out["speedup"] == pytest.approx(out["pruned_img_s"] / out["dense_img_s"], rel=0.02)
    assert out["latency_speedup"] == pytest.approx(out["latency_dense_ms"] / out["latency_pruned_ms"], rel=0.02)
    assert out["speedup_over_gmacs_ratio"] == pytest.approx(out["speedup"] / out["gmacs_ratio"], rel=0.02)
    assert out["torch_speedup"] > 0 and len(out["keep_counts"]) == 3


def test_gate_gradients_reports_each_terms_gradient_on_the_gates(tmp_path):
    make_shards(str(tmp_path), [8], prefix="val")
    shards = str(tmp_path / "val-000000.tar")
    proc = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "gate_gradients.py"), "--config",
         os.path.join("trainer", "configs", "smoke.yaml"), "--set", f"data.train={shards}", "--set",
         f"data.val={shards}", "--batches", "2", "--batch-size", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["batch"] for line in lines] == [0, 1]
    for line in lines:
        assert set(line["param_grad_norm"]) == {"ce", "ratio", "kd", "tok"}
        assert line["param_grad_norm"]["ratio"] > 0  # the ratio term reaches the predictors
        for stages in line["mask_grad"].values():
            assert len(stages) == 3
            for stage in stages:
                assert stage["quantiles"] == sorted(stage["quantiles"])
                assert 0 <= stage["above_1_dropped"] <= stage["above_1"]
