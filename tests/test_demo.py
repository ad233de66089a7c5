"""`make demo` end to end at a tiny size: every stage runs through its real launcher and CLI."""

from __future__ import annotations

import json
import os

import pytest

from trainer.demo.pipeline import run_demo
from trainer.demo.report import GOALS, STUDENTS

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
    for name in STUDENTS:
        assert summary["evaluate"][name]["student_gmacs"] < teacher_gmacs
        row = summary["measured"]["models"][name]
        assert row["cpu_img_s"] > 0 and 0 <= row["kept_token_precision"] <= 1
        assert 0 < row["random_precision"] < 1
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
