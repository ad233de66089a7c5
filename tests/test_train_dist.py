"""Real multi-process training on CPU (gloo): DeepSpeed ZeRO-1/2/3, Accelerate, torchrun, two nodes."""

import math
import os
import shutil

import pytest

from tests.helpers import make_shards
from tests.launch import read_keys, run_training, train_records, trainer_states

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_shards(str(root), [8] * 8, num_classes=4)
    make_shards(str(root), [6, 5], num_classes=4, prefix="val")
    return {"train": str(root / "train-*.tar"), "val": str(root / "val-*.tar")}


def _common(shards, run_dir, *extra):
    return [f"data.train={shards['train']}", f"data.val={shards['val']}", f"run.dir={run_dir}",
            "log.every=1", "ckpt.every=2", "train.steps=4", *extra]


def test_launch_sh_two_ranks_equal_one_rank_with_the_same_global_batch(shards, tmp_path):
    """2 ranks x batch 4 (launch.sh -> DeepSpeed launcher, ZeRO-2) == 1 rank x batch 4 x 2 accumulation."""
    extra = ["precision=fp32", "backend.ds_config=ds_configs/zero2.json"]
    two = str(tmp_path / "two")
    run_training("launch.sh", 2, _common(shards, two, "data.workers=1", *extra))
    one = str(tmp_path / "one")
    run_training("python", 1, _common(shards, one, "data.workers=2", "optim.accum_steps=2", *extra))
    a, b = train_records(two), train_records(one)
    for step in (1, 2, 3, 4):
        for term in ("loss", "ce", "kd", "tok", "ratio"):
            assert math.isclose(a[step][term], b[step][term], rel_tol=2e-4, abs_tol=1e-6), (step, term)
    states = trainer_states(os.path.join(two, "checkpoints", "step_00000004"))
    assert [s["rank"] for s in states] == [0, 1]
    assert states[0]["param_checksum"] == states[1]["param_checksum"]
    _assert_tensorboard_views(os.path.join(two, "tb"))


def _assert_tensorboard_views(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    expected = ["train/loss", "train/ce", "train/kd", "train/tok", "train/ratio", "train/grad_norm",
                "train/lr/gate_decay", "train/lr/backbone_decay", "train/keep_ratio/stage0", "train/gmacs",
                "train/img_per_s", "train/data_wait_fraction", "train/data/skipped_bad_image", "train/bad_steps",
                "eval/student_top1", "eval/student_top5", "eval/teacher_top1", "eval/keep_ratio/stage2",
                "eval/student_gmacs", "eval/student_img_s"]
    missing = [t for t in expected if t not in tags["scalars"]]
    assert not missing, f"missing TensorBoard scalars {missing}; have {tags['scalars']}"
    assert "eval/kept_tokens" in tags["images"]
    assert any(t.startswith("config") for t in tags["tensors"]), tags["tensors"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3", "accelerate"])
def test_two_ranks_train_and_resume_gives_identical_next_steps(shards, tmp_path, backend):
    """Train 4 steps, drop the last checkpoint, resume from step 2: steps 3-4 repeat exactly."""
    if backend == "accelerate":
        launcher, extra = "accelerate", ["backend.name=accelerate", "precision=bf16"]
    else:
        launcher, extra = "torchrun", [f"backend.ds_config=ds_configs/{backend}.json", "precision=bf16"]
    run_dir = str(tmp_path / "run")
    run_training(launcher, 2, _common(shards, run_dir, *extra))
    first = train_records(run_dir)
    assert all(math.isfinite(first[s]["loss"]) for s in (1, 2, 3, 4))
    states = trainer_states(os.path.join(run_dir, "checkpoints", "step_00000004"))
    assert len(states) == 2
    if backend != "zero3":  # ZeRO-3 ranks hold different shards by design
        assert states[0]["param_checksum"] == states[1]["param_checksum"]

    shutil.rmtree(os.path.join(run_dir, "checkpoints", "step_00000004"))
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    run_training(launcher, 2, _common(shards, run_dir, *extra))
    resumed = train_records(run_dir)
    assert sorted(resumed) == [3, 4], "did not resume from step 2"
    for step in (3, 4):
        for term in ("loss", "ce", "kd", "tok", "ratio", "grad_norm"):
            assert resumed[step][term] == first[step][term], (step, term)
    _check_export_and_evaluate(run_dir, tmp_path, states[0]["param_checksum"] if backend != "zero3" else None)


def _check_export_and_evaluate(run_dir, tmp_path, bf16_checksum):
    """export -> create_student(checkpoint=...) round trip, the dense part into plain timm, evaluate CLI."""
    import json
    import subprocess
    import sys

    import timm
    import torch
    from safetensors.torch import load_file

    from model import create_student
    from tests.launch import REPO

    out = str(tmp_path / "student.safetensors")
    subprocess.run([sys.executable, "-m", "trainer.export", "--checkpoint", run_dir, "--out", out], cwd=REPO,
                   check=True, capture_output=True)
    exported = load_file(out)
    assert all(v.dtype == torch.float32 for v in exported.values())
    tiny = dict(img_size=32, num_classes=4, patch_size=8, depth=4, embed_dim=32, num_heads=2)
    student = create_student("vit_tiny_patch16_224", checkpoint=out, **tiny)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in exported.items())
    plain = timm.create_model("vit_tiny_patch16_224", **tiny)
    plain.load_state_dict({k[len("vit."):]: v for k, v in exported.items() if k.startswith("vit.")})
    if bf16_checksum is not None:  # fp32 master weights round to the bf16 ones the ranks hold
        total = float(sum(v.double().abs().sum() for v in exported.values()))
        assert abs(total - bf16_checksum) < 1e-2 * bf16_checksum
    proc = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--checkpoint", out, "--config",
                           os.path.join(run_dir, "config.yaml"), "--batch-size", "4"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] == 11 and 0 <= result["student_top1"] <= 100
    assert result["student_gmacs"] < result["dense_gmacs"]
    assert set(result) >= {"keep_ratio/stage0", "dense_img_s", "pruned_img_s", "student_top5"}


def test_two_simulated_nodes_get_right_ranks_and_disjoint_shards(shards, tmp_path):
    """Two torchrun launches (--nnodes 2, one rank each) on this machine form one 2-rank job."""
    import subprocess
    import sys

    from tests.launch import REPO, SMOKE, free_port

    run_dir = str(tmp_path / "nodes")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "trainer.train", "--config", SMOKE]
        for o in _common(shards, run_dir, "data.log_keys=true"):
            cmd += ["--set", o]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    states = trainer_states(os.path.join(run_dir, "checkpoints", "step_00000004"))
    assert [(s["rank"], s["local_rank"], s["node_rank"], s["world_size"]) for s in states] == [
        (0, 0, 0, 2), (1, 0, 1, 2)]
    shards_read = []
    for rank in (0, 1):
        shards_read.append({k.split("_")[0] for _, k in read_keys(run_dir, rank)})
    assert shards_read[0] and shards_read[1] and not shards_read[0] & shards_read[1]


def test_zero3_trains_exactly_like_zero2_in_fp32(shards, tmp_path):
    """ZeRO-3 partitions parameters the student uses outside timm's forward (cls/pos tokens) too."""
    losses = {}
    for stage in ("zero2", "zero3"):
        run_dir = str(tmp_path / stage)
        run_training("python", 1, _common(shards, run_dir, f"backend.ds_config=ds_configs/{stage}.json",
                                          "precision=fp32", "optim.backbone_lr_scale=1.0", "data.val="))
        losses[stage] = [train_records(run_dir)[s]["loss"] for s in (1, 2, 3, 4)]
    assert losses["zero2"] == losses["zero3"]


def test_asvit_student_trains_with_thresholds_calibrated_to_the_budget(shards, tmp_path):
    import json

    run_dir = str(tmp_path / "asvit")
    proc = run_training("python", 1, _common(shards, run_dir, "prune.gate=asvit", "prune.w_tok=0"))
    assert "AS-ViT thresholds calibrated to flops_budget=0.65" in proc.stdout
    records = train_records(run_dir)
    assert all(math.isfinite(records[s]["flops"]) for s in (1, 2, 3, 4)) and "ratio" not in records[1]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["student_gmacs"] < 0.9 * summary["dense_gmacs"]
