#!/usr/bin/env bash
# The GPU latency benchmark (the issue's targets: <= 5 ms per guided step for one 512x512 image,
# >= 400 image-steps/s at 16 images, bias cost <= 1 %), for a machine with torch + CUDA but no
# network and no diffusers: installs the slim wheels carried in .whl/ (fetch_gpu_wheels.sh:
# diffusers + the CLIP vocabulary; the image has everything else) into /tmp/site, then measures an
# SD 1.5-shaped model (random weights, identical shapes) in fp16: eager, torch.compile (CUDA
# graphs) and AOTInductor (+ TensorRT where installed), bias off/on, against stock diffusers +
# torch.compile with the same compile settings, in the same run. The report is rewritten after
# every cell, so a run cut by the timeout keeps what it measured. Usage: benchmarks/gpu.sh OUT_DIR
# (the quicker end-to-end check of every GPU path is benchmarks/gpu_smoke.sh).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: benchmarks/gpu.sh OUT_DIR}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 COMPINV_CACHE=/tmp/compinv-cache HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
$PY -m compinv_rt.cli doctor >> "$OUT/gpu.txt" 2>&1
BACKENDS=torch,compile,aoti
$PY -c "import tensorrt" 2>/dev/null && BACKENDS=$BACKENDS,tensorrt
# 1 image (UNet batch 2) for latency, 16 (UNet batch 32) for throughput; one compile per backend
# and bias state (dynamic batch), one AOTI package per batch size.
timeout --kill-after=10 560 $PY -m compinv_rt.cli bench --arch sd15 --device cuda --precisions fp16 \
  --backends $BACKENDS --batch-sizes 1,16 --steps 20 --repeats 3 --bias off,on \
  --baseline compiled --engines /tmp/engines --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench exit code $? (124: timed out; results.* hold the cells measured until then)" >> "$OUT/bench.log"
