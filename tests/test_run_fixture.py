"""A run directory written before the trainer restructure (tests/fixtures/run_v0) still resumes, exactly.

The fixture is a 2-rank DeepSpeed ZeRO-2 smoke run killed after step 2 of 4 (made by
tests/fixtures/make_run_v0.py); its `expected.json` holds the losses of steps 3 and 4 from an
uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from tests.fixtures.make_run_v0 import OUT as FIXTURE
from tests.fixtures.make_run_v0 import overrides
from tests.helpers import make_shards
from tests.launch import run_training, train_records

pytestmark = [pytest.mark.dist]


def test_a_run_dir_from_before_the_restructure_resumes_with_the_same_losses(tmp_path):
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)
    make_shards(str(tmp_path / "shards"), expected["shards"], num_classes=4)
    shards = str(tmp_path / "shards" / "train-{000000..000003}.tar")
    run_dir = str(tmp_path / "run")
    shutil.copytree(FIXTURE, run_dir)

    done = run_training("torchrun", 2, overrides(shards, run_dir))

    assert "resumed from" in done.stdout and "step_00000002 at step 2" in done.stdout, done.stdout[-2000:]
    records = train_records(run_dir)
    for step, terms in expected["steps"].items():
        for name, value in terms.items():
            got = records[int(step)][name]
            assert math.isclose(got, value, rel_tol=1e-5), f"step {step} {name}: {got} vs {value} before"
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step_00000004", "COMPLETE"))
