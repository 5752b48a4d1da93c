#!/usr/bin/env bash
# The GPU user's path in one command, inside one device call (see benchmarks/gpu.md):
#   benchmarks/gpu_smoke.sh [--device cuda|cpu] [--quick] [--check-only] [OUT]
# OUT defaults to $OUT (the device tool's folder), else outputs/gpu_smoke. Everything, the wheel
# install included, fits in BUDGET seconds (default 540: the call's 600 s less a margin); a step
# starts only with >= 10 s left, its timeout is cut to what is left (kill 5 s after), and a step that
# cannot start is recorded as skipped. On a machine without diffusers / pydantic (the GPU image) it
# installs the wheels carried in .whl/ (benchmarks/fetch_gpu_wheels.sh) into /tmp/site; then a
# pre-flight (benchmarks/gpu_smoke.py preflight) prints the carried upload's size and imports every
# module the commands import, failing in seconds with one `error:` line. Results go to OUT as they
# come (6 files, at most 2 folders down, as the device tool returns them): summary.jsonl (one line
# per step, the moment it ends), steps.log (every command's output, live), doctor.txt, and
# bench/results.{json,md,png} (rewritten after every cell). `--device cpu`: the same steps, lighter
# where only a GPU needs the weight. `--quick` (tests/test_gpu_scripts.py): 1 image, 2 steps, no
# compile / AOTInductor steps; `--check-only`: install + pre-flight, then stop.
set -uo pipefail
T0=$(date +%s)
BUDGET=${BUDGET:-540}
DEADLINE=$(( T0 + BUDGET ))
DEVICE=cuda QUICK=0 CHECK_ONLY=0
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --device) DEVICE=${2:-}; shift 2 || shift ;;
    --quick) QUICK=1; shift ;;
    --check-only) CHECK_ONLY=1; shift ;;
    *) echo "error: unknown option $1 (usage: gpu_smoke.sh [--device cuda|cpu] [--quick] [--check-only] [OUT])" >&2
       exit 1 ;;
  esac
done
OUT=$(realpath -m "${1:-${OUT:-outputs/gpu_smoke}}")
# device check, wheel install, pre-flight import check (shared with gpu_smoke.sh / world_gpu.sh)
source "$(dirname "$0")/gpu_prelude.sh"
(( CHECK_ONLY )) && exit 0

WORK=$(mktemp -d /tmp/gpu-smoke.XXXX)
trap 'rm -rf "$WORK"' EXIT
export COMPINV_CACHE=$WORK/cache
N=2
if [[ $DEVICE == cuda* ]]; then
  PREC=fp16; ARCH=sd15; GEN_STEPS=20; BENCH_STEPS=10; COMPILE_S=180 AOTI_S=210; ONE_GRAPH=()
else
  # On a shared 2-core CPU Inductor took 174 s per graph of the tiny UNet (benchmarks/gpu.md): the
  # compile step keeps the bias on every step there, one graph instead of two (with and without).
  PREC=auto; ARCH=sd15-proxy; GEN_STEPS=10; BENCH_STEPS=4; COMPILE_S=240 AOTI_S=210; ONE_GRAPH=(--bias-steps 1.0)
fi
(( QUICK )) && { N=1; GEN_STEPS=2; BENCH_STEPS=2; }
CLI=($PY -m compinv_rt.apps.cli)
PROMPT="a red star and a blue circle on grass"
LAYOUT="star=0.05,0.2,0.5,0.8;circle=0.55,0.2,0.95,0.8"
GEN=(generate "$PROMPT" -n $N --steps $GEN_STEPS --seed 1)

# step NAME TIMEOUT CHECK CHECK_ARGS... -- COMMAND...   (runs in $WORK: engines/ land there)
step() {
  local name=$1 limit=$2 check=$3; shift 3
  local args=(); while [[ $1 != -- ]]; do args+=("$1"); shift; done; shift
  # 15 s stay back: the 5 s kill-after, the check (~2 s) and the last lines.
  local left=$(( DEADLINE - $(date +%s) - 15 ))
  local own=$(( limit < left ? limit : left ))
  if (( own < 10 )); then
    timeout 10 $PY benchmarks/gpu_smoke.py none "$OUT" "$name" skipped $(( DEADLINE - $(date +%s) ))
    return
  fi
  echo "=== $name (timeout ${own}s): $*" >> "$OUT/steps.log"
  local t0=$(date +%s%N)
  (cd "$WORK" && timeout --kill-after=5 $own "$@") 2>&1 | tee -a "$OUT/steps.log" > "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  local dt=$(( ($(date +%s%N) - t0) / 1000000 ))
  ERROR_LOG="$WORK/$name.log" timeout 10 $PY benchmarks/gpu_smoke.py "$check" "$OUT" "$name" "$rc" "$dt" "${args[@]}"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || lscpu | grep 'Model name'
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/doctor.txt" 2>&1
step doctor 60 none -- "${CLI[@]}" doctor
cat "$WORK/doctor.log" >> "$OUT/doctor.txt"
# CPU fp32 reference, then the device at its precision: the same seeds, compared image by image
# (on --device cpu the reference is the device run).
step generate_cpu_ref 90 generated "$WORK/ref" -- "${CLI[@]}" "${GEN[@]}" --device cpu --out "$WORK/ref"
[[ $DEVICE != cpu ]] && step generate_device 60 compare "$WORK/dev" "$WORK/ref" -- \
  "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" --precision $PREC --out "$WORK/dev"
step save_attention 60 generated "$WORK/attn" -- "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" \
  --precision $PREC --layout "$LAYOUT" --spatial bias --save-attention --out "$WORK/attn"
# onnxruntime reports the provider that ran (sidecar "provider"), or refuses with one error line
# when this onnxruntime cannot serve the device (the GPU image's wheel is the CPU one).
step onnxruntime 90 generated "$WORK/ort" -- "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" \
  --precision $PREC --backend onnxruntime --out "$WORK/ort"
# DeepCache on the device: an engine with both graphs (full + shallow), a full step every 2.
step deep_cache_onnxruntime 90 generated "$WORK/dcache" -- "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" \
  --precision $PREC --backend onnxruntime --cache-interval 2 --out "$WORK/dcache"
step world_photos 30 none -- "${CLI[@]}" world photos --out "$WORK/photos" --shape star \
  --colour yellow --pattern striped --background sky --count 4
step train_steps 90 trained "$WORK/concept" -- "${CLI[@]}" train --images "$WORK/photos" \
  --token "<my-star>" --class-word star --out "$WORK/concept" --steps $(( QUICK ? 2 : 20 )) --batch 2 \
  --variants 2 --no-augment --checkpoint-every 10 --device "$DEVICE" --format both
# The compiled backends last among the paths: minutes of compilation on a CPU.
if (( ! QUICK )); then
  step spatial_compile $COMPILE_S generated "$WORK/compile" -- "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" \
    --precision $PREC --layout "$LAYOUT" --spatial bias "${ONE_GRAPH[@]}" --backend compile --out "$WORK/compile"
  step spatial_aoti $AOTI_S generated "$WORK/aoti" -- "${CLI[@]}" "${GEN[@]}" --device "$DEVICE" \
    --precision $PREC --layout "$LAYOUT" --spatial bias --backend aoti --out "$WORK/aoti"
fi
# One SD 1.5-shape latency cell per uncompiled backend (1 image = UNet batch 2, bias on) vs stock
# diffusers eager, in what is left of the budget. The compiled SD 1.5 cells (minutes of compile
# each) and the compiled stock baseline are benchmarks/gpu.sh's run, which has its own budget.
BACKENDS=torch,onnxruntime
$PY -c "import tensorrt" 2>/dev/null && BACKENDS=$BACKENDS,tensorrt
step bench_sd15 540 bench "$OUT/bench" -- "${CLI[@]}" bench --arch $ARCH --device "$DEVICE" \
  --precisions $PREC --backends $BACKENDS --batch-sizes 1 --bias on --steps $BENCH_STEPS --repeats 2 \
  --baseline eager --engines "$WORK/engines" --out "$OUT/bench"
echo "total $(( $(date +%s) - T0 )) s of the $BUDGET s budget; summary: $OUT/summary.jsonl" | tee -a "$OUT/steps.log"
