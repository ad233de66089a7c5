"""`trainer.export --format timm` writes weights that plain timm loads exactly; the default student format
loads with model.create_student. Uses the committed 2-rank ZeRO-2 run (tests/fixtures/run_v0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import timm
import torch
from safetensors.torch import load_file

from model import create_student
from tests.fixtures.make_run_v0 import OUT as RUN
from trainer.config import load_config
from trainer.infra.checkpoint import consolidated_state_dict, resolve_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export(tmp_path, fmt: str) -> str:
    out = str(tmp_path / f"{fmt}.safetensors")
    done = subprocess.run([sys.executable, "-m", "trainer.export", "--checkpoint", RUN, "--out", out, "--format", fmt],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["out"] == out  # DeepSpeed prints above it
    return out


def test_timm_format_loads_into_plain_timm_with_equal_tensors(tmp_path):
    out = _export(tmp_path, "timm")
    cfg = load_config(os.path.join(RUN, "config.yaml"))
    m = cfg.model
    # num_classes in the overlay: timm drops a file's classifier when the model's class count differs from the
    # pretrained config's (1000 for ImageNet archs); with 1000 classes dict(file=out) alone is enough.
    vit = timm.create_model(m.arch, pretrained=True, pretrained_cfg_overlay=dict(file=out, num_classes=m.num_classes),
                            img_size=m.img_size, num_classes=m.num_classes, **m.kwargs)
    trained = consolidated_state_dict(resolve_checkpoint(RUN))
    own = vit.state_dict()
    assert set(own) == {k[len("vit."):] for k in trained if k.startswith("vit.")}
    for key, value in own.items():
        assert torch.equal(value, trained["vit." + key]), key
    assert not any(k.startswith("gates.") for k in load_file(out))


def test_student_format_loads_with_one_call(tmp_path):
    out = _export(tmp_path, "student")
    cfg = load_config(os.path.join(RUN, "config.yaml"))
    m, p = cfg.model, cfg.prune
    student = create_student(m.arch, gate=p.gate, keep_ratio=p.keep_ratio, img_size=m.img_size,
                             num_classes=m.num_classes, checkpoint=out, **m.kwargs)
    trained = consolidated_state_dict(resolve_checkpoint(RUN))
    for key, value in student.state_dict().items():
        assert torch.equal(value, trained[key]), key
