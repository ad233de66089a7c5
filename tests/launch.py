"""Start real multi-process training runs from tests (deepspeed, torchrun, accelerate launchers)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import psutil

from trainer.infra.dist import free_port  # noqa: F401  (re-exported: tests import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "trainer", "configs", "smoke.yaml")
BIN = os.path.dirname(sys.executable)


def launcher_command(launcher: str, nproc: int, port: int) -> list[str]:
    """The command prefix that starts `nproc` ranks of trainer.train with the given launcher."""
    if launcher == "python":
        return [sys.executable, "-m", "trainer.train"]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port), "-m", "trainer.train"]
    if launcher == "launch.sh":
        return ["bash", os.path.join(REPO, "launch.sh"), "--num_nodes", "1", "--num_gpus", str(nproc),
                "--master_port", str(port)]
    if launcher == "deepspeed":
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
                "--module", "trainer.train"]
    if launcher == "accelerate":
        # --multi_gpu selects accelerate's torchrun-based launcher; on a CPU machine the ranks use gloo.
        return [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port), "-m", "trainer.train"]
    raise ValueError(launcher)


def start_training(launcher: str, nproc: int, overrides: list[str], config: str = SMOKE,
                   env: dict[str, str] | None = None, log_path: str | None = None) -> subprocess.Popen:
    """Start trainer.train without waiting; output to pipes, or (stderr merged) to `log_path`."""
    cmd = launcher_command(launcher, nproc, free_port()) + ["--config", config]
    for o in overrides:
        cmd += ["--set", o]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable,
                **(env or {})}
    # DeepSpeed JIT-builds its CPU shared-memory comm op on every CPU start; a build dir per venv stops
    # two checkouts with their own venvs from invalidating each other's build (minutes each time).
    full_env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(BIN), "torch_extensions"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(var, None)
    if log_path is None:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (launcher, ranks, data workers): kill -9 of a whole job."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]  # listed before any is killed: no orphan escapes
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def run_training(launcher: str, nproc: int, overrides: list[str], timeout: int = 300,
                 config: str = SMOKE, check: bool = True, env: dict[str, str] | None = None,
                 ) -> subprocess.CompletedProcess:
    """Run trainer.train to completion; on failure the assertion shows the tail of its output."""
    proc = start_training(launcher, nproc, overrides, config, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(proc.args)}: still running after {timeout} s\n{(out + err)[-6000:]}") from None
    except BaseException:  # e.g. pytest-timeout: leave no ranks behind
        kill_tree(proc.pid)
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        assert done.returncode == 0, f"{' '.join(proc.args)}\n--- output tail ---\n{(out + err)[-6000:]}"
    return done


def train_records(run_dir: str, kind: str = "train") -> dict[int, dict]:
    """metrics.jsonl records of one kind (train or eval) by step."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def trainer_states(checkpoint_dir: str) -> list[dict]:
    """Every rank's trainer_state json of a checkpoint, in rank order."""
    names = sorted(n for n in os.listdir(checkpoint_dir) if n.startswith("trainer_state_rank"))
    out = []
    for n in names:
        with open(os.path.join(checkpoint_dir, n)) as f:
            out.append(json.load(f))
    return out


def read_keys(run_dir: str, rank: int) -> list[tuple[int, str]]:
    """The (step, sample key) stream a rank trained on (data.log_keys), across kills and resumes.

    A `# start step=S` line opens every (re)start: lines after step S that a killed run wrote were
    redone by the resume, so they are dropped and the resumed run's lines take their place.
    """
    stream: list[tuple[int, str]] = []
    with open(os.path.join(run_dir, f"keys_rank{rank}.txt")) as f:
        for line in f:
            if line.startswith("# start step="):
                start = int(line.split("=", 1)[1])
                stream = [(s, k) for s, k in stream if s <= start]
            elif line.strip():
                step, key = line.split()
                stream.append((int(step), key))
    return stream
