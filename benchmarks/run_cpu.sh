#!/usr/bin/env bash
# Every CPU benchmark recorded in benchmarks/backends.md and benchmarks/README.md, in one go, on the
# embedded model. Run on a quiet machine (nothing else busy): .venv/bin/... timings are wall clock.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CLI=.venv/bin/compinv-rt
# --help latency (issue: < 2 s)
for i in 1 2 3; do /usr/bin/time -f "%e s" $CLI --help >/dev/null; done 2>&1 | tee "$OUT/help.txt"
# Backends vs stock diffusers: 8 images x 25 steps (and 1 image), bias off/on.
$CLI bench --backends torch,compile,onnxruntime,aoti --batch-sizes 1,8 --steps 25 --repeats 3 \
  --engines "$OUT/engines" --out "$OUT/backends" 2>"$OUT/backends.log"
# `generate --jobs` throughput at --max-batch 1/4/8 vs stock diffusers, one call per job.
.venv/bin/python benchmarks/jobs_bench.py throughput --jobs 64 --steps 25 --out "$OUT" | tee "$OUT/jobs-throughput.md"
# 2,000 jobs: peak RSS at 100 and at 2,000 images.
.venv/bin/python benchmarks/jobs_bench.py memory --jobs 2000 --steps 10 --out "$OUT" | tee "$OUT/jobs-memory.txt"
# Ray: 1 vs 2 local workers.
.venv/bin/python benchmarks/jobs_bench.py ray --jobs 64 --steps 25 --out "$OUT" | tee "$OUT/jobs-ray.md"
