#!/usr/bin/env bash
# Run on a development machine (network to PyPI): downloads the wheels the GPU machine lacks into
# .whl/ (git-ignored via .git/info/exclude), for its Python 3.12 / x86_64, and records their names
# and sizes in benchmarks/gpu_wheels.txt (tests/test_gpu_scripts.py sizes the upload from it when
# .whl/ is absent). The GPU image (KINDS.md's package list) already has torch, triton,
# transformers, huggingface_hub, safetensors, numpy, pillow, regex, filelock, requests,
# typer/click/rich, tqdm, matplotlib, onnx, onnxscript, onnxruntime (CPU) and typing_extensions.
# It lacks, and the project imports:
# - diffusers 0.42.1 (needs huggingface_hub>=1.32: the image's 1.33 fits);
# - pydantic (compinv_rt/core/schemas.py, reached from every command) with pydantic_core,
#   annotated_types, typing_inspection, and typing_extensions (pydantic 2.14 needs a newer one
#   than the image may have; carried copies go first on PYTHONPATH, so keep it);
# - polygraphy + onnx_graphsurgeon (constant folding in the ONNX export);
# - open-clip-torch: only for the CLIP BPE vocabulary file it ships (installed, never imported).
# Carrying more hides the image's own packages (an older huggingface_hub did): only these.
# Versions are requirements.txt's pins (pydantic_core: the one pydantic 2.14.4 requires).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 open-clip-torch==3.3.0 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
        polygraphy==0.53.6 onnx-graphsurgeon==0.6.1)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "${WHEELS[@]}"
(cd .whl && stat -c '%n %s' *.whl) > benchmarks/gpu_wheels.txt
du -ch .whl/*.whl | tail -1
