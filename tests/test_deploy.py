"""Deployment: ONNX and torch.export graphs of pruned students, verified in ONNX Runtime.

Students are trained here (one rank, real DeepSpeed) so their gates rank tokens decisively; the DeiT-S/224
check uses random weights. Every parity check first compares the kept token indices, on images whose
indices PyTorch keeps under a tiny input perturbation (no near-ties that float rounding could flip), then
the logits. The graph's attention shapes prove each stage really runs on fewer tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import create_student
from model.deploy import (
    StaticPrunedViT,
    deploy_keep_counts,
    expected_attention_tokens,
    export_onnx,
    load_program_metadata,
    onnx_attention_tokens,
    onnx_session,
)
from tests.helpers import make_shards
from tests.launch import REPO, run_training
from trainer.deploy import GraphOptions, data_images, export_graph, load_run_student
from trainer.infra.checkpoint import resolve_checkpoint
from trainer.infra.ema import read_ema_weights

if os.environ.get("CI") != "true":  # under CI a missing deploy extra fails the tests instead of skipping them
    pytest.importorskip("onnxruntime", reason="the deploy extra (make test installs it)")

TOLERANCE = 1e-4  # max |logit diff|, fp32


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """A tiny DynamicViT and a tiny AS-ViT student, each trained 40 steps with an EMA of its weights."""
    root = tmp_path_factory.mktemp("deploy")
    make_shards(str(root), [8] * 8, num_classes=4)
    make_shards(str(root), [8, 8], num_classes=4, prefix="val")
    out = {}
    for gate in ("dynamicvit", "asvit"):
        run_dir = str(root / gate)
        run_training("python", 1, [f"data.train={root}/train-*.tar", f"data.val={root}/val-*.tar",
                                   f"run.dir={run_dir}", f"prune.gate={gate}", "train.steps=40", "ckpt.every=40",
                                   "log.every=20", "log.eval_every=0", "ema.enabled=true", "ema.decay=0.9",
                                   "precision=fp32"])
        out[gate] = run_dir
    return out


def stable_images(graph: StaticPrunedViT, images: torch.Tensor, scale: float = 1e-4) -> torch.Tensor:
    """The images whose kept indices survive a small perturbation of the input: no near-tied scores."""
    with torch.no_grad():
        base = graph(images)[1:]
        keep = torch.ones(images.shape[0], dtype=torch.bool)
        for seed in (1, 2):
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * scale
            for a, b in zip(base, graph(images + noise)[1:], strict=True):
                keep &= (a == b).all(dim=1)
    assert keep.sum() >= 2, "too few tie-free images to compare"
    return images[keep]


def assert_onnx_matches(student, counts: list[int], images: torch.Tensor, tmp_path, shipped: str | None = None):
    """Same kept indices at every stage, then logits within TOLERANCE, at batch 1 and batch N."""
    graph = StaticPrunedViT(student, counts, with_indices=True).eval()
    images = stable_images(graph, images)
    indexed = str(tmp_path / "with_indices.onnx")
    export_onnx(graph, images, indexed)
    with_indices = onnx_session(indexed)
    for batch in (images[:1], images):
        with torch.no_grad():
            expected = graph(batch)
        got = with_indices.run(None, {"images": batch.numpy()})
        assert len(got) == 1 + len(counts)
        for stage, (ours, theirs) in enumerate(zip(got[1:], expected[1:], strict=True)):
            assert ours.shape == (batch.shape[0], counts[stage])
            np.testing.assert_array_equal(ours, theirs.numpy(), err_msg=f"kept indices of stage {stage}")
        for path in filter(None, (indexed, shipped)):
            logits = onnx_session(path).run(None, {"images": batch.numpy()})[0]
            assert np.abs(logits - expected[0].numpy()).max() <= TOLERANCE, path
    return images


def test_dynamicvit_onnx_from_the_cli_keeps_the_same_tokens_and_logits(runs, tmp_path):
    out = str(tmp_path / "model.onnx")
    proc = subprocess.run([sys.executable, "-m", "trainer.export", "--checkpoint", runs["dynamicvit"], "--out", out,
                           "--format", "onnx"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    student, cfg = load_run_student(runs["dynamicvit"], GraphOptions())
    counts = student.eval_keep_counts(32)
    assert result["keep_counts"] == counts == [11, 7, 5]  # int(16 * 0.7^s), of the 16 patches at 32 px
    assert result["max_abs_diff"] <= TOLERANCE and result["gmacs"] < result["gmacs_dense"]

    # The graph runs each stage on the kept tokens only (a masked dense graph would also match the logits).
    tokens = onnx_attention_tokens(out)
    assert tokens == expected_attention_tokens(student, 32, counts) == [17, 12, 8, 6]  # CLS + kept, per block

    images = data_images(cfg, student, None, 16)
    assert_onnx_matches(student, counts, images, tmp_path, shipped=out)

    meta = {k: json.loads(v) for k, v in onnx_session(out).get_modelmeta().custom_metadata_map.items()}
    assert meta["input_size"] == [3, 32, 32] and meta["num_classes"] == 4 and meta["keep_counts"] == counts
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    # crop_pct: timm's config of the arch (data.crop_pct unset)
    assert meta["crop_pct"] == 0.9 and meta["interpolation"] == "bicubic" and meta["weights"] == "raw"


def test_asvit_onnx_keeps_the_counts_calibrated_on_the_val_images(runs, tmp_path):
    out = str(tmp_path / "asvit.onnx")
    result = export_graph(runs["asvit"], out, GraphOptions("onnx", calibration_images=16))
    student, cfg = load_run_student(runs["asvit"], GraphOptions())
    images = data_images(cfg, student, None, 16)
    # The thresholds' eval rule on the 16 val images as one batch: per stage, the mean count above the
    # threshold; calibrating 5 images at a time gives the same counts.
    with torch.no_grad():
        student.eval()(images)
    assert result["keep_counts"] == student.last_keep_counts == deploy_keep_counts(student, 32, images, chunk=5)
    assert result["keep_counts"][0] < 16  # the trained thresholds prune
    assert onnx_attention_tokens(out) == expected_attention_tokens(student, 32, result["keep_counts"])
    assert_onnx_matches(student, result["keep_counts"], images, tmp_path, shipped=out)


def test_torch_export_program_loads_back_with_the_same_logits_and_metadata(runs, tmp_path):
    out = str(tmp_path / "model.pt2")
    result = export_graph(runs["dynamicvit"], out, GraphOptions("torch-export"))
    assert result["max_abs_diff"] <= TOLERANCE
    program = torch.export.load(out).module()
    student, cfg = load_run_student(runs["dynamicvit"], GraphOptions())
    graph = StaticPrunedViT(student, result["keep_counts"])
    images = data_images(cfg, student, None, 16)
    with torch.no_grad():
        for batch in (images[:1], images):
            assert (program(batch) - graph(batch)).abs().max() <= 1e-5
    meta = {k: json.loads(v) for k, v in load_program_metadata(out).items()}
    assert meta["input_size"] == [3, 32, 32] and meta["keep_counts"] == result["keep_counts"]


def test_ema_export_runs_the_ema_weights(runs, tmp_path):
    out = str(tmp_path / "ema.onnx")
    result = export_graph(runs["dynamicvit"], out, GraphOptions("onnx", ema=True))
    assert result["weights"] == "ema"
    student, cfg = load_run_student(runs["dynamicvit"], GraphOptions())
    raw = {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(read_ema_weights(resolve_checkpoint(runs["dynamicvit"])))
    assert any(not torch.equal(raw[k], v) for k, v in student.state_dict().items())  # the EMA is not the raw model
    images = data_images(cfg, student, None, 16)
    assert_onnx_matches(student, result["keep_counts"], images, tmp_path, shipped=out)
    meta = onnx_session(out).get_modelmeta().custom_metadata_map
    assert json.loads(meta["weights"]) == "ema"


def test_deit_small_224_with_random_weights_matches_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    student = create_student("deit_small_patch16_224", gate="dynamicvit", keep_ratio=0.7).eval()
    # Random predictors (std 0.02) score every token almost alike; std 0.1 spreads the scores (top-k margins
    # >= 2e-4 on these images) so that the ranking, not float rounding, decides which tokens stay. Wider still
    # would saturate the keep log-probs at exactly 0: exact ties, which no input perturbation reveals.
    for module in student.gates.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.1)
    counts = deploy_keep_counts(student, 224)
    assert counts == [137, 96, 67]
    images = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert_onnx_matches(student, counts, images, tmp_path)
    tokens = onnx_attention_tokens(str(tmp_path / "with_indices.onnx"))
    assert tokens == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3


def test_bad_keep_counts_and_a_missing_extra_fail_with_what_to_do(runs, tmp_path):
    out = str(tmp_path / "x.onnx")
    args = [sys.executable, "-m", "trainer.export", "--checkpoint", runs["dynamicvit"], "--out", out,
            "--format", "onnx"]
    proc = subprocess.run([*args, "--keep-counts", "9,11,5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "keep counts [9, 11, 5]" in proc.stderr, proc.stderr[-2000:]
    # Without onnx installed (an import that fails, as in an environment without the extra).
    hide = "import sys; sys.modules['onnx'] = None; from trainer.export import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", hide, *args[3:]], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and 'pip install -e ".[deploy]"' in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(out)
