#!/usr/bin/env bash
# The GPU benchmark in one script, for a machine with torch + CUDA but no network and no
# diffusers: installs the wheels carried in .whl/ (see fetch_gpu_wheels.sh) into a private
# site folder, then measures an SD 1.5-shaped UNet (random weights, identical shapes), fp16,
# eager vs torch.compile (CUDA graphs) vs AOTInductor, bias off/on, against stock diffusers
# in the same run. Budget: <= 8 minutes on an H100/H200. Usage: benchmarks/gpu.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 COMPINV_CACHE=/tmp/compinv-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m compinv_rt.cli doctor | tee "$OUT/doctor.txt"
# UNet batch 2 (one guided image) for latency; 16 and 32 (8 and 16 images) for throughput.
timeout 460 python3 -m compinv_rt.cli bench --arch sd15 --device cuda \
  --backends torch,compile,aoti --batch-sizes 1,8,16 --steps 20 --repeats 3 \
  --bias off,on --baseline compiled --engines /tmp/engines --out "$OUT" 2>&1 | tee "$OUT/bench.log"
