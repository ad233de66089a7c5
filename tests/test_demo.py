"""`make demo` end to end at a tiny size: every stage runs through its real launcher and CLI."""

from __future__ import annotations

import json
import math
import os

import pytest

from trainer.demo.pipeline import run_demo
from trainer.demo.report import GOALS, STUDENTS, paired_difference
from trainer.demo.sweep import run_sweep

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_demo_trains_teacher_and_students_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "demo")
    summary = run_demo(out, procs=2, train_per_class=16, val_per_class=4, teacher_epochs=1, student_epochs=1,
                       asvit_epochs=1)

    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["goals"].keys() == GOALS.keys()
    # The evaluate CLI saw all 40 val images for each model; the students pruned, the teacher did not.
    for name in ("teacher", *STUDENTS):
        ev = summary["evaluate"][name]
        assert ev["count"] == 40 and 0 <= ev["student_top1"] <= 100
        assert os.listdir(os.path.join(out, name, "tb")), f"{name}: no TensorBoard events"
    teacher_gmacs = summary["evaluate"]["teacher"]["student_gmacs"]
    # DynamicViT's counts are fixed; AS-ViT starts from the official threshold inits (no calibration) and
    # after a few tiny steps may still keep nearly everything (its gates then cost a little extra).
    assert summary["evaluate"]["dynamicvit"]["student_gmacs"] < teacher_gmacs
    for name in STUDENTS:
        assert 0 < summary["evaluate"][name]["student_gmacs"] < 1.01 * teacher_gmacs
        row = summary["measured"]["models"][name]
        assert row["cpu_img_s"] > 0 and 0 <= row["kept_token_precision"] <= 1
        assert 0 < row["random_precision"] < 1
        # The paired comparison ran on the same 40 images the evaluate CLI scored (AS-ViT's batch-mean keep
        # count depends on how the images are batched, so only DynamicViT's top-1 must agree exactly).
        paired = row["paired"]
        assert paired["images"] == 40
        expected = summary["evaluate"][name]["student_top1"] - summary["evaluate"]["teacher"]["student_top1"]
        if name == "dynamicvit":
            assert abs(paired["top1_diff"] - expected) < 1e-6
    # The students started from the exported teacher (a real file the launch.sh runs were given).
    assert os.path.getsize(os.path.join(out, "teacher.safetensors")) > 0

    report = open(os.path.join(out, "report.md")).read()
    for name in ("teacher", *STUDENTS):
        assert f"| {name} |" in report
    for goal in GOALS:
        assert goal in report
    measured = summary["measured"]
    for png in (measured["curves_png"], *(measured["models"][s]["overlay_png"] for s in STUDENTS)):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert "What pruning cost" in report and "95% interval" in report
    # Deployed: both ONNX files written by the export CLI, checked against PyTorch, timed in ONNX Runtime.
    ort = measured["onnxruntime"]["models"]
    assert ort.keys() == {"teacher", "dynamicvit"} and ort["teacher"]["keep_counts"] == []
    for name, row in ort.items():
        assert os.path.getsize(os.path.join(out, row["file"])) > 0 and row["img_s"] > 0
        assert math.isfinite(row["max_abs_diff"])
        assert f"| {name} | {row['file']} |" in report
    # The dense graph has no ranking to flip; the barely trained tiny student may have near-tied scores (its
    # strict parity is tests/test_deploy.py's job, on tie-free inputs).
    assert ort["teacher"]["max_abs_diff"] <= 1e-4
    assert "## Deployed: ONNX Runtime" in report
    # Evaluated periodically: the students' eval curves have a point before the end.
    with open(os.path.join(out, "dynamicvit", "metrics.jsonl")) as f:
        assert sum('"kind": "eval"' in line for line in f) >= 1

    # make demo-sweep, on the same folder (reuses its data and teacher): one ratio per gate.
    sweep = run_sweep(out, ratios=[0.7], epochs=1)
    assert [(p["gate"], p["ratio"]) for p in sweep["points"]] == [("dynamicvit", 0.7), ("asvit", 0.7)]
    assert sweep["points"][0]["mmacs"] < sweep["teacher"]["mmacs"]  # DynamicViT (AS-ViT: see above)
    with open(os.path.join(out, "sweep", "sweep.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_paired_difference_interval_by_hand():
    import numpy as np

    teacher = np.array([1, 1, 1, 1, 0, 0, 1, 1], dtype=float)
    student = np.array([1, 1, 0, 1, 0, 1, 1, 0], dtype=float)
    # differences 0 0 -1 0 0 1 0 -1: mean -1/8, sd (ddof 1) sqrt((3 * (7/8)^2 ... )) computed by numpy below
    diff = student - teacher
    out = paired_difference(student, teacher)
    assert out["top1_diff"] == pytest.approx(-12.5)
    assert out["top1_diff_ci95"] == pytest.approx(100 * 1.96 * diff.std(ddof=1) / np.sqrt(8))
    assert (out["student_only_right"], out["teacher_only_right"]) == (1, 2)
