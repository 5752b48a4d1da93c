# Sourced by gpu_smoke.sh and world_gpu.sh after they set DEVICE and OUT: checks the device, makes
# OUT, installs the carried wheels when the image lacks diffusers/pydantic, and runs the pre-flight
# import check (one `error:` line and exit 1 within seconds when a carried command could not run).
[[ $DEVICE == cpu || $DEVICE == cuda || $DEVICE == cuda:[0-9]* ]] || {
  echo "error: --device must be cuda, cuda:N or cpu, got '$DEVICE'" >&2; exit 1; }
PY=${PYTHON:-python3}
[[ $PY == */* ]] && PY=$(realpath -s "$PY")  # steps run in another folder; -s: keep a venv's link
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUT" && : > "$OUT/summary.jsonl" && : > "$OUT/steps.log" || {
  echo "error: cannot write to $OUT" >&2; exit 1; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if ! $PY -c "import diffusers, pydantic, polygraphy, onnx_graphsurgeon" 2>/dev/null; then
  ls .whl/*.whl > /dev/null 2>&1 || {
    echo "error: diffusers/pydantic missing and no wheels in .whl/ (run benchmarks/fetch_gpu_wheels.sh, carry .whl)" >&2
    exit 1; }
  timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "${GPU_SITE:-/tmp/site}" .whl/*.whl >> "$OUT/steps.log" 2>&1 || {
    echo "error: installing the wheels in .whl/ failed (see $OUT/steps.log)" >&2; exit 1; }
  export PYTHONPATH=${GPU_SITE:-/tmp/site}:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
ERR=$(mktemp)  # the pre-flight's stderr: library warnings, and its one `error:` line
timeout 90 $PY benchmarks/gpu_smoke.py preflight "$OUT" 2> "$ERR" | tee -a "$OUT/steps.log"
RC=${PIPESTATUS[0]}
cat "$ERR" >> "$OUT/steps.log"
if (( RC )); then
  grep -m1 '^error:' "$ERR" >&2 || echo "error: pre-flight failed (exit $RC; 124: over 90 s), see $OUT/steps.log" >&2
  exit 1
fi
rm -f "$ERR"
