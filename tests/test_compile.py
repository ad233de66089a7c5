"""train.compile: the student's and teacher's blocks under torch.compile train like eager (CPU, inductor)."""

import math

import pytest

from tests.helpers import make_shards
from tests.launch import run_training, train_records

pytestmark = [pytest.mark.slow]


def test_compiled_student_and_teacher_match_eager_losses(tmp_path):
    make_shards(str(tmp_path / "shards"), [8] * 4, num_classes=4)
    losses = {}
    for compiled in (False, True):
        run_dir = str(tmp_path / f"compile_{compiled}")
        run_training("python", 1, [f"data.train={tmp_path}/shards/train-*.tar", "data.val=", f"run.dir={run_dir}",
                                   "log.every=1", "train.steps=3", "precision=fp32", f"train.compile={compiled}",
                                   "optim.backbone_lr_scale=1.0"], timeout=600)
        losses[compiled] = [train_records(run_dir)[s] for s in (1, 2, 3)]
    for eager, comp in zip(losses[False], losses[True], strict=True):
        for term in ("loss", "ce", "kd", "tok", "ratio"):
            assert math.isclose(comp[term], eager[term], rel_tol=1e-4, abs_tol=1e-6), (eager["step"], term)
