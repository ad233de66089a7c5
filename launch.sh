#!/usr/bin/env bash
# Multi-node launch of trainer.train through the DeepSpeed launcher (a thin, documented wrapper).
#
#   bash launch.sh --num_nodes 4 --hostfile hosts --config trainer/configs/deit_b384_dynamicvit.yaml [--set k=v ...]
#
# Options (everything after them goes to `python -m trainer.train`):
#   --num_nodes N      nodes to use (default 1)
#   --num_gpus G       GPUs per node (default: all the hostfile's slots, or all local GPUs)
#   --hostfile F       DeepSpeed hostfile: one "hostname slots=8" line per node (needed for N > 1 without SLURM)
#   --master_addr A    rendezvous host (default: the first host of the hostfile, or of SLURM's node list)
#   --master_port P    rendezvous port (default 29500)
#   --launcher L       pdsh (default), openmpi, mvapich, slurm; under SLURM (SLURM_JOB_ID set) slurm is used
#   -h, --help         this text
# Environment knobs: PYTHON (interpreter, default: .venv/bin/python if present, else python3),
#   NCCL_* / GLOO_* variables are exported to every node by DeepSpeed's launcher (.deepspeed_env also works).
# Under SLURM, run it inside an allocation (`salloc -N 4 --gpus-per-node 8` or an sbatch script): it then
# starts one launcher per node with `srun` and lets DeepSpeed read the node list from SLURM.
set -euo pipefail
cd "$(dirname "$0")"

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
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ds=(-m deepspeed.launcher.runner --num_nodes "$num_nodes" --master_port "$master_port")
[[ -n "$num_gpus" ]] && ds+=(--num_gpus "$num_gpus")
[[ -n "$master_addr" ]] && ds+=(--master_addr "$master_addr")

if [[ -n "${SLURM_JOB_ID:-}" && -z "$launcher" ]]; then
  launcher=slurm
fi
if [[ "$launcher" == slurm ]]; then
  # One task per node; DeepSpeed's slurm launcher runs srun itself from the allocation.
  ds+=(--launcher slurm)
elif [[ "$num_nodes" -gt 1 ]]; then
  if [[ -z "$hostfile" ]]; then
    echo "launch.sh: --num_nodes $num_nodes needs --hostfile (or run under SLURM)" >&2; exit 2
  fi
  [[ -f "$hostfile" ]] || { echo "launch.sh: hostfile not found: $hostfile" >&2; exit 2; }
  ds+=(--hostfile "$hostfile" --launcher "${launcher:-pdsh}")
elif [[ -n "$hostfile" ]]; then
  ds+=(--hostfile "$hostfile")
fi

# Validate the config here, before any node is touched: a bad key fails in seconds, not after ssh.
"$PYTHON" -m trainer.check_config "${args[@]}"
exec "$PYTHON" "${ds[@]}" --module trainer.train "${args[@]}"
