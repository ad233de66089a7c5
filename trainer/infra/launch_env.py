"""The rank side of `launch.sh`: what a rank does when a launcher runs launch.sh as its script.

`deepspeed [opts] launch.sh ...` (DeepSpeed's launcher runs `python -u launch.sh --local_rank=K ...` on
every rank) and `srun ... launch.sh ...` (launch.sh under SLURM starts one task per rank) both land here.
It drops the options meant for launch.sh itself, maps SLURM's task variables to the ones
torch.distributed reads, checks that `--num_nodes` matches the nodes the job really spans, then runs
`trainer.train`. No torch import before the checks: a mismatch stops every rank in well under a second.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import sys
from collections.abc import Sequence

# launch.sh's own options (each takes a value); ranks drop them before trainer.train parses the rest.
LAUNCH_OPTIONS = ("--num_nodes", "--num_gpus", "--hostfile", "--master_addr", "--master_port", "--launcher",
                  "--args_b64")
HOSTFILE_HINT = "a hostfile has one line per node, e.g. 'node1 slots=8'"


def split_launch_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({launch.sh option: value}, the rest for trainer.train); `--opt=value` and `--opt value` both work."""
    options: dict[str, str] = {}
    rest: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in LAUNCH_OPTIONS:
            if not eq:
                if not args:
                    raise SystemExit(f"launch.sh: {name} needs a value")
                value = args.pop(0)
            options[name] = value
        else:
            rest.append(arg)
    if "--args_b64" in options:
        # launch.sh packs trainer.train's arguments into one base64 token: DeepSpeed's pdsh runner passes
        # arguments through each node's shell unquoted, which would expand `{0000..1023}` or `$HOME` again.
        rest += json.loads(base64.b64decode(options.pop("--args_b64")))
    return options, rest


def map_slurm_env(env: dict[str, str]) -> None:
    """Under `srun` (one task per rank) describe the rank as torchrun would: RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE and NODE_RANK from SLURM's task variables. launch.sh exports MASTER_ADDR (the first
    node) and MASTER_PORT before srun. Nothing changes when a launcher already set RANK."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env["SLURM_LOCALID"]
    # SLURM_TASKS_PER_NODE reads like "2(x2)" or "2,1": this node's count is SLURM_NTASKS / nodes when even.
    env["LOCAL_WORLD_SIZE"] = str(int(env["SLURM_NTASKS"]) // max(1, int(env.get("SLURM_NNODES", "1"))))
    env["NODE_RANK"] = env.get("SLURM_NODEID", "0")


def job_nodes(env: dict[str, str]) -> tuple[int, str] | None:
    """(nodes the job spans, which launcher said so), from the launcher's environment; None if unknown."""
    for var, launcher in (("CROSS_SIZE", "DeepSpeed's launcher"), ("SLURM_NNODES", "SLURM"),
                          ("GROUP_WORLD_SIZE", "torchrun")):
        if var in env:
            return int(env[var]), launcher
    return None


def num_nodes_mismatch(requested: int, env: dict[str, str], trainer_args: Sequence[str]) -> str:
    """The message for a rank whose job spans another number of nodes than --num_nodes asked for ("" if it matches)."""
    found = job_nodes(env)
    if found is None or found[0] == requested:
        return ""
    nodes, launcher = found
    why = (" (it found no hostfile: without --hostfile it reads /job/hostfile, and runs on this node only when "
           "that is missing)" if launcher == "DeepSpeed's launcher" and nodes == 1 else "")
    args = shlex.join(trainer_args) or "--config FILE"
    return (f"launch.sh: --num_nodes {requested} was asked for, but {launcher} started this job on {nodes} "
            f"node(s) with {env.get('WORLD_SIZE', '?')} rank(s){why}. Nothing was trained. To run on {requested} "
            f"nodes, give the launcher the nodes:\n"
            f"  deepspeed --hostfile HOSTFILE --num_nodes {requested} launch.sh {args}\n"
            f"  bash launch.sh --num_nodes {requested} --hostfile HOSTFILE {args}\n"
            f"({HOSTFILE_HINT}); inside a SLURM allocation (salloc -N {requested}, or an sbatch script): "
            f"bash launch.sh --num_nodes {requested} {args}")


def prepare_rank(argv: Sequence[str]) -> list[str]:
    """What a rank does before training: drop launch.sh's options, map SLURM's variables, and stop (exit 2,
    one message from rank 0, no traceback) when --num_nodes disagrees with the job. Returns trainer.train's args."""
    options, rest = split_launch_args(argv)
    map_slurm_env(os.environ)  # type: ignore[arg-type]
    if "--num_nodes" in options:
        message = num_nodes_mismatch(int(options["--num_nodes"]), dict(os.environ),
                                     [a for a in rest if not a.startswith("--local_rank")])
        if message:
            if os.environ.get("RANK", "0") == "0":
                print(message, file=sys.stderr, flush=True)
            os._exit(2)
    return rest
