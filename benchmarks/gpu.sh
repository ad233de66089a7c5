#!/usr/bin/env bash
# Every GPU measurement in one call of a lent device machine (bare: no network, no deepspeed/webdataset):
#   bash benchmarks/build_wheels.sh      # HERE, once: .whl/ with the wheels for the device's Python 3.12
#   bash benchmarks/gpu.sh OUT_DIR        # THERE (benchmarks/README.md has the exact `run` call)
# OUT_DIR gets one JSON per measurement (its result, or an error record {"name", "error", "rc", "log_tail"}),
# each with date, device and versions; NAME.log beside it; env.json; summary.json and a table last.
# Commit the JSON under benchmarks/results/<date>-<device>/ and copy the numbers into README's table.
#
# 1. Install (the one step that stops the script): benchmarks/install_wheels.py installs from .whl/ only
#    what this Python lacks for deepspeed, webdataset, pytest, pytest-timeout, into a temp folder on
#    PYTHONPATH; then they are imported and env.json written. Any failure: a loud message, exit 2.
# 2. Measurements, most valuable first, each under its own `timeout` and a shared deadline (BUDGET s from
#    the start); a failing or timed-out one writes its error record and the next one runs:
#      train_step_b32, train_step_b64   gated vs dense fwd+bwd, teacher fwd, explicit-softmax reference; MFU
#      profile                          attention ops/kernels of one gated step, peak memory at each batch
#      inference_dynamicvit, _asvit     pruned vs dense eval img/s
#      shards, loop_gated, loop_dense   the real loop (DeepSpeed ZeRO-2, teacher, EMA), gated vs prune.gate=none
#      data                             our shard loader vs timm's, every core
#      pytest_gpu                       `pytest -m gpu`, its exit code kept
# Exit: 0 all measurements ok; 1 some wrote error records; 2 the install failed.
#
# Knobs (environment), so that the same script smoke-tests on a CPU (tests/test_gpu_script.py):
#   PY ARCH IMG KWARGS DEVICE DTYPE TRAIN_BATCHES INFER_BATCH ITERS WARMUP INFER_ITERS ATTENTION IMAGES
#   DATA_IMAGES WORKERS STEPS LOG_EVERY SKIP_WINDOWS LOOP_SET BUDGET WHEELS NEED
#   T_<name>=seconds overrides one measurement's timeout; INJECT="name:fail name:hang" fakes a failure;
#   ONLY="name ..." runs only those (a rerun of what failed).
set -uo pipefail  # no -e: one failing measurement must not stop the others (the install sets its own -e)
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -n "$(ls -A "$OUT")" ] && [ ! -e "$OUT/install.log" ]; then
  echo "gpu.sh: $OUT is not empty and holds no earlier gpu.sh output: give a new folder" >&2
  exit 2
fi
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/*.xml "$OUT"/summary.txt  # a rerun into the same folder starts clean
PY=${PY:-python3}
ARCH=${ARCH:-deit_base_patch16_384}
IMG=${IMG:-384}
KWARGS=${KWARGS:-"{}"}            # model.kwargs of the loop (a YAML mapping)
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
TRAIN_BATCHES=${TRAIN_BATCHES:-"32 64"}  # 32: the flagship recipe's per-GPU batch
INFER_BATCH=${INFER_BATCH:-64}
ITERS=${ITERS:-50}                # timed train-step iterations (each: dense, gated, teacher, reference)
WARMUP=${WARMUP:-10}
INFER_ITERS=${INFER_ITERS:-100}
ATTENTION=${ATTENTION:-}          # masked-attention implementations to compare, e.g. "bias,fold" (default: the model's)
IMAGES=${IMAGES:-5000}            # synthetic JPEGs for the loop and the data bench (~1 epoch of the loop)
DATA_IMAGES=${DATA_IMAGES:-2000}  # images per data-bench measurement
NCPU=$(nproc)
WORKERS=${WORKERS:-$(( NCPU > 3 ? NCPU - 2 : 1 ))}
STEPS=${STEPS:-150}
LOG_EVERY=${LOG_EVERY:-10}
SKIP_WINDOWS=${SKIP_WINDOWS:-3}   # log windows of start-up left out of the loop's img/s
LOOP_SET=${LOOP_SET:-}            # more config overrides for both loops, "key=value key=value"
BUDGET=${BUDGET:-360}             # seconds for the whole script; later measurements get what is left
MIN_LEFT=${MIN_LEFT:-8}           # below this many seconds left, a measurement is skipped (error record)
WHEELS=${WHEELS:-.whl}
NEED=${NEED:-"deepspeed webdataset pytest pytest-timeout"}
INJECT=${INJECT:-}
ONLY=${ONLY:-}                    # rerun only these measurements ("loop_gated data"); shards come along
[[ " $ONLY " =~ \ (loop_|data) ]] && ONLY="shards $ONLY"
START=$(date +%s)
DEADLINE=$(( START + BUDGET ))
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GPU_SH_KNOBS="ARCH=$ARCH
IMG=$IMG
KWARGS=$KWARGS
DEVICE=$DEVICE
DTYPE=$DTYPE
TRAIN_BATCHES=$TRAIN_BATCHES
INFER_BATCH=$INFER_BATCH
ITERS=$ITERS
WARMUP=$WARMUP
INFER_ITERS=$INFER_ITERS
ATTENTION=$ATTENTION
IMAGES=$IMAGES
DATA_IMAGES=$DATA_IMAGES
WORKERS=$WORKERS
STEPS=$STEPS
LOG_EVERY=$LOG_EVERY
LOOP_SET=$LOOP_SET
BUDGET=$BUDGET
INJECT=$INJECT
ONLY=$ONLY"

# ---- 1. install: set -e here only; any failure stops the script, loudly -------------------------------
echo "== install: what $PY lacks of [$NEED], from $WHEELS"
(
  set -euo pipefail
  modules=()
  for p in $NEED; do modules+=("${p//-/_}"); done
  timeout 120 "$PY" benchmarks/install_wheels.py --wheels "$WHEELS" --target "$SITE" $NEED
  timeout 90 "$PY" -c 'import importlib, sys
for m in sys.argv[1:]:
    mod = importlib.import_module(m)
    print("import", m, getattr(mod, "__version__", "?"), "from", mod.__file__)' "${modules[@]}"
  timeout 60 "$PY" benchmarks/gpu_tools.py env "$OUT"
) 2>&1 | tee "$OUT/install.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  {
    echo
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "!!! gpu.sh: INSTALL FAILED (exit $rc): no measurement was run. Log: $OUT/install.log (end above)."
    echo "!!! Wheels: bash benchmarks/build_wheels.sh here, then carry .whl (benchmarks/README.md)."
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  } >&2
  "$PY" benchmarks/gpu_tools.py record install "$OUT/install.log" "$rc" "$(( $(date +%s) - START ))" 120 "$OUT" \
    >/dev/null 2>&1 || printf '{"name": "install", "error": "install failed", "rc": %d}\n' "$rc" > "$OUT/install.json"
  exit 2
fi

# ---- 2. measurements -----------------------------------------------------------------------------------
FAILED=0
measure() {  # measure NAME TIMEOUT CMD...: CMD under timeout -> OUT/NAME.log, then OUT/NAME.json (result or error)
  local name=$1 limit=$2
  shift 2
  [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]] && return 0
  local override="T_$name"
  limit=${!override:-$limit}
  local cmd=("$@")
  case " $INJECT " in
    *" $name:fail "*) cmd=(bash -c 'echo "injected failure (INJECT)" >&2; exit 3') ;;
    *" $name:hang "*) cmd=(sleep 100000) ;;
  esac
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < MIN_LEFT )); then
    : > "$OUT/$name.log"
    "$PY" benchmarks/gpu_tools.py record "$name" "$OUT/$name.log" -1 0 "$limit" "$OUT" \
      --skip-reason "skipped: ${left} s left of the ${BUDGET} s budget"
    FAILED=$(( FAILED + 1 ))
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit} s, $(( $(date +%s) - START )) s in): ${cmd[*]}"
  local t0=${EPOCHREALTIME/./}
  timeout -k 10 "$limit" "${cmd[@]}" > "$OUT/$name.log" 2>&1
  local rc=$?
  local us=$(( ${EPOCHREALTIME/./} - t0 ))
  "$PY" benchmarks/gpu_tools.py record "$name" "$OUT/$name.log" "$rc" "${us}e-6" "$limit" "$OUT"
  case $? in  # 0: its JSON kept; 10: an error record written; else the recorder itself broke
    0) ;;
    10) FAILED=$(( FAILED + 1 )) ;;
    *) printf '{"name": "%s", "error": "recording failed", "rc": %d}\n' "$name" "$rc" > "$OUT/$name.json"
       FAILED=$(( FAILED + 1 )) ;;
  esac
  return 0
}

MODEL=(--arch "$ARCH" --img-size "$IMG" --device "$DEVICE" --dtype "$DTYPE")
ATTN=()
[ -n "$ATTENTION" ] && ATTN=(--attention "$ATTENTION")

# 1. the train-step bench: gated/dense ratio, the distillation step's img/s and MFU
for b in $TRAIN_BATCHES; do
  measure "train_step_b$b" 75 "$PY" -m trainer.bench train-step "${MODEL[@]}" --gate dynamicvit --keep-ratio 0.7 \
    --batch-size "$b" --warmup "$WARMUP" --iters "$ITERS" --with-reference "${ATTN[@]}"
done
# 2. which attention kernels one gated step runs, and the peak memory at each batch size
measure profile 60 "$PY" benchmarks/profile_step.py "${MODEL[@]}" --gate dynamicvit --keep-ratio 0.7 \
  --batch-sizes $TRAIN_BATCHES ${ATTENTION:+--attention ${ATTENTION//,/ }}
# 3. inference, pruned vs dense (AS-ViT thresholds calibrated to the budget on the batch)
measure inference_dynamicvit 45 "$PY" -m trainer.bench inference "${MODEL[@]}" --gate dynamicvit --keep-ratio 0.7 \
  --batch-size "$INFER_BATCH" --warmup "$WARMUP" --iters "$INFER_ITERS"
measure inference_asvit 45 "$PY" -m trainer.bench inference "${MODEL[@]}" --gate asvit --flops-budget 0.65 \
  --batch-size "$INFER_BATCH" --warmup "$WARMUP" --iters "$INFER_ITERS"
# 4. the real loop on synthetic shards: DeepSpeed ZeRO-2, teacher, EMA; gated vs dense (prune.gate=none)
measure shards 45 "$PY" benchmarks/gpu_tools.py shards --images "$IMAGES" --workers "$WORKERS" --out "$WORK/data"
LOOP=("$PY" benchmarks/gpu_tools.py loop --arch "$ARCH" --img-size "$IMG" --kwargs "$KWARGS" --dtype "$DTYPE"
      --data "$WORK/data/shards" --batch-size "${TRAIN_BATCHES%% *}" --workers "$WORKERS" --steps "$STEPS"
      --log-every "$LOG_EVERY" --skip-windows "$SKIP_WINDOWS")
for kv in $LOOP_SET; do LOOP+=(--set "$kv"); done
measure loop_gated 100 "${LOOP[@]}" --gate dynamicvit --run-dir "$WORK/loop_gated"
measure loop_dense 90 "${LOOP[@]}" --gate none --run-dir "$WORK/loop_dense"
# 5. the data pipeline with every core: our shards vs timm's ImageFolder, same JPEGs and transforms
measure data 45 "$PY" -m trainer.bench data --data "$WORK/data/jpeg" --shards "$WORK/data/shards" --img-size "$IMG" \
  --workers "$WORKERS" --batch-size "${TRAIN_BATCHES%% *}" --images "$DATA_IMAGES"
# 6. the GPU tests, last (only the files that hold gpu-marked tests are collected)
GPU_TESTS=$(grep -l "mark\.gpu" tests/test_*.py | tr '\n' ' ')
measure pytest_gpu 90 "$PY" benchmarks/gpu_tools.py pytest --junit "$OUT/pytest_gpu.xml" -- -q -m gpu \
  -p no:cacheprovider $GPU_TESTS

"$PY" benchmarks/gpu_tools.py summary "$OUT" | tee "$OUT/summary.txt"
echo "== gpu.sh: $(( $(date +%s) - START )) s, $FAILED measurement(s) with an error record; results in $OUT"
[ "$FAILED" -eq 0 ]
