#!/usr/bin/env bash
# The GPU user's path in one command, <= 10 minutes on an H100/H200 (see benchmarks/gpu.md):
#   benchmarks/gpu_smoke.sh [--device cuda|cpu] [OUT]        (OUT defaults to $OUT, the device
#                                                              tool's folder, else outputs/gpu_smoke)
# On a machine with torch + CUDA and no network or diffusers it installs the wheels carried in
# .whl/ (benchmarks/fetch_gpu_wheels.sh: diffusers + the CLIP vocabulary, ~6 MB) into /tmp/site.
# Every step has its own timeout and appends one JSON line to OUT/summary.jsonl when it ends
# (benchmarks/gpu_smoke.py reads its outputs); logs go to OUT/steps.log; the bench step rewrites
# OUT/bench/results.{json,md,png} after every cell. `--device cpu` runs the same steps on the
# embedded model and the narrow SD 1.5-topology proxy, so only the GPU can surprise it.
set -uo pipefail
DEVICE=cuda
if [[ "${1:-}" == --device ]]; then DEVICE=$2; shift 2; fi
OUT=$(realpath -m "${1:-${OUT:-outputs/gpu_smoke}}")
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUT"
: > "$OUT/summary.jsonl"; : > "$OUT/steps.log"
WORK=$(mktemp -d /tmp/gpu-smoke.XXXX)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COMPINV_CACHE=$WORK/cache

if ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "error: no diffusers and no wheels in .whl/" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

# Timeouts are sized for an H100/H200 with 16 cores (the budget: 10 minutes in all); on a CPU the
# compile and AOTInductor steps take minutes each, so there every timeout is multiplied by
# TSCALE (default 4) and the run is a documented benchmark, not a CI step.
if [[ $DEVICE == cuda* ]]; then
  PREC=fp16; ARCH=sd15; GEN_STEPS=20; TSCALE=${TSCALE:-1}
else
  PREC=auto; ARCH=sd15-proxy; GEN_STEPS=10; TSCALE=${TSCALE:-4}
fi
CLI=($PY -m compinv_rt.cli)
PROMPT="a red star and a blue circle on grass"
LAYOUT="star=0.05,0.2,0.5,0.8;circle=0.55,0.2,0.95,0.8"
GEN=(generate "$PROMPT" -n 2 --steps $GEN_STEPS --seed 1)

# step NAME TIMEOUT CHECK CHECK_ARGS... -- COMMAND...   (runs in $WORK: engines/ land there)
step() {
  local name=$1 limit=$2 check=$3; shift 3
  local args=(); while [[ $1 != -- ]]; do args+=("$1"); shift; done; shift
  local t0=$(date +%s%N)
  # Its own timeout, cut to what is left of the whole run's budget (590 s x TSCALE).
  local left=$(( DEADLINE - $(date +%s) )) own=$(( limit * TSCALE ))
  (( own > left )) && own=$left
  (( own < 1 )) && own=1
  echo "=== $name (timeout ${own}s): $*" >> "$OUT/steps.log"
  (cd "$WORK" && timeout --kill-after=10 $own "$@") > "$WORK/$name.log" 2>&1
  local rc=$?
  local dt=$(( ($(date +%s%N) - t0) / 1000000 ))
  cat "$WORK/$name.log" >> "$OUT/steps.log"
  ERROR_LOG="$WORK/$name.log" $PY "$ROOT/benchmarks/gpu_smoke.py" "$check" "$OUT" "$name" "$rc" "$dt" "${args[@]}"
}

T0=$(date +%s)
DEADLINE=$(( T0 + 590 * TSCALE ))
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || lscpu | grep 'Model name'
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/doctor.txt" 2>&1
step doctor 60 none -- "${CLI[@]}" doctor
cat "$WORK/doctor.log" >> "$OUT/doctor.txt"
# CPU fp32 reference, then the device at its precision: the same seeds, compared image by image.
step generate_cpu_ref 180 generated "$WORK/ref" -- "${CLI[@]}" "${GEN[@]}" --device cpu --out "$WORK/ref"
step generate_device 120 compare "$WORK/dev" "$WORK/ref" -- \
  "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" --precision $PREC --out "$WORK/dev"
step save_attention 120 generated "$WORK/attn" -- "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" \
  --precision $PREC --layout "$LAYOUT" --spatial bias --save-attention --out "$WORK/attn"
step spatial_compile 180 generated "$WORK/compile" -- "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" \
  --precision $PREC --layout "$LAYOUT" --spatial bias --backend compile --out "$WORK/compile"
step spatial_aoti 240 generated "$WORK/aoti" -- "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" \
  --precision $PREC --layout "$LAYOUT" --spatial bias --backend aoti --out "$WORK/aoti"
# onnxruntime reports the provider that ran (sidecar "provider"), or refuses with one error line
# when this onnxruntime cannot serve the device (the GPU image's wheel is the CPU one).
step onnxruntime 120 generated "$WORK/ort" -- "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" \
  --precision $PREC --backend onnxruntime --out "$WORK/ort"
step world_photos 60 none -- "${CLI[@]}" world photos --out "$WORK/photos" --shape star \
  --colour yellow --pattern striped --background sky --count 4
step train_20_steps 180 trained "$WORK/concept" -- "${CLI[@]}" train --images "$WORK/photos" \
  --token "<my-star>" --class-word star --out "$WORK/concept" --steps 20 --batch 2 --variants 2 \
  --no-augment --checkpoint-every 10 --device "$DEVICE" --format both
# One SD 1.5-shape latency cell per backend (1 image = UNet batch 2, bias on) vs stock diffusers +
# torch.compile with the same compile settings, in the same run: what is left of the budget.
BACKENDS=torch,compile,aoti,onnxruntime
$PY -c "import tensorrt" 2>/dev/null && BACKENDS=$BACKENDS,tensorrt
step bench_sd15 590 bench "$OUT/bench" -- "${CLI[@]}" bench --arch $ARCH --device "$DEVICE" \
  --precisions $PREC --backends $BACKENDS --batch-sizes 1 --bias on --steps 10 --repeats 2 \
  --baseline compiled --engines "$WORK/engines" --out "$OUT/bench"
echo "total $(( $(date +%s) - T0 )) s; summary: $OUT/summary.jsonl" | tee -a "$OUT/steps.log"
rm -rf "$WORK"
