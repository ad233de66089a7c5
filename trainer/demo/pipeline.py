"""`make demo` (`python -m trainer.demo`): the whole stack end to end on the embedded digits dataset, on CPU.

    python -m trainer.demo [--out runs/demo] [--procs 2] [--train-per-class N] [--teacher-epochs E]
                           [--student-epochs E] [--asvit-epochs E]

1. `python -m data.demo OUT/data`: digits on cluttered canvases, converted to shards by data.convert;
2. the dense teacher (`trainer/configs/demo_teacher.yaml`) through `accelerate launch` -> OUT/teacher,
   exported with `trainer.export` to OUT/teacher.safetensors;
3. a DynamicViT student (`trainer/configs/demo.yaml`) initialised from and distilled by the teacher,
   through `launch.sh` (the DeepSpeed launcher, ZeRO-2, `--procs` CPU ranks) -> OUT/dynamicvit;
4. an AS-ViT student the same way -> OUT/asvit;
5. `trainer.evaluate` on each, then side-by-side CPU img/s of the three, kept-token precision against the
   digits' boxes, overlays and curves -> OUT/summary.json, OUT/report.md, OUT/*.png;
6. `trainer.export --format onnx` of the teacher and the DynamicViT student -> OUT/onnx/*.onnx, timed side by
   side in ONNX Runtime: the speed-up a deployment keeps;
7. prints the TensorBoard command.

Every stage is the real CLI a user would run (they are printed as they start), so the demo is also the
integration test of the launchers, the checkpoint/export round trip and the evaluate CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

from trainer.demo.report import DEPLOYED, GOALS, measure_models, measure_onnxruntime, write_report
from trainer.infra.dist import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEACHER_CONFIG = os.path.join(REPO, "trainer", "configs", "demo_teacher.yaml")
STUDENT_CONFIGS = {"dynamicvit": os.path.join(REPO, "trainer", "configs", "demo.yaml"),
                   "asvit": os.path.join(REPO, "trainer", "configs", "demo_asvit.yaml")}


class DemoError(RuntimeError):
    """A demo stage failed; the message names the stage and its command."""


def _run(stage: str, cmd: list[str], capture: bool = False) -> str:
    """Run one stage's command from the repo root; its output streams through unless captured."""
    print(f"\n=== {stage}\n$ {shlex.join(cmd)}", flush=True)
    # One thread per rank: the ranks share the machine's cores instead of oversubscribing them.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
           "PYTHON": sys.executable}
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise DemoError(f"{stage} failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return proc.stdout if capture else ""


def _sets(pairs: dict[str, object]) -> list[str]:
    out = []
    for key, value in pairs.items():
        out += ["--set", f"{key}={value}"]
    return out


def _bin(name: str) -> str:
    # The console scripts of the interpreter running the demo (the venv's), not whatever is on PATH.
    return os.path.join(os.path.dirname(sys.executable), name)


def train_teacher(out: str, shards: str, procs: int, epochs: float) -> str:
    """Dense teacher through Accelerate (gloo ranks on CPU); returns its exported weights file."""
    run_dir = os.path.join(out, "teacher")
    launcher = [_bin("accelerate"), "launch", "--num_machines", "1", "--num_processes", str(procs),
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    # --multi_gpu picks Accelerate's torchrun-based launcher, which on a CPU machine runs gloo ranks;
    # --cpu would run a single process.
    if procs > 1:
        launcher.insert(2, "--multi_gpu")
    _run("teacher: dense ViT, accelerate launch", launcher + ["-m", "trainer.train", "--config", TEACHER_CONFIG]
         + _sets({"data.train": shards, "data.val": shards, "run.dir": run_dir, "train.epochs": epochs}))
    weights = os.path.join(out, "teacher.safetensors")
    _run("teacher: export", [sys.executable, "-m", "trainer.export", "--checkpoint", run_dir, "--out", weights])
    return weights


def train_student(out: str, name: str, gate: str, shards: str, teacher: str, procs: int, epochs: float,
                  **overrides: object) -> str:
    """A pruned student from the teacher's weights, distilled by it, through launch.sh (DeepSpeed ZeRO-2), with
    its gate's demo recipe (demo.yaml, demo_asvit.yaml) and `overrides` (config keys)."""
    run_dir = os.path.join(out, name)
    cmd = ["bash", os.path.join(REPO, "launch.sh"), "--num_nodes", "1", "--num_gpus", str(procs),
           "--master_port", str(free_port()), "--config", STUDENT_CONFIGS[gate]]
    _run(f"{name} student: launch.sh (DeepSpeed ZeRO-2, {procs} ranks)", cmd + _sets({
        "model.checkpoint": teacher, "teacher.checkpoint": teacher, "data.train": shards, "data.val": shards,
        "run.dir": run_dir, "run.name": name, "train.epochs": epochs, **overrides}))
    return run_dir


def evaluate_run(run_dir: str, shards: str) -> dict:
    """The evaluate CLI's JSON for a run's latest checkpoint."""
    stdout = _run(f"evaluate {os.path.basename(run_dir)}", [sys.executable, "-m", "trainer.evaluate",
                                                         "--checkpoint", run_dir, "--data", shards], capture=True)
    return json.loads(stdout.strip().splitlines()[-1])


def export_onnx(run_dir: str, path: str) -> dict:
    """The export CLI's JSON for a run's ONNX graph (static token counts, checked against PyTorch)."""
    stdout = _run(f"export {os.path.basename(run_dir)} to ONNX", [
        sys.executable, "-m", "trainer.export", "--checkpoint", run_dir, "--out", path, "--format", "onnx"],
        capture=True)
    return json.loads(stdout.strip().splitlines()[-1])


def run_demo(out: str, procs: int = 2, train_per_class: int = 2000, val_per_class: int = 200,
             teacher_epochs: float = 3, student_epochs: float = 2, asvit_epochs: float = 2,
             data_workers: int = 2) -> dict:
    """All stages; returns the summary (also written to OUT/summary.json)."""
    from data.demo import build_demo

    start = time.time()
    os.makedirs(out, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        t0 = time.time()
        result = fn(*args)
        seconds[stage] = round(time.time() - t0, 1)
        return result

    print(f"=== data: python -m data.demo {os.path.join(out, 'data')} --train-per-class {train_per_class}", flush=True)
    stats = timed("data", lambda: build_demo(os.path.join(out, "data"), train_per_class, val_per_class,
                                             workers=data_workers))
    shards = stats["shards"]
    teacher = timed("teacher", train_teacher, out, shards, procs, teacher_epochs)
    runs = {"teacher": os.path.join(out, "teacher")}
    runs["dynamicvit"] = timed("dynamicvit", train_student, out, "dynamicvit", "dynamicvit", shards, teacher, procs,
                               student_epochs)
    runs["asvit"] = timed("asvit", train_student, out, "asvit", "asvit", shards, teacher, procs, asvit_epochs)

    t0 = time.time()
    evals = {name: evaluate_run(run_dir, shards) for name, run_dir in runs.items()}
    print("\n=== measure: side-by-side CPU img/s, kept-token precision, figures", flush=True)
    measured = measure_models(runs, shards, out)
    exports = {name: export_onnx(runs[name], os.path.join(out, "onnx", f"{name}.onnx")) for name in DEPLOYED}
    measured["onnxruntime"] = measure_onnxruntime(exports, shards)
    seconds["evaluate_and_report"] = round(time.time() - t0, 1)
    seconds["total"] = round(time.time() - start, 1)

    summary = {"out": os.path.abspath(out), "procs": procs, "data": stats, "runs": runs, "evaluate": evals,
               "measured": measured, "seconds": seconds, "torch_threads": torch.get_num_threads()}
    summary["goals"] = {name: goal(summary) for name, goal in GOALS.items()}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_report(summary, os.path.join(out, "report.md"))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--procs", type=int, default=2, help="ranks per training run (default 2)")
    p.add_argument("--train-per-class", type=int, default=2000)
    p.add_argument("--val-per-class", type=int, default=200,
                   help="2000 val images: a paired student-teacher interval of about +-1 point")
    p.add_argument("--teacher-epochs", type=float, default=3)
    p.add_argument("--student-epochs", type=float, default=2)
    p.add_argument("--asvit-epochs", type=float, default=2)
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    try:
        summary = run_demo(out, args.procs, args.train_per_class, args.val_per_class, args.teacher_epochs,
                           args.student_epochs, args.asvit_epochs)
    except DemoError as e:
        sys.exit(f"demo: {e}")
    print(f"\n=== done in {summary['seconds']['total'] / 60:.1f} min")
    ort = summary["measured"]["onnxruntime"]["models"]["dynamicvit"]
    print(f"  DynamicViT student speed-up over the teacher: ONNX Runtime {ort['speedup_vs_teacher']:.2f}x, PyTorch "
          f"{summary['measured']['models']['dynamicvit']['speedup_vs_teacher']:.2f}x")
    for name, goal in summary["goals"].items():
        print(f"  {'met   ' if goal['met'] else 'MISSED'} {name}: {goal['text']}")
    print(f"report: {os.path.join(out, 'report.md')}\nsummary: {os.path.join(out, 'summary.json')}")
    print(f"TensorBoard logs: {out}/*/tb\n  open them with:  {_bin('tensorboard')} --logdir {out}  "
          "(then browse http://localhost:6006)")


if __name__ == "__main__":
    main()
