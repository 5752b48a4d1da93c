#!/usr/bin/env bash
# World v2 on a GPU machine in one script (budget: ~12 minutes of a 15-minute loan): latent cache of
# the shipped VAE, UNet + text encoder continued from the shipped model (or from the committed
# compact checkpoint) with bf16 autocast and large batches, EMA snapshot, compact checkpoint and
# export, then the judge's scores on CPU. Wheels the machine lacks: see gpu.sh / fetch_gpu_wheels.sh.
# Not yet run on a GPU (the session that wrote it had none): check s/step in train.log first.
# Usage: benchmarks/world_gpu.sh OUT_DIR [UNET_STEPS]
set -euo pipefail
OUT=${1:?usage: benchmarks/world_gpu.sh OUT_DIR [UNET_STEPS]}
STEPS=${2:-3000}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
CLI="python3 -m compinv_rt.cli world"
RUN=/tmp/world-v2run
CKPT=benchmarks/world/v2_checkpoint/unet_ckpt.safetensors
RESUME=()
[ -f "$CKPT" ] && RESUME=(--resume-from "$CKPT")
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# batch 512 at lr 3e-4: the CPU run's recipe (batch 32) with 16x the samples per step
ARGS=(--run-dir "$RUN" --init-from compinv_rt/embedded/shapes_sd --device cuda --precision bf16
      --procs 1 --threads 8 --unet-batch 512 --unet-steps "$STEPS" --unet-lr 3e-4 --warmup 100
      --cache-scenes 32000 --ckpt-every 250 --snapshot-every 500)
timeout 540 $CLI train "${ARGS[@]}" "${RESUME[@]}" --stages cache,unet 2>&1 | tee "$OUT/train.log" || true
$CLI checkpoint --run-dir "$RUN" --out "$OUT/unet_ckpt.safetensors"
$CLI train "${ARGS[@]}" --stages export --out "$OUT/model"
timeout 240 $CLI score --model "$OUT/model" --kinds single,two,two-patterns,three,positioned \
  --prompts-per-kind 25 -k 5 --threads 16 --out "$OUT/score" | tee "$OUT/score.md"
