"""Demo analysis: kept-token precision is measured against the real object boxes of the demo shards."""

import pytest

from data.demo import build_demo
from model import create_student
from trainer.demo.report import kept_token_precision, overlay_png


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return build_demo(str(out), train_per_class=2, val_per_class=2, workers=1)["shards"]


def test_kept_token_precision_is_a_fraction_with_the_box_coverage_as_random_baseline(demo_shards, tmp_path):
    student = create_student("vit_tiny_patch16_224", img_size=64, num_classes=10, patch_size=8, depth=4,
                             embed_dim=32, num_heads=2)
    result = kept_token_precision(student, demo_shards, num_classes=10, batch_size=8)
    assert 0 <= result["kept_token_precision"] <= 1
    assert 0.05 < result["random_precision"] < 0.5  # the digit covers a minority of the patches
    overlay_png(student, demo_shards, 10, str(tmp_path / "overlay.png"), count=3)
    assert (tmp_path / "overlay.png").stat().st_size > 0
