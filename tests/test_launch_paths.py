"""Every launch path as users type it, on real launchers: DeepSpeed's (`deepspeed launch.sh`, hostfile +
pdsh/ssh), SLURM (salloc, sbatch, srun), torchrun and Accelerate, single node and on the local 2-node
cluster (tests/cluster/up.sh). Each test shows the world size, each rank's (node, local rank), the
steps done and a complete checkpoint; the kill and stop tests resume and must reproduce an
uninterrupted run's losses exactly.

Every command runs from a folder of its own with relative paths (config, data, run dir), as a user would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from tests.helpers import make_shards
from tests.launch import BIN, REPO, SMOKE, free_port, kill_tree, train_records, trainer_states

pytestmark = [pytest.mark.dist, pytest.mark.slow]

LAUNCH_SH = os.path.join(REPO, "launch.sh")
SBATCH = os.path.join(REPO, "examples", "slurm", "train.sbatch")
STEPS = 10
TERMS = ("loss", "ce", "kd", "tok", "ratio")


def _cluster_state() -> str:
    """'' when the local 2-node cluster answers, else why not."""
    if not shutil.which("sinfo") or not shutil.which("pdsh"):
        return "SLURM or pdsh not installed (run: make cluster)"
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    idle = [line for line in nodes.stdout.splitlines() if line.split()[-1] in ("idle", "mixed", "allocated")]
    if nodes.returncode != 0 or len(idle) < 2:
        return f"SLURM nodes not up ({nodes.stdout.strip() or nodes.stderr.strip()}); run: make cluster"
    ssh = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "node-b", "true"],
                         capture_output=True, timeout=20)
    return "" if ssh.returncode == 0 else "ssh node-b failed (run: make cluster)"


@pytest.fixture(scope="module")
def cluster():
    """The local cluster; under CI (CI=true) a cluster that is not up fails instead of skipping."""
    why = _cluster_state()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"local cluster not up under CI: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's folder: shards/, my.yaml (the smoke recipe over them) and a 2-node hostfile."""
    root = tmp_path_factory.mktemp("user")
    make_shards(str(root / "shards"), [8] * 8, num_classes=4)
    with open(SMOKE) as f:
        cfg = yaml.safe_load(f)
    cfg["data"].update(train="shards/train-{000000..000007}.tar", val="")
    cfg["train"]["steps"] = STEPS
    cfg["log"]["every"] = 1
    cfg["ckpt"].update(every=2, keep=3)
    with open(root / "my.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    (root / "hosts").write_text("node-a slots=1\nnode-b slots=1\n")
    return root


def _env(**extra: str) -> dict[str, str]:
    # PYTHONPATH: commands run from the user's folder must import this checkout, whatever the venv has installed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": REPO, "PYTHON": sys.executable,
           "TORCH_EXTENSIONS_DIR": os.path.join(os.path.dirname(BIN), "torch_extensions"), **extra}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(cmd: list[str], cwd, timeout: int = 240, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc.pid)
        raise
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)} -> {done.returncode}\n{out[-5000:]}"
    return done


def _args(run: str, *sets: str) -> list[str]:
    out = ["--config", "my.yaml", "--set", f"run.dir=runs/{run}"]
    for s in sets:
        out += ["--set", s]
    return out


def _placement(workdir, run: str, step: int = STEPS) -> tuple[int, list[tuple[int, int]]]:
    """(world size, sorted (node rank, local rank) pairs) from a complete checkpoint's trainer states."""
    ckpt = workdir / "runs" / run / "checkpoints" / f"step_{step:08d}"
    assert (ckpt / "COMPLETE").is_file(), f"no complete checkpoint {ckpt}"
    states = trainer_states(str(ckpt))
    return states[0]["world_size"], sorted((s["node_rank"], s["local_rank"]) for s in states)


@pytest.fixture(scope="module")
def reference(workdir):
    """Losses of an uninterrupted 2-rank run (torchrun on one node): every launch path must reproduce them."""
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
          "-m", "trainer.train", *_args("reference")], workdir)
    return train_records(str(workdir / "runs" / "reference"))


@pytest.fixture(scope="module")
def reference_2nodes(workdir, cluster):
    """Losses of an uninterrupted run on 2 nodes x 1 rank (SLURM). One node's 2 ranks reduce through
    DeepSpeed's shared-memory op, 2 nodes through gloo over TCP: bf16 sums differ in the last bits, so
    each topology has its own reference."""
    _run(["salloc", "-N", "2", "bash", LAUNCH_SH, "--num_nodes", "2", "--num_gpus", "1", "--master_port",
          str(free_port()), *_args("reference_2nodes")], workdir)
    assert _placement(workdir, "reference_2nodes") == (2, [(0, 0), (1, 0)])
    return train_records(str(workdir / "runs" / "reference_2nodes"))


def _assert_same_losses(workdir, run: str, reference: dict) -> None:
    records = train_records(str(workdir / "runs" / run))
    assert sorted(records) == list(range(1, STEPS + 1)), sorted(records)
    for step, ref in reference.items():
        for term in TERMS:
            assert math.isclose(records[step][term], ref[term], rel_tol=1e-6, abs_tol=1e-9), (run, step, term)


# ---------------------------------------------------------------------------------------------------
# DeepSpeed's launcher


def test_deepspeed_launch_sh_trains_each_rank_from_the_users_folder(workdir, reference):
    """`deepspeed --num_gpus 2 launch.sh --config my.yaml`: the launcher runs launch.sh as each rank's script."""
    _run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), LAUNCH_SH,
          *_args("ds_literal")], workdir)
    assert _placement(workdir, "ds_literal") == (2, [(0, 0), (0, 1)])
    _assert_same_losses(workdir, "ds_literal", reference)


def test_num_nodes_that_the_job_does_not_span_stops_every_rank_with_one_message(workdir):
    """`deepspeed launch.sh --num_nodes 2` without a hostfile runs on one node: stop, say what to type."""
    start = time.time()
    done = _run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), LAUNCH_SH,
                 "--num_nodes", "2", *_args("ds_mismatch")], workdir, check=False)
    elapsed = time.time() - start
    print(f"mismatch stopped in {elapsed:.1f} s")
    assert done.returncode != 0 and elapsed < 30
    assert done.stdout.count("--num_nodes 2 was asked for") == 1, done.stdout[-3000:]
    assert "deepspeed --hostfile HOSTFILE --num_nodes 2 launch.sh" in done.stdout
    assert "bash launch.sh --num_nodes 2 --hostfile HOSTFILE" in done.stdout
    assert "Traceback" not in done.stdout
    assert not (workdir / "runs" / "ds_mismatch" / "checkpoints").exists()


def test_deepspeed_with_a_hostfile_runs_one_rank_on_each_node_over_pdsh(workdir, reference_2nodes):
    """`deepspeed --hostfile hosts launch.sh`: DeepSpeed's runner sends only its own variables to the nodes, so
    the user lists theirs in .deepspeed_env (DeepSpeed's convention; `bash launch.sh` does it for them)."""
    env_file = workdir / ".deepspeed_env"
    env_file.write_text("OMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=lo\n")
    try:
        _run([os.path.join(BIN, "deepspeed"), "--hostfile", "hosts", "--num_nodes", "2", "--master_addr", "node-a",
              "--master_port", str(free_port()), LAUNCH_SH, "--num_nodes", "2", *_args("ds_hostfile")], workdir)
    finally:
        env_file.unlink()
    assert _placement(workdir, "ds_hostfile") == (2, [(0, 0), (1, 0)])
    _assert_same_losses(workdir, "ds_hostfile", reference_2nodes)


def _kill_node(node_var: str, node: int, timeout: float = 60) -> int:
    """SIGKILL every training process of one node (identified by the launcher's node variable); returns how many."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        victims = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmdline = " ".join(p.info["cmdline"] or [])
                ours = "launch.sh" in cmdline or "trainer" in cmdline
                if ours and p.environ().get(node_var) == str(node):
                    victims.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if victims:
            for p in victims:
                kill_tree(p.pid)
            return len(victims)
        time.sleep(0.2)
    raise AssertionError(f"no process with {node_var}={node} found")


def _start(cmd: list[str], workdir, run: str, fault: str) -> tuple[subprocess.Popen, object]:
    """Start a launch in the background with PRUNEVIT_FAULT armed; returns it and its log (`<run>.log`)."""
    log = workdir / f"{run}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=_env(PRUNEVIT_FAULT=fault), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    return proc, log


def _kill_node_then_resume(workdir, cmd: list[str], run: str, node_var: str, reference: dict) -> None:
    """Node 1's rank pauses after step 5 (checkpoints 2 and 4 complete); its processes are killed; the job
    fails; the same command resumes from step 4 and ends with the reference losses."""
    proc, log = _start(cmd, workdir, run, "after_step:5:1:pause")
    try:
        deadline = time.time() + 180
        while "pause at after_step step 5" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        killed = _kill_node(node_var, 1)
        rc = proc.wait(timeout=120)
    finally:
        kill_tree(proc.pid)
    print(f"{run}: killed {killed} process(es) of node 1; the job exited {rc}")
    assert rc != 0
    root = workdir / "runs" / run / "checkpoints"
    assert (root / "step_00000004" / "COMPLETE").is_file() and not (root / "step_00000006").exists()
    done = _run(cmd, workdir)
    assert "resumed from runs/" + run + "/checkpoints/step_00000004 at step 4" in done.stdout, done.stdout[-3000:]
    assert _placement(workdir, run) == (2, [(0, 0), (1, 0)])
    _assert_same_losses(workdir, run, reference)


def test_launch_sh_with_a_hostfile_survives_losing_a_node(workdir, reference_2nodes):
    """`bash launch.sh --num_nodes 2 --hostfile hosts`: pdsh/ssh to node-a and node-b, kill node-b, resume."""
    cmd = ["bash", LAUNCH_SH, "--num_nodes", "2", "--hostfile", "hosts", "--master_port", str(free_port()),
           *_args("pdsh")]
    _kill_node_then_resume(workdir, cmd, "pdsh", "CROSS_RANK", reference_2nodes)


def test_usr1_to_the_ranks_of_a_hostfile_launch_stops_them_with_a_checkpoint(workdir, reference_2nodes):
    """DeepSpeed's launcher kills its ranks on SIGTERM, so the README says: signal the ranks over pdsh."""
    cmd = ["bash", LAUNCH_SH, "--num_nodes", "2", "--hostfile", "hosts", "--master_port", str(free_port()),
           *_args("pdsh_usr1")]
    proc, log = _start(cmd, workdir, "pdsh_usr1", "after_step:5:*:hold")
    try:
        _wait_for(lambda: log.read_text().count("hold at after_step step 5") == 2, "both ranks hold")
        subprocess.run(["pdsh", "-w", "node-a,node-b", "pkill -USR1 -f '[l]aunch.sh --local_rank'"], check=True,
                       env=_env(PDSH_RCMD_TYPE="ssh"))
        rc = proc.wait(timeout=120)
    finally:
        kill_tree(proc.pid)
    text = log.read_text()
    assert rc == 75 and text.count("SIGUSR1 received") == 2, (rc, text[-4000:])
    assert (workdir / "runs" / "pdsh_usr1" / "checkpoints" / "step_00000007" / "COMPLETE").is_file()
    done = _run(cmd, workdir)
    assert "at step 7" in done.stdout
    _assert_same_losses(workdir, "pdsh_usr1", reference_2nodes)


# ---------------------------------------------------------------------------------------------------
# SLURM


def test_launch_sh_in_a_salloc_survives_losing_a_node(workdir, reference_2nodes):
    """`salloc -N 2 bash launch.sh --num_nodes 2 --num_gpus 1`: srun starts a rank per node; kill node2's, resume."""
    cmd = ["salloc", "-N", "2", "bash", LAUNCH_SH, "--num_nodes", "2", "--num_gpus", "1", "--master_port",
           str(free_port()), *_args("salloc")]
    _kill_node_then_resume(workdir, cmd, "salloc", "SLURM_NODEID", reference_2nodes)


def _job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _wait_for(predicate, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_sbatch_example_stops_on_usr1_with_a_checkpoint_requeues_and_finishes(workdir, reference_2nodes):
    """The shipped sbatch script (resources set for the local nodes): `scancel --signal=USR1` while the ranks
    hold after step 5 -> every rank stops after step 7 with a complete checkpoint and exits 75 -> the script
    requeues the job -> it resumes at step 7 and finishes with the reference losses."""
    script = workdir / "train.sbatch"
    text = open(SBATCH).read().replace("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1")
    script.write_text(text.replace("#SBATCH --nodes=4", "#SBATCH --nodes=2").replace("#SBATCH --exclusive\n", ""))
    job = subprocess.run(["sbatch", "--parsable", str(script), "--num_gpus", "1", "--master_port",
                          str(free_port()), *_args("sbatch")], cwd=workdir, capture_output=True, text=True,
                         env=_env(PRUNEVIT_REPO=REPO, PRUNEVIT_FAULT="after_step:5:*:hold"), check=True).stdout.strip()
    out = workdir / f"prunevit-{job}.out"
    try:
        _wait_for(lambda: out.exists() and out.read_text().count("hold at after_step step 5") == 2, "both ranks hold")
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        _wait_for(lambda: _job_state(job).get("Restarts") == "1" or _job_state(job).get("JobState") == "FAILED",
                  "the requeue")
        assert _job_state(job).get("Restarts") == "1", out.read_text()[-3000:]
        # SLURM holds a requeued job for its credential lifetime (tests/cluster/up.sh: 10 s, default 120 s).
        _wait_for(lambda: f"job {job} restart 1" in out.read_text(), "the requeued job to start")
        _wait_for(lambda: _job_state(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the end", 240)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = out.read_text()
    assert _job_state(job)["JobState"] == "COMPLETED", log[-4000:]
    assert log.count("SIGUSR1 received") == 2 and "stopped after step 7 (SIGUSR1)" in log, log[-4000:]
    assert "requeueing job" in log and "resumed from runs/sbatch/checkpoints/step_00000007 at step 7" in log
    assert _placement(workdir, "sbatch") == (2, [(0, 0), (1, 0)])
    _assert_same_losses(workdir, "sbatch", reference_2nodes)


# ---------------------------------------------------------------------------------------------------
# torchrun


def test_sigterm_to_torchrun_stops_both_ranks_with_a_checkpoint_and_the_rerun_resumes(workdir, reference):
    """Without SLURM: SIGTERM to torchrun, which forwards it to its ranks (30 s before it kills them)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "trainer.train", *_args("torchrun_sigterm")]
    proc, log = _start(cmd, workdir, "torchrun_sigterm", "after_step:5:*:hold")
    try:
        _wait_for(lambda: log.read_text().count("hold at after_step step 5") == 2, "both ranks hold")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        kill_tree(proc.pid)
    text = log.read_text()
    assert text.count("SIGTERM received") == 2 and "stopped after step 7 (SIGTERM)" in text, text[-4000:]
    assert (workdir / "runs" / "torchrun_sigterm" / "checkpoints" / "step_00000007" / "COMPLETE").is_file()
    done = _run(cmd, workdir)
    assert "at step 7" in done.stdout
    _assert_same_losses(workdir, "torchrun_sigterm", reference)


def test_torchrun_across_two_nodes_with_c10d_rendezvous_under_srun(workdir, reference_2nodes):
    _run(["salloc", "-N", "2", "srun", "--ntasks-per-node", "1", os.path.join(BIN, "torchrun"), "--nnodes", "2",
          "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"node1:{free_port()}",
          "--rdzv-id", "smoke", "-m", "trainer.train", *_args("torchrun_2nodes")], workdir)
    assert _placement(workdir, "torchrun_2nodes") == (2, [(0, 0), (1, 0)])
    _assert_same_losses(workdir, "torchrun_2nodes", reference_2nodes)


# ---------------------------------------------------------------------------------------------------
# Accelerate


def _accelerate_config(workdir, name: str, **fields) -> str:
    path = workdir / f"{name}.yaml"
    cfg = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "mixed_precision": "no",
           "num_machines": 1, "num_processes": 2, "machine_rank": 0, "main_training_function": "main",
           "use_cpu": False, **fields}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _accelerate(workdir, config: str, run: str, *sets: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([os.path.join(BIN, "accelerate"), "launch", "--config_file", config, "--main_process_port",
                 str(free_port()), "-m", "trainer.train", *_args(run, *sets)], workdir, check=check)


def test_accelerate_config_files_plain_and_deepspeed(workdir):
    """A plain multi-process file trains as before; a file that enables DeepSpeed ZeRO-3 is honoured (ZeRO-3
    shards on disk), and refused before training when the run config asks for the Accelerate backend."""
    plain = _accelerate_config(workdir, "accelerate_plain")
    _accelerate(workdir, plain, "acc_plain", "backend.name=accelerate", "precision=fp32")
    assert _placement(workdir, "acc_plain") == (2, [(0, 0), (0, 1)])
    assert (workdir / "runs" / "acc_plain" / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors").is_file()

    zero3 = _accelerate_config(workdir, "accelerate_zero3", distributed_type="DEEPSPEED",
                               deepspeed_config={"zero_stage": 3, "offload_optimizer_device": "none",
                                                 "offload_param_device": "none", "zero3_init_flag": False})
    done = _accelerate(workdir, zero3, "acc_zero3")
    assert "backend.ds_config=ds_configs/zero3.json (from ACCELERATE_DEEPSPEED_ZERO_STAGE=3)" in done.stdout
    ckpt = workdir / "runs" / "acc_zero3" / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / "zero_pp_rank_1_mp_rank_00_model_states.pt").is_file(), sorted(os.listdir(ckpt))
    with open(workdir / "runs" / "acc_zero3" / "config.yaml") as f:
        assert yaml.safe_load(f)["backend"]["ds_config"] == "ds_configs/zero3.json"

    start = time.time()
    refused = _accelerate(workdir, zero3, "acc_refused", "backend.name=accelerate", check=False)
    assert refused.returncode != 0 and time.time() - start < 60
    assert "backend.name='accelerate' conflicts with the accelerate config file (ACCELERATE_USE_DEEPSPEED=true" \
        in refused.stdout, refused.stdout[-3000:]
    assert not (workdir / "runs" / "acc_refused" / "checkpoints").exists()


def test_accelerate_across_two_machines_under_srun(workdir, reference_2nodes):
    """`accelerate launch --num_machines 2 --machine_rank R --main_process_ip node1`, one per node (srun)."""
    port = free_port()
    launch = (f"exec {os.path.join(BIN, 'accelerate')} launch --multi_gpu --num_machines 2 --machine_rank "
              f"$SLURM_NODEID --main_process_ip node1 --main_process_port {port} --num_processes 2 "
              f"--mixed_precision no --dynamo_backend no -m trainer.train "
              + " ".join(f"'{a}'" for a in _args("acc_2nodes")))
    _run(["salloc", "-N", "2", "srun", "--ntasks-per-node", "1", "bash", "-c", launch], workdir)
    assert _placement(workdir, "acc_2nodes") == (2, [(0, 0), (1, 0)])
    _assert_same_losses(workdir, "acc_2nodes", reference_2nodes)


def test_summary_of_a_run_says_whether_it_stopped_early(workdir, reference):
    with open(workdir / "runs" / "reference" / "summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == STEPS and summary["stopped_early"] is False
