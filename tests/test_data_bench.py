"""data.bench: the ours-vs-timm loader benchmark runs end to end and prints one complete JSON line."""

import io
import json

import pytest
from PIL import Image

from data.bench import main, run_data_bench, synthetic_jpeg

RATES = ("ours_img_s", "ours_img_s_per_worker", "timm_img_s", "timm_img_s_per_worker", "ratio",
         "ours_img_per_cpu_s", "timm_img_per_cpu_s", "ratio_cpu")


def test_synthetic_jpeg_is_deterministic_imagenet_sized_and_not_noise():
    data = synthetic_jpeg(3)
    assert data == synthetic_jpeg(3) and data != synthetic_jpeg(4)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and max(img.size) == 500
    # Real photos are ~100 KB at this size; pure noise would be ~300 KB, flat colour ~10 KB.
    assert 40_000 < len(data) < 200_000


def test_bench_cli_prints_one_json_line_with_positive_rates(capsys):
    result = main(["--num-images", "24", "--img-size", "32", "--workers", "1", "--batch-size", "4",
                   "--rounds", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == result
    for field in RATES:
        assert result[field] > 0, field
    assert (result["img_size"], result["workers"], result["batch_size"]) == (32, 1, 4)
    assert result["images"] > 0 and result["source"] == "synthetic" and result["source_images"] == 24
    assert len(result["ours_rounds_img_s"]) == len(result["timm_rounds_img_s"]) == 2
    for field in ("cpu_count", "torch", "timm", "webdataset", "date"):
        assert result[field], field


def test_bench_refuses_too_few_images_for_warmup_plus_timing():
    with pytest.raises(ValueError, match="raise --num-images"):
        run_data_bench(None, img_size=32, workers=1, batch_size=4, num_images=8, warmup=2, rounds=1)


