"""Start real multi-process training runs from tests (deepspeed, torchrun, accelerate launchers)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "trainer", "configs", "smoke.yaml")
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def run_training(launcher: str, nproc: int, overrides: list[str], timeout: int = 300,
                 config: str = SMOKE, check: bool = True) -> subprocess.CompletedProcess:
    """Run trainer.train to completion; on failure the assertion shows the tail of its output."""
    cmd = launcher_command(launcher, nproc, free_port()) + ["--config", config]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n--- output tail ---\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def train_records(run_dir: str) -> dict[int, dict]:
    """metrics.jsonl train records by step."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


def trainer_states(checkpoint_dir: str) -> list[dict]:
    """Every rank's trainer_state json of a checkpoint, in rank order."""
    names = sorted(n for n in os.listdir(checkpoint_dir) if n.startswith("trainer_state_rank"))
    out = []
    for n in names:
        with open(os.path.join(checkpoint_dir, n)) as f:
            out.append(json.load(f))
    return out
