"""CPU smoke of benchmarks/gpu.sh, the script a lent GPU machine runs (tiny model, seconds per measurement).

The whole script runs once with a failure and a hang injected into two measurements: every measurement
must leave its JSON or an error record, and the ones after the failures must still run. A missing
package must stop it before any measurement, loudly. The wheel installer is checked on stub wheels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_SH = os.path.join(REPO, "benchmarks", "gpu.sh")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_tools  # noqa: E402
import install_wheels  # noqa: E402

# The order (1-6); shards is the loop's and the data bench's input.
ORDER = ["train_step_b4", "train_step_b8", "profile", "inference_dynamicvit", "inference_asvit", "shards",
         "loop_gated", "loop_dense", "data", "pytest_gpu"]
TINY = {
    "PY": sys.executable, "DEVICE": "cpu", "DTYPE": "bf16", "ARCH": "vit_tiny_patch16_224", "IMG": "32",
    "KWARGS": "{patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2}", "LOOP_SET": "prune.locations=[]",
    "TRAIN_BATCHES": "4 8", "INFER_BATCH": "8", "ITERS": "2", "WARMUP": "1", "INFER_ITERS": "2",
    "IMAGES": "48", "DATA_IMAGES": "16", "WORKERS": "1", "STEPS": "4", "LOG_EVERY": "2", "SKIP_WINDOWS": "1",
    "OMP_NUM_THREADS": "1",  # no OpenMP spin-waits fighting other processes for the 2 cores
    "BUDGET": "400",  # generous: a loaded 2-core machine must not turn measurements into skips
    "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".venv", "torch_extensions"),  # DeepSpeed's built CPU ops
}


def _run(out: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", GPU_SH, out], env={**os.environ, **TINY, **env}, capture_output=True, text=True,
                          timeout=280, cwd=REPO)


@pytest.mark.slow
def test_gpu_sh_cpu_smoke_keeps_going_past_failures(tmp_path) -> None:
    out = str(tmp_path / "out")
    start = time.time()
    # train_step_b8 fails at once; inference_asvit hangs past its 1 s timeout; everything else runs for real.
    done = _run(out, INJECT="train_step_b8:fail inference_asvit:hang", T_inference_asvit="1")
    seconds = time.time() - start
    log = done.stdout + done.stderr
    assert done.returncode == 1, log  # some error records, no install failure
    started = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("== ") and "(timeout" in line]
    assert started == ORDER, log
    records = {name: json.load(open(os.path.join(out, f"{name}.json"))) for name in ORDER}
    for name, rec in records.items():
        assert rec["name"] == name and rec["date"] and rec["device"] and rec["versions"]["torch"], rec
    failed = records["train_step_b8"]
    assert failed["rc"] == 3 and "injected failure" in failed["log_tail"] and "exited with rc 3" in failed["error"]
    hung = records["inference_asvit"]
    assert hung["rc"] == 124 and "timed out after 1 s" in hung["error"]
    ok = [name for name in ORDER if name not in ("train_step_b8", "inference_asvit")]
    for name in ok:
        assert "error" not in records[name], (name, records[name].get("error"), records[name].get("log_tail"))
    assert records["train_step_b4"]["overhead"] > 0
    assert records["profile"]["attention"] and "peak_memory" in records["profile"]
    assert records["loop_gated"]["img_per_s"] > 0 and records["loop_dense"]["overrides"]["prune.gate"] == "none"
    assert records["pytest_gpu"]["rc"] == 0 and records["pytest_gpu"]["tests"] >= 1  # skipped without CUDA
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["errors"]) == {"train_step_b8", "inference_asvit"}
    assert "loop_gated_over_dense_step_time" in summary
    print(f"gpu.sh CPU smoke: {seconds:.0f} s")


def test_gpu_sh_install_failure_is_loud_and_stops(tmp_path) -> None:
    out = str(tmp_path / "out")
    done = _run(out, NEED="deepspeed no-such-package-xyz", WHEELS=str(tmp_path / "no-wheels"))
    assert done.returncode == 2
    assert "INSTALL FAILED" in done.stderr and "no-such-package-xyz" in done.stdout + done.stderr
    assert sorted(os.listdir(out)) == ["install.json", "install.log"]
    assert json.load(open(os.path.join(out, "install.json")))["rc"] == 1


def _stub_wheel(folder, name: str, version: str, requires: list[str]) -> None:
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(os.path.join(folder, f"{dist}-{version}-py3-none-any.whl"), "w") as z:
        z.writestr(f"{dist}/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def test_install_wheels_installs_only_what_is_missing(tmp_path, capsys) -> None:
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _stub_wheel(wheels, "zz-root", "1.0", ["zz-dep>=2", "pytest>=1", "zz-extra; extra == 'dev'",
                                           "zz-never; python_version < '3'"])
    _stub_wheel(wheels, "zz-dep", "2.1", [])
    _stub_wheel(wheels, "pytest", "0.1", [])  # installed here at a satisfying version: must stay unused
    target = tmp_path / "site"
    assert install_wheels.main(["--wheels", str(wheels), "--target", str(target), "zz-root"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(plan["install"]) == ["zz-dep", "zz-root"] and "pytest" in plan["installed"]
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["zz_dep", "zz_root"]
    # A requirement neither installed nor carried at a satisfying version: exit 1, named.
    _stub_wheel(wheels, "zz-other", "1.0", ["zz-dep>=3", "zz-absent"])
    assert install_wheels.main(["--wheels", str(wheels), "--target", str(target), "--dry-run", "zz-other"]) == 1
    err = capsys.readouterr().err
    assert "UNMET zz-absent" in err and "UNMET zz-dep: needs >=3" in err


def test_measured_peak_mfu_only_on_h200() -> None:
    rec = {"mfu": 0.4, "peak_tflops": 989.0}
    gpu_tools.add_measured_mfu(rec, "NVIDIA H200")
    assert rec["mfu_measured_peak"] == round(0.4 * 989 / 790, 4) and rec["measured_peak_tflops"] == 790.0
    other = {"mfu": 0.4, "peak_tflops": 312.0}
    gpu_tools.add_measured_mfu(other, "NVIDIA A100-SXM4-80GB")
    assert "mfu_measured_peak" not in other


def test_build_wheels_script_parses() -> None:
    subprocess.run(["bash", "-n", os.path.join(REPO, "benchmarks", "build_wheels.sh")], check=True)
