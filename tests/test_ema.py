"""Model EMA: fp32 over the master weights, sharded like ZeRO, resumed bitwise, evaluated and exported."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import make_shards
from tests.launch import REPO, run_training, train_records
from trainer.infra.ema import MasterShard, WeightEMA, read_ema_weights


def _shards_of(module: torch.nn.Module):
    return lambda: [MasterShard(n, p.detach(), 0, tuple(p.shape), p.requires_grad, replicated=True)
                    for n, p in module.named_parameters()]


def _shapes(module):
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def test_update_is_timm_formula_and_moves_where_a_bf16_average_cannot():
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 4)
    ema = WeightEMA(_shards_of(net), _shapes(net), decay=0.99996)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1e-3)
    ema.update()
    for (name, p), avg in zip(net.named_parameters(), ema.average, strict=True):
        expected = 0.99996 * start[name] + (1 - 0.99996) * p.detach()
        assert torch.allclose(avg, expected, rtol=0, atol=1e-7)
        assert avg.dtype == torch.float32 and not torch.equal(avg, start[name])
        # The same step on a bf16 average: 4e-8 is far below bf16's resolution, nothing moves.
        bf16 = start[name].bfloat16()
        assert torch.equal(bf16.lerp(p.detach().bfloat16(), 1 - 0.99996), bf16)


def test_frozen_parameters_are_kept_not_averaged_and_full_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    net[1].weight.requires_grad_(False)
    ema = WeightEMA(_shards_of(net), _shapes(net), decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()
    full = ema.full_state_dict(torch.device("cpu"))
    assert torch.equal(full["1.weight"], net[1].weight.detach() - 1.0)  # frozen: its value at the start
    assert torch.allclose(full["0.weight"], net[0].weight.detach() - 0.5)
    ema.save(str(tmp_path))
    assert all(torch.equal(read_ema_weights(str(tmp_path))[k], v) for k, v in full.items())
    again = WeightEMA(_shards_of(net), _shapes(net), decay=0.5)
    again.load(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(again.average, ema.average, strict=True)) and again.updates == 1


def test_zero3_is_refused_at_config_time_naming_the_key():
    from trainer.config import ConfigError, load_config, validate

    cfg = load_config(os.path.join(REPO, "trainer", "configs", "smoke.yaml"),
                      ["ema.enabled=true", "backend.ds_config=ds_configs/zero3.json"])
    with pytest.raises(ConfigError, match=r"ema.enabled=True: not supported with ZeRO-3"):
        validate(cfg, world_size=2, check_paths=False, check_model=False)
    cfg = load_config(os.path.join(REPO, "trainer", "configs", "smoke.yaml"), ["ema.decay=1.0"])
    with pytest.raises(ConfigError, match="ema.decay"):
        validate(cfg, world_size=2, check_paths=False, check_model=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_shards(str(root), [8] * 8, num_classes=4)
    make_shards(str(root), [6, 5], num_classes=4, prefix="val")
    return {"train": str(root / "train-*.tar"), "val": str(root / "val-*.tar")}


def _overrides(shards, run_dir, *extra):
    return [f"data.train={shards['train']}", f"data.val={shards['val']}", f"run.dir={run_dir}", "log.every=1",
            "ckpt.every=1", "ckpt.keep=5", "train.steps=4", "optim.backbone_lr_scale=1.0", "ema.enabled=true",
            *extra]


def _step_dir(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def _ema_files(checkpoint):
    from safetensors.torch import load_file

    return {n: load_file(os.path.join(checkpoint, n)) for n in sorted(os.listdir(checkpoint)) if n.startswith("ema_")}


@pytest.mark.dist
@pytest.mark.slow
def test_bf16_zero2_ema_follows_fp32_masters_resumes_bitwise_and_exports(shards, tmp_path):
    """2 ranks, DeepSpeed bf16 ZeRO-2: each rank averages its half of the fp32 masters."""
    from trainer.infra.checkpoint import consolidated_state_dict

    decay = 0.99996
    run_dir = str(tmp_path / "run")
    extra = ["precision=bf16", "backend.ds_config=ds_configs/zero2.json", f"ema.decay={decay}"]
    run_training("torchrun", 2, _overrides(shards, run_dir, *extra))
    emas = {s: read_ema_weights(_step_dir(run_dir, s)) for s in (2, 3, 4)}
    assert len(_ema_files(_step_dir(run_dir, 4))) == 2  # one shard per rank

    # It tracks the fp32 masters: EMA_s = d EMA_(s-1) + (1 - d) W_s, W from DeepSpeed's zero_to_fp32.
    masters = {s: consolidated_state_dict(_step_dir(run_dir, s)) for s in (3, 4)}
    for step in (3, 4):
        for name, value in emas[step].items():
            expected = decay * emas[step - 1][name] + (1 - decay) * masters[step][name]
            assert torch.allclose(value, expected, rtol=0, atol=1e-6), name
    # It moves; the same two updates applied to a bf16 average leave nearly every weight where it was.
    weights = [n for n in emas[4] if n.endswith(".weight") and emas[4][n].ndim == 2]
    moved = bf16_moved = total = 0
    for name in weights:
        bf16 = emas[2][name].bfloat16()
        for step in (3, 4):
            bf16 = bf16.lerp(masters[step][name].bfloat16(), 1 - decay)
        moved += int((emas[4][name] != emas[2][name]).sum())
        bf16_moved += int((bf16 != emas[2][name].bfloat16()).sum())
        total += emas[4][name].numel()
    assert moved > 0.9 * total and bf16_moved < 0.01 * total, (moved, bf16_moved, total)

    # Evaluated beside the raw model.
    final = train_records(run_dir, kind="eval")[4]
    assert 0 <= final["ema_top1"] <= 100 and "ema_gmacs" in final and "ema_keep_ratio/stage0" in final

    # Resumed bitwise: drop step 4, resume from 3.
    first = _ema_files(_step_dir(run_dir, 4))
    shutil.rmtree(_step_dir(run_dir, 4))
    run_training("torchrun", 2, _overrides(shards, run_dir, *extra))
    again = _ema_files(_step_dir(run_dir, 4))
    assert first.keys() == again.keys()
    for name in first:
        assert all(torch.equal(first[name][k], again[name][k]) for k in first[name]), name

    # Exported with --ema: the assembled fp32 averages, loadable as a student.
    out = str(tmp_path / "ema.safetensors")
    subprocess.run([sys.executable, "-m", "trainer.export", "--checkpoint", run_dir, "--out", out, "--ema"],
                   cwd=REPO, check=True, capture_output=True)
    from safetensors.torch import load_file

    exported = load_file(out)
    assert exported.keys() == emas[4].keys()
    assert all(torch.equal(exported[k], read_ema_weights(_step_dir(run_dir, 4))[k]) for k in exported)


@pytest.mark.dist
@pytest.mark.slow
def test_accelerate_ema_averages_the_fp32_parameters(shards, tmp_path):
    run_dir = str(tmp_path / "acc")
    run_training("accelerate", 2, _overrides(shards, run_dir, "backend.name=accelerate", "precision=bf16",
                                             "ema.decay=0.5", "data.val="))
    from trainer.infra.checkpoint import consolidated_state_dict

    ema3, ema4 = (read_ema_weights(_step_dir(run_dir, s)) for s in (3, 4))
    masters = consolidated_state_dict(_step_dir(run_dir, 4))
    assert all(torch.allclose(ema4[n], 0.5 * ema3[n] + 0.5 * masters[n], rtol=0, atol=1e-6) for n in ema4)
    assert math.isfinite(train_records(run_dir)[4]["loss"])
