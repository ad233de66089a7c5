#!/usr/bin/env bash
# Every GPU measurement of DESIGN.md section 8 in one go, for a lent device machine (one call, < 10 min):
#   bash benchmarks/gpu.sh OUT_DIR
# writes OUT_DIR/*.json (one JSON object per measurement, with device, date and versions) and the logs.
# Commit the JSON under benchmarks/results/<date>-<device>/ and copy the numbers into README's table.
#
# The device image has torch, timm, accelerate and tensorboard but not deepspeed or webdataset: build their
# wheels here first and carry .whl along (the device tool's README says how):
#   pip wheel --no-deps --no-build-isolation deepspeed webdataset hjson pydantic pydantic-core \
#       braceexpand ninja py-cpuinfo annotated-types typing-inspection -w .whl
#
# Knobs (environment) so the same script smoke-tests on a CPU: ARCH, IMG, BATCH, TRAIN_BATCH, STEPS, IMAGES,
# WORKERS, DEVICE, DTYPE, KWARGS (a YAML mapping for model.kwargs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$OUT"
ARCH=${ARCH:-deit_base_patch16_384}
IMG=${IMG:-384}
BATCH=${BATCH:-64}              # inference batch (the issue's goal is stated at 64)
TRAIN_BATCH=${TRAIN_BATCH:-32}  # per-GPU training batch of the flagship recipe
STEPS=${STEPS:-40}
IMAGES=${IMAGES:-3000}
WORKERS=${WORKERS:-$(nproc)}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
KWARGS=${KWARGS:-"{}"}
PY=${PY:-python}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

if ! $PY -c "import deepspeed, webdataset" 2>/dev/null; then
  $PY -m pip install -q --no-deps .whl/*.whl
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
$PY - > "$OUT/env.json" <<'EOF'
import datetime, json, platform, torch, timm, deepspeed, webdataset
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
print(json.dumps({"date": datetime.date.today().isoformat(), "device": dev, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "timm": timm.__version__, "deepspeed": deepspeed.__version__,
                  "webdataset": webdataset.__version__, "python": platform.python_version()}))
EOF
cat "$OUT/env.json"

echo "== GPU tests (pytest -m gpu)"
$PY -m pytest -q -m gpu -p no:cacheprovider --junitxml "$OUT/pytest_gpu.xml" 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt" || true

bench() {  # bench NAME ARGS...: one JSON line from trainer.bench, kept as OUT/NAME.json
  local name=$1; shift
  echo "== $name"
  $PY -m trainer.bench "$@" | tail -1 | tee "$OUT/$name.json"
}
bench inference_dynamicvit inference --arch "$ARCH" --img-size "$IMG" --gate dynamicvit --keep-ratio 0.7 \
  --batch-size "$BATCH" --device "$DEVICE" --dtype "$DTYPE"
bench inference_asvit inference --arch "$ARCH" --img-size "$IMG" --gate asvit --flops-budget 0.65 \
  --batch-size "$BATCH" --device "$DEVICE" --dtype "$DTYPE"
bench train_step_dynamicvit train-step --arch "$ARCH" --img-size "$IMG" --gate dynamicvit --keep-ratio 0.7 \
  --batch-size "$TRAIN_BATCH" --device "$DEVICE" --dtype "$DTYPE" --with-reference

echo "== synthetic JPEG shards ($IMAGES images)"
$PY -c "from data.bench import make_synthetic_folder; make_synthetic_folder('$SCRATCH/jpeg', $IMAGES)"
# at least two shards per loader worker (the stream plan needs one per worker; ImageNet has 1281)
$PY -m data.convert "$SCRATCH/jpeg" "$SCRATCH/shards" --workers "$WORKERS" \
  --shard-size $(( (IMAGES + 2 * WORKERS - 1) / (2 * WORKERS) )) >/dev/null
bench data data --data "$SCRATCH/jpeg" --shards "$SCRATCH/shards" --img-size "$IMG" --workers "$WORKERS" \
  --batch-size "$TRAIN_BATCH"

echo "== the real loop: DeepSpeed ZeRO-2 $DTYPE, student + teacher, $STEPS steps on the shards"
# torchrun with one rank is what `deepspeed --num_gpus 1` does; the run dir (optimizer states of DeiT-B) stays
# in scratch, only its metrics come back.
$PY -m torch.distributed.run --nproc_per_node 1 -m trainer.train \
  --config trainer/configs/deit_b384_dynamicvit.yaml \
  --set model.arch="$ARCH" --set model.img_size="$IMG" --set model.kwargs="$KWARGS" --set model.checkpoint= \
  --set model.num_classes=1000 --set data.train="$SCRATCH/shards" --set data.val= \
  --set data.batch_size="$TRAIN_BATCH" --set data.workers="$WORKERS" --set data.shuffle_buffer=256 \
  --set train.steps="$STEPS" --set log.every=10 --set log.tensorboard=false --set log.progress=lines \
  --set ckpt.every=0 --set precision="$DTYPE" --set run.dir="$SCRATCH/loop" 2>&1 | tail -20 | tee "$OUT/loop.txt"
$PY - "$SCRATCH/loop" "$OUT/train_loop_zero2.json" "$TRAIN_BATCH" "$OUT/train_step_dynamicvit.json" <<'EOF'
import json, sys
from trainer.loop.metrics import read_metrics
run, out, batch, step_bench = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.load(open(sys.argv[4]))
train = read_metrics(run)
steady = train[1:] or train  # the first window holds start-up (compilation, loader warm-up)
result = {"batch_size": batch, "windows": len(train),
          "img_per_s": round(sum(r["img_per_s"] for r in steady) / len(steady), 2),
          "data_wait_fraction": round(sum(r["data_wait_fraction"] for r in steady) / len(steady), 4),
          "summary": json.load(open(f"{run}/summary.json"))}
# Model FLOPs per image (gated student fwd+bwd + teacher fwd) come from the train-step bench of the same
# model; the loop's MFU is its img/s at those FLOPs over the same peak.
tflop_per_img = step_bench["step_tflop_per_s"] / step_bench["step_img_s"]
result["tflop_per_s"] = round(result["img_per_s"] * tflop_per_img, 3)
if "mfu" in step_bench:
    result["mfu"] = round(step_bench["mfu"] * result["tflop_per_s"] / step_bench["step_tflop_per_s"], 4)
json.dump(result, open(out, "w"))
print(json.dumps(result))
EOF
