#!/usr/bin/env bash
# World model training on a GPU in one device call: fine-tunes the GROWN architecture (--attn16:
# cross-attention at 16x16 too; its new blocks start as the identity) from the embedded model:
# latent cache of training scenes with the shipped VAE, UNet + text encoder (bf16 autocast, batch
# 512 on CUDA), stopped by `world train --max-minutes` at a wall-clock deadline that leaves room for
# the export and a score cut to fit. Everything, the wheel install included, fits in BUDGET seconds
# (default 540: the call's 600 s less a margin).
#   benchmarks/world_gpu.sh [--device cuda|cpu] [OUT]     (OUT: $OUT, else outputs/world_gpu)
# OUT receives, as each is produced (<= 8 files, flat, as the device tool returns them):
# summary.jsonl (one line per step), steps.log (live), recipe.json + ema_snapshot.safetensors (the
# EMA UNet + text encoder in fp16, < 16 MiB: `world export --run-dir DIR --weights
# OUT/ema_snapshot.safetensors --out MODEL`, DIR holding OUT's recipe.json, rebuilds the model),
# score.md and score.json. The run folder (latent cache, full checkpoint) is outputs/world_gpu_run
# (git-ignored; it does not come back: its useful part is in OUT). `--device cpu`: the same steps,
# sized for a CPU (tests and the CPU run in benchmarks/gpu.md).
set -uo pipefail
T0=$(date +%s)
BUDGET=${BUDGET:-540}
DEADLINE=$(( T0 + BUDGET ))
DEVICE=cuda
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --device) DEVICE=${2:-}; shift 2 || shift ;;
    *) echo "error: unknown option $1 (usage: world_gpu.sh [--device cuda|cpu] [OUT])" >&2; exit 1 ;;
  esac
done
OUT=$(realpath -m "${1:-${OUT:-outputs/world_gpu}}")
# device check, wheel install, pre-flight import check (shared with gpu_smoke.sh / world_gpu.sh)
source "$(dirname "$0")/gpu_prelude.sh"

RUN=$ROOT/outputs/world_gpu_run
rm -rf "$RUN"
CLI=($PY -m compinv_rt.apps.cli world)
if [[ $DEVICE == cuda* ]]; then
  # batch 512 at lr 3e-4: the CPU recipe (batch 32) with 16x the samples per step. The cache is
  # rendered on the CPU, one process: 8,000 scenes (a quarter of the CPU run's) to leave time to train.
  TRAIN=(--precision bf16 --threads 8 --unet-batch 512 --unet-steps 3000 --unet-lr 3e-4 --warmup 100
         --cache-scenes 8000 --ckpt-every 250 --snapshot-every 500)
  SCORE=(--kinds single,two,two-patterns,three,positioned --prompts-per-kind 10 -k 2 --threads 16)
  EXPORT_S=45 SCORE_S=120
else
  TRAIN=(--precision fp32 --threads 1 --unet-batch 8 --unet-steps 1000 --unet-lr 3e-4 --warmup 20
         --cache-scenes 256 --ckpt-every 100 --snapshot-every 100)
  SCORE=(--kinds single,two --prompts-per-kind 4 -k 1 --steps 10 --threads 1)
  EXPORT_S=40 SCORE_S=60  # measured on the shared 2-core CPU: 14 s and 18 s (benchmarks/gpu.md)
fi

# record STEP RC SECONDS [EXTRA_JSON]: one summary line
record() {
  printf '{"step": "%s", "rc": %s, "ok": %s, "timed_out": %s, "seconds": %s%s}\n' "$1" "$2" \
    "$([[ $2 == 0 ]] && echo true || echo false)" "$([[ $2 == 124 || $2 == 137 ]] && echo true || echo false)" \
    "$3" "${4:+, $4}" >> "$OUT/summary.jsonl"
}
# run NAME TIMEOUT COMMAND...: output to steps.log live, kill 5 s after the timeout
run() {
  local name=$1 limit=$2; shift 2
  echo "=== $name (timeout ${limit}s): $*" >> "$OUT/steps.log"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >> "$OUT/steps.log" 2>&1
  local rc=$?
  LAST_RC=$rc LAST_S=$(( $(date +%s) - t0 ))
}

# Training gets what the export and the score leave (15 s margin); --max-minutes counts from the
# command's start (the cache stage included), and the hard timeout adds 45 s for the last
# checkpoint + snapshot it writes at the step it stops.
LEFT=$(( DEADLINE - $(date +%s) - EXPORT_S - SCORE_S - 15 ))
MAXMIN=$(awk "BEGIN {printf \"%.2f\", ($LEFT - 45) / 60}")
run train $LEFT "${CLI[@]}" train --run-dir "$RUN" --init-from compinv_rt/embedded/shapes_sd --attn16 \
  --device "$DEVICE" --procs 1 --stages cache,unet --max-minutes "$MAXMIN" "${TRAIN[@]}"
SNAP=$(ls "$RUN"/snapshots/step*.safetensors 2>/dev/null | tail -1)
SPS=$(grep -o 's_per_step=[0-9.]*' "$OUT/steps.log" | tail -1 | cut -d= -f2)
[[ -n $SNAP ]] && cp "$SNAP" "$OUT/ema_snapshot.safetensors" && cp "$RUN/recipe.json" "$OUT/recipe.json"
STEPS=$(basename "${SNAP:-step0}" .safetensors | sed 's/^step0*//')
record train $LAST_RC $LAST_S "\"max_minutes\": $MAXMIN, \"steps\": ${STEPS:-0}, \"s_per_step\": ${SPS:-null}"

run export $(( EXPORT_S < DEADLINE - $(date +%s) - 10 ? EXPORT_S : DEADLINE - $(date +%s) - 10 )) \
  "${CLI[@]}" export --run-dir "$RUN" --out "$RUN/model"
record export $LAST_RC $LAST_S

LEFT=$(( DEADLINE - $(date +%s) - 10 ))
if (( LEFT >= 20 )) && [[ -f $RUN/model/model_index.json ]]; then
  run score $LEFT "${CLI[@]}" score --model "$RUN/model" "${SCORE[@]}" --out "$RUN/score"
  cp "$RUN"/score/score.{md,json} "$OUT"/ 2>/dev/null
  EXACT=$($PY -c "import json, sys; s = json.load(open(sys.argv[1]))['summary']
print(json.dumps({k: v['exact'] for k, v in s.items()}))" "$OUT/score.json" 2>/dev/null)
  record score $LAST_RC $LAST_S "\"args\": \"${SCORE[*]}\", \"exact\": ${EXACT:-null}"
else
  record score 1 0 "\"skipped\": \"$LEFT s left or no model\""
fi
echo "total $(( $(date +%s) - T0 )) s of the $BUDGET s budget; summary: $OUT/summary.jsonl" | tee -a "$OUT/steps.log"
