#!/usr/bin/env bash
""":"
# Start trainer.train on one node or many: DeepSpeed's launcher (pdsh/ssh with a hostfile), or srun in SLURM.
#
#   bash launch.sh [--num_nodes N] [--num_gpus G] [--hostfile F] [--master_addr A] [--master_port P] --config FILE [--set k=v ...]
#   deepspeed [--hostfile F] [--num_nodes N] [--num_gpus G] launch.sh [--num_nodes N] --config FILE [--set k=v ...]
#
# Options (everything else goes to `python -m trainer.train`):
#   --num_nodes N      nodes (default 1); every rank checks that the job really spans N nodes
#   --num_gpus G       ranks per node: GPUs (processes on a CPU machine); default: the hostfile's slots,
#                      SLURM's GPUs per node, or every local GPU
#   --hostfile F       DeepSpeed hostfile, one "node1 slots=8" line per node: the nodes start over pdsh/ssh
#   --master_addr A    rendezvous host (default: the first node)
#   --master_port P    rendezvous port (default 29500)
#   --launcher L       pdsh (default with a hostfile), openmpi, mvapich; slurm (default inside an allocation)
#   -h, --help         this text
# Inside a SLURM allocation (salloc -N N, or an sbatch script) srun starts G tasks per node, one per rank, each
# running this file; SIGTERM or SIGUSR1 (scancel --signal, sbatch --signal, preemption) then reaches the ranks
# directly, and they stop together at the next step with a checkpoint and exit 75. Paths are relative to the
# folder you start from. PYTHON picks the interpreter (default: this repo's .venv/bin/python, else python3);
# GLOO_*, NCCL_*, OMP_NUM_THREADS, TORCH_*, PRUNEVIT_* and PYTHON* variables reach every node.
#
# One file, two languages, on purpose: bash runs it as the launcher (`bash launch.sh`, `./launch.sh`), and
# Python runs it as each rank's script, which is what `deepspeed launch.sh` does (`python -u launch.sh
# --local_rank=K ...`) and what srun does here. Python reads this bash part as a string literal.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"

num_nodes=1; num_gpus=""; hostfile=""; master_addr=""; master_port=29500; launcher=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_nodes) num_nodes="$2"; shift 2 ;;
    --num_gpus) num_gpus="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --master_addr) master_addr="$2"; shift 2 ;;
    --master_port) master_port="$2"; shift 2 ;;
    --launcher) launcher="$2"; shift 2 ;;
    -h|--help) sed -n '3,20p' "$self" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
fail() { echo "launch.sh: $*" >&2; exit 2; }

PYTHON=${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # the repo's packages from any folder, on every node

# Validate the config here, before any node is touched: a bad key fails in seconds, not after ssh or srun.
"$PYTHON" -m trainer.check_config "${args[@]}"

if [[ -n "${SLURM_JOB_ID:-}" && -z "$launcher" ]]; then
  launcher=slurm
fi
if [[ "$launcher" == slurm ]]; then
  # srun, one task per rank, rather than DeepSpeed's slurm runner (it drops --module and gives tasks no RANK)
  # or torchrun under srun (it would absorb SIGUSR1): every rank gets the job's signals itself, and
  # trainer/infra/launch_env.py maps SLURM_PROCID/NTASKS/LOCALID/NODEID to RANK/WORLD_SIZE/LOCAL_RANK.
  allocated=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  (( num_nodes <= allocated )) || fail "--num_nodes $num_nodes but this allocation has $allocated node(s): salloc -N $num_nodes"
  per_node=${num_gpus:-${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}}
  (( per_node >= 1 )) || per_node=1
  export MASTER_ADDR=${master_addr:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  export MASTER_PORT=$master_port
  # --wait, not --kill-on-bad-exit: ranks that stop on a signal exit 75 a moment apart, and an immediate kill
  # would end the later ones mid-exit (and report their signal instead of 75). A rank that fails while its
  # peers wait at a rendezvous has them ended 60 s later instead of at the 30-minute timeout.
  exec srun --nodes "$num_nodes" --ntasks "$(( num_nodes * per_node ))" --ntasks-per-node "$per_node" \
    --wait=60 "$PYTHON" -u "$self" --num_nodes "$num_nodes" "${args[@]}"
fi

ds=(-m deepspeed.launcher.runner --num_nodes "$num_nodes" --master_port "$master_port")
[[ -n "$num_gpus" ]] && ds+=(--num_gpus "$num_gpus")
[[ -n "$master_addr" ]] && ds+=(--master_addr "$master_addr")
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || fail "hostfile not found: $hostfile"
  ds+=(--hostfile "$hostfile" --launcher "${launcher:-pdsh}")
  # The first node is the rendezvous host (DeepSpeed would ask it for `hostname -I`, often not the network
  # the nodes share).
  [[ -n "$master_addr" ]] || ds+=(--master_addr "$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")")
  # DeepSpeed's runner exports only NCCL/PYTHON/... variables to the other nodes, plus a .deepspeed_env file:
  # give it one with ours and the user's own (~/.deepspeed_env, ./.deepspeed_env). Removed once it was read.
  envfile=$(mktemp "${TMPDIR:-/tmp}/prunevit-deepspeed-env.XXXXXX")
  cat ~/.deepspeed_env ./.deepspeed_env 2>/dev/null > "$envfile" || true
  while IFS='=' read -r name _; do
    # Raw values: DeepSpeed double-quotes any value with shell characters itself.
    [[ "$name" =~ ^(GLOO_|NCCL_|OMP_NUM_THREADS$|TORCH_|PRUNEVIT_) ]] && printf '%s=%s\n' "$name" "${!name}" >> "$envfile"
  done < <(env)
  export DS_ENV_FILE="$envfile"
  (sleep 60; rm -f "$envfile") >/dev/null 2>&1 &
elif (( num_nodes > 1 )); then
  fail "--num_nodes $num_nodes needs --hostfile F (one \"node1 slots=8\" line per node), or run inside a SLURM allocation"
fi
# One base64 token for trainer.train's arguments: pdsh hands them to each node's shell, which would expand them.
packed=$("$PYTHON" -c 'import base64, json, sys; print(base64.b64encode(json.dumps(sys.argv[1:]).encode()).decode())' "${args[@]}")
exec "$PYTHON" "${ds[@]}" "$self" --num_nodes "$num_nodes" --args_b64 "$packed"
":"""
# Python: this file is each rank's script (DeepSpeed's launcher, srun); the bash part above is a string here.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer.infra.launch_env import prepare_rank  # noqa: E402
from trainer.train import main  # noqa: E402

main(prepare_rank(sys.argv[1:]))
