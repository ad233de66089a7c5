"""trainer.bench teacher-precision: the bf16 teacher's KD and token targets against the fp32 teacher's."""

import json
import os
import subprocess
import sys

import yaml

from tests.helpers import make_shards
from tests.launch import REPO, SMOKE


def test_bf16_teacher_targets_are_compared_with_fp32_on_training_batches(tmp_path):
    make_shards(str(tmp_path), [8] * 2, num_classes=4)
    with open(SMOKE) as f:
        cfg = yaml.safe_load(f)
    cfg["data"]["train"] = str(tmp_path / "train-*.tar")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "trainer.bench", "teacher-precision", "--config", str(config),
                           "--images", "16"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["images"] == 16
    # bf16 rounding moves the targets a little, never not at all (the comparison really ran in two dtypes).
    assert 0 < out["mean_kl_nats"] < 0.05 and 0 < out["token_relative_mse"] < 0.05
    assert out["bf16_ok"] == (out["mean_kl_nats"] < 1e-3 and out["token_relative_mse"] < 1e-3)
