"""The Python half of benchmarks/gpu.sh: environment record, result records, the measurements that are
more than one CLI call, and the closing summary. Standard library only at import time.

    python benchmarks/gpu_tools.py env OUT_DIR                      # OUT_DIR/env.json
    python benchmarks/gpu_tools.py record NAME LOG RC SECONDS TIMEOUT OUT_DIR
    python benchmarks/gpu_tools.py shards --images N --workers W --out DIR       # synthetic JPEGs + shards
    python benchmarks/gpu_tools.py loop --gate G --data SHARDS --run-dir DIR ... # the real training loop
    python benchmarks/gpu_tools.py pytest --junit FILE -- PYTEST_ARGS...         # pytest, JSON + its exit code
    python benchmarks/gpu_tools.py summary OUT_DIR                  # table of the goal numbers, summary.json

`record` turns one measurement's log into OUT_DIR/NAME.json: the last JSON object line of the log when
the command exited 0, else an error record {"name", "error", "rc", "log_tail", ...} (keeping that JSON, if
any, as "partial"). Every record carries the run's date, device and versions from env.json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bf16 dense matrix rate measured on the lent H200 (device tool's KINDS.md: 8192^3 bf16 matmul through
# PyTorch, 769-798 TFLOP/s on random data): a second, achievable MFU denominator beside the datasheet's 989.
MEASURED_MATMUL_TFLOPS = {"H200": 790.0}
VERSIONS = ("torch", "timm", "deepspeed", "webdataset", "accelerate", "numpy", "pydantic", "pytest", "triton")
ERROR_RECORD = 10  # `record`'s exit code when it wrote an error record
TIMEOUT_RCS = (124, 137)  # GNU timeout: TERM sent (124), or KILL after the grace period (137)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git() -> str | None:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cmd_env(args: argparse.Namespace) -> int:
    """OUT/env.json: date, device, versions, commit, machine; printed too."""
    import torch  # noqa: PLC0415 (only here: the other subcommands stay light)

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "date": _now(),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cpus": os.cpu_count(),
        "host": socket.gethostname(),
        "commit": _git(),
        "versions": {"python": platform.python_version(), **{n: _version(n) for n in VERSIONS},
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None},
    }
    if cuda:
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True)
            env["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    knobs = os.environ.get("GPU_SH_KNOBS")
    if knobs:
        env["knobs"] = dict(kv.split("=", 1) for kv in knobs.split("\n") if "=" in kv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    print(json.dumps(env))
    return 0


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _device_key(name: str) -> str | None:
    return next((key for key in MEASURED_MATMUL_TFLOPS if key in name), None)


def add_measured_mfu(result: dict, device: str) -> None:
    """mfu_measured_peak beside each `mfu` whose `peak_tflops` is known, on a device with a measured rate."""
    key = _device_key(device)
    if key is None:
        return
    measured = MEASURED_MATMUL_TFLOPS[key]
    if "mfu" in result and "peak_tflops" in result:
        result["measured_peak_tflops"] = measured
        result["mfu_measured_peak"] = round(result["mfu"] * result["peak_tflops"] / measured, 4)


def cmd_record(args: argparse.Namespace) -> int:
    """NAME.json from a finished measurement: its JSON, or an error record. Prints one status line."""
    try:
        with open(args.log, errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    try:
        with open(os.path.join(args.out, "env.json")) as f:
            env = json.load(f)
    except (OSError, ValueError):
        env = {}
    meta = {"name": args.name, "date": env.get("date", _now()), "device": env.get("device"),
            "versions": env.get("versions"), "commit": env.get("commit"), "seconds": round(args.seconds, 1),
            "timeout_s": args.timeout}
    found = _last_json(text)
    tail = text[-3000:]
    if args.rc == 0 and found is not None:
        record = {**meta, **found, "name": args.name}
        for key in ("date", "versions", "commit"):
            record[key] = meta[key]
        record.setdefault("device", meta["device"])
        add_measured_mfu(record, str(meta["device"]))
        status = "ok"
    else:
        if args.rc in TIMEOUT_RCS:
            error = f"timed out after {args.timeout} s (rc {args.rc})"
        elif args.rc == 0:
            error = "exited 0 but printed no JSON object line"
        elif args.rc < 0:
            error = args.skip_reason or "not run"
        else:
            error = f"exited with rc {args.rc}"
        record = {**meta, "error": error, "rc": args.rc, "log_tail": tail}
        if found is not None:
            record["partial"] = found
        status = f"ERROR: {error}"
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"[{args.name}] {status} ({args.seconds:.0f} s of {args.timeout} s)", flush=True)
    return 0 if status == "ok" else ERROR_RECORD


def cmd_shards(args: argparse.Namespace) -> int:
    """Synthetic ImageNet-like JPEGs (data.bench.synthetic_jpeg, in parallel) and their shards."""
    from multiprocessing import Pool  # noqa: PLC0415

    sys.path.insert(0, REPO)
    from data.bench import SYNTHETIC_CLASSES  # noqa: PLC0415

    start = time.time()
    jpeg, shards = os.path.join(args.out, "jpeg"), os.path.join(args.out, "shards")
    for k in range(SYNTHETIC_CLASSES):
        os.makedirs(os.path.join(jpeg, f"class_{k:02d}"), exist_ok=True)
    with Pool(args.workers) as pool:
        sizes = pool.map(_write_jpeg, [(jpeg, i) for i in range(args.images)], chunksize=16)
    generated = time.time() - start
    # At least two shards per loader worker (the stream plan needs one per worker; ImageNet has 1281).
    shard_size = max(1, -(-args.images // (2 * args.workers)))
    subprocess.run([sys.executable, "-m", "data.convert", jpeg, shards, "--workers", str(args.workers),
                    "--shard-size", str(shard_size)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    print(json.dumps({"bench": "shards", "images": args.images, "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1e3, 1),
                      "shard_size": shard_size, "shards": len(glob.glob(os.path.join(shards, "*.tar"))),
                      "generate_s": round(generated, 1), "total_s": round(time.time() - start, 1)}))
    return 0


def _write_jpeg(job: tuple[str, int]) -> int:
    from data.bench import SYNTHETIC_CLASSES, synthetic_jpeg  # noqa: PLC0415

    root, i = job
    data = synthetic_jpeg(i)
    with open(os.path.join(root, f"class_{i % SYNTHETIC_CLASSES:02d}", f"img_{i:06d}.jpg"), "wb") as f:
        f.write(data)
    return len(data)


def _sample_gpu_memory(stop: threading.Event, samples: list[int]) -> None:
    smi = shutil.which("nvidia-smi")
    while smi and not stop.wait(1.0):
        out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        try:
            samples.append(int(out.stdout.split()[0]))
        except (IndexError, ValueError):
            return


def cmd_loop(args: argparse.Namespace) -> int:
    """trainer.train (one rank), then img/s, data wait and MFU of its steady log windows."""
    sets = {
        "model.arch": args.arch, "model.img_size": args.img_size, "model.kwargs": args.kwargs,
        "model.checkpoint": "", "model.num_classes": 1000, "prune.gate": args.gate,
        "data.train": args.data, "data.val": "", "data.batch_size": args.batch_size, "data.workers": args.workers,
        "data.shuffle_buffer": 256, "train.steps": args.steps, "log.every": args.log_every,
        "log.tensorboard": "false", "log.progress": "lines", "ckpt.every": 0, "precision": args.dtype,
        # Time the recipe's main phase: its first 1/6 trains the gates alone (backbone frozen).
        "optim.backbone_frozen_fraction": 0.0, "run.dir": args.run_dir,
    }
    for extra in args.set:
        key, value = extra.split("=", 1)
        sets[key] = value
    # One process, no launcher (trainer.infra.dist describes a world of one): torchrun would start the rank
    # in a session of its own, out of reach of the `timeout` that bounds this measurement.
    cmd = [sys.executable, "-m", "trainer.train", "--config", args.config]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    print("$ " + " ".join(cmd), flush=True)
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=_sample_gpu_memory, args=(stop, samples), daemon=True)
    sampler.start()
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO)
    wall = time.time() - start
    stop.set()
    # The run's checkpoint (optimizer states of the student) is not needed: free the disk now.
    shutil.rmtree(os.path.join(args.run_dir, "checkpoints"), ignore_errors=True)
    if done.returncode != 0:
        print(f"trainer.train exited with {done.returncode}", file=sys.stderr)
        return done.returncode

    sys.path.insert(0, REPO)
    import torch  # noqa: PLC0415

    from model.bench import peak_tflops  # noqa: PLC0415
    from model.flops import count_flops  # noqa: PLC0415
    from model.student import create_student  # noqa: PLC0415
    from trainer.loop.metrics import read_metrics  # noqa: PLC0415

    windows = read_metrics(args.run_dir)
    steady = windows[args.skip_windows:] or windows[-1:]  # the first windows hold start-up and warm-up
    img_s = [w["img_per_s"] for w in steady]
    with open(os.path.join(args.run_dir, "summary.json")) as f:
        summary = json.load(f)
    kwargs = json.loads(json.dumps(_yaml(args.kwargs)))
    vit = create_student(args.arch, "none", img_size=args.img_size, **kwargs).vit
    size = vit.patch_embed.img_size
    # Model FLOPs per image as model.bench counts them: the student's fwd+bwd (3x forward; a gated student
    # masks tokens, it computes all of them) plus the teacher's forward, 2 FLOPs per MAC.
    tflop_per_img = 2 * count_flops(vit, size) * 4 / 1e3
    result: dict[str, Any] = {
        "bench": "train-loop", "gate": args.gate, "arch": args.arch, "batch_size": args.batch_size,
        "steps": args.steps, "windows": len(windows), "steady_windows": len(steady),
        "img_per_s": round(statistics.median(img_s), 2), "img_per_s_windows": [round(v, 1) for v in img_s],
        "data_wait_fraction": round(statistics.median(w["data_wait_fraction"] for w in steady), 4),
        "wall_s": round(wall, 1), "tflop_per_img": round(tflop_per_img, 5), "overrides": sets,
        "summary": {k: summary[k] for k in summary if not isinstance(summary[k], (dict, list))},
    }
    result["tflop_per_s"] = round(result["img_per_s"] * tflop_per_img, 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_tflops(device, args.dtype)
    if peak is not None:
        result["peak_tflops"] = peak
        result["mfu"] = round(result["tflop_per_s"] / peak, 4)
    if samples:
        result["gpu_memory_used_max_mib"] = max(samples)
    print(json.dumps(result), flush=True)
    return 0


def _yaml(text: str) -> Any:
    import yaml  # noqa: PLC0415

    return yaml.safe_load(text) or {}


def cmd_pytest(args: argparse.Namespace) -> int:
    """pytest with its exit code kept; a JSON line of the junit counts (and the failed tests) last."""
    cmd = [sys.executable, "-m", "pytest", "--junitxml", args.junit, *args.pytest_args]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    result: dict[str, Any] = {"bench": "pytest", "rc": rc, "args": args.pytest_args}
    try:
        suites = ET.parse(args.junit).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        for key in ("tests", "failures", "errors", "skipped"):
            result[key] = sum(int(s.get(key, 0)) for s in suites)
        cases = [case for s in suites for case in s.iter("testcase")]
        result["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in cases
                            if case.find("failure") is not None or case.find("error") is not None]
    except (OSError, ET.ParseError) as e:
        result["junit_error"] = str(e)
    print(json.dumps(result), flush=True)
    return rc


def _load(out: str, name: str) -> dict:
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"error": "no record"}


def cmd_summary(args: argparse.Namespace) -> int:
    """The goal numbers of every record, as a table (stdout) and OUT/summary.json."""
    env = _load(args.out, "env")
    rows: list[tuple[str, str]] = []
    summary: dict[str, Any] = {"date": env.get("date"), "device": env.get("device"), "versions": env.get("versions"),
                               "commit": env.get("commit"), "errors": {}}
    names = [os.path.basename(p)[:-5] for p in sorted(glob.glob(os.path.join(args.out, "*.json")))]
    names = [n for n in names if n not in ("env", "summary")]
    for name in names:
        rec = _load(args.out, name)
        if "error" in rec:
            summary["errors"][name] = rec["error"]
            rows.append((name, f"ERROR {rec['error']}"))
            continue
        bench = rec.get("bench")
        if bench == "train-step":
            keep = {k: rec.get(k) for k in ("overhead", "overhead_cpu_time", "reference_overhead", "step_img_s",
                                            "step_tflop_per_s", "mfu", "mfu_measured_peak", "attention_candidates")}
            rows.append((name, f"gated/dense step {rec.get('overhead')}x (goal <= 1.15); reference "
                               f"{rec.get('reference_overhead')}x; distill step {rec.get('step_img_s')} img/s, "
                               f"MFU {rec.get('mfu')} (989) / {rec.get('mfu_measured_peak')} (790)"))
        elif bench == "profile":
            kinds = {a: v.get("backends") for a, v in rec.get("attention", {}).items()}
            keep = {"backends": kinds, "peak_memory": rec.get("peak_memory")}
            rows.append((name, f"attention {kinds}; peak GiB {rec.get('peak_memory')}"))
        elif bench == "inference":
            keep = {k: rec.get(k) for k in ("speedup", "gmacs_ratio", "dense_img_s", "pruned_img_s")}
            rows.append((name, f"pruned/dense {rec.get('speedup')}x (GMACs ratio {rec.get('gmacs_ratio')}), "
                               f"{rec.get('pruned_img_s')} vs {rec.get('dense_img_s')} img/s"))
        elif bench == "train-loop":
            keep = {k: rec.get(k) for k in ("img_per_s", "data_wait_fraction", "tflop_per_s", "mfu",
                                            "mfu_measured_peak", "gpu_memory_used_max_mib")}
            rows.append((name, f"{rec.get('img_per_s')} img/s, data wait {rec.get('data_wait_fraction')}, "
                               f"MFU {rec.get('mfu')} (989) / {rec.get('mfu_measured_peak')} (790)"))
        elif bench == "pytest":
            keep = {k: rec.get(k) for k in ("rc", "tests", "failures", "errors", "skipped")}
            rows.append((name, f"rc {rec.get('rc')}: {rec.get('tests')} tests, {rec.get('failures')} failed, "
                               f"{rec.get('skipped')} skipped"))
        else:
            keep = {k: v for k, v in rec.items() if isinstance(v, (int, float, str)) and k not in ("name", "date")}
            rows.append((name, ", ".join(f"{k} {v}" for k, v in keep.items()
                                         if k in ("ratio", "ratio_cpu", "images", "shards", "total_s"))))
        summary[name] = keep
    gated, dense = _load(args.out, "loop_gated"), _load(args.out, "loop_dense")
    if "img_per_s" in gated and "img_per_s" in dense:
        summary["loop_gated_over_dense_step_time"] = round(dense["img_per_s"] / gated["img_per_s"], 3)
        rows.append(("loop gated/dense", f"step time {summary['loop_gated_over_dense_step_time']}x"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    width = max((len(n) for n, _ in rows), default=0)
    print(f"== summary: {env.get('device')} {env.get('date')} ({len(summary['errors'])} errors)")
    for name, text in rows:
        print(f"{name:<{width}}  {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("out")
    p = sub.add_parser("record")
    for name in ("name", "log"):
        p.add_argument(name)
    p.add_argument("rc", type=int)
    p.add_argument("seconds", type=float)
    p.add_argument("timeout", type=int)
    p.add_argument("out")
    p.add_argument("--skip-reason", default="")
    p = sub.add_parser("shards")
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--out", required=True)
    p = sub.add_parser("loop")
    p.add_argument("--config", default="trainer/configs/deit_b384_dynamicvit.yaml")
    p.add_argument("--gate", default="dynamicvit")
    p.add_argument("--arch", default="deit_base_patch16_384")
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--kwargs", default="{}", help="model.kwargs (YAML mapping)")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--skip-windows", type=int, default=3)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", action="append", default=[], help="more config overrides, key=value")
    p = sub.add_parser("pytest")
    p.add_argument("--junit", required=True)
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("summary")
    p.add_argument("out")
    args = parser.parse_args(argv)
    if args.cmd == "pytest" and args.pytest_args[:1] == ["--"]:
        args.pytest_args = args.pytest_args[1:]
    return {"env": cmd_env, "record": cmd_record, "shards": cmd_shards, "loop": cmd_loop, "pytest": cmd_pytest,
            "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
