#!/usr/bin/env bash
# Run on a development machine (network to PyPI): downloads the wheels the GPU machine lacks into
# .whl/ (git-ignored via .git/info/exclude), for its Python 3.12 / x86_64. Only two: the GPU
# image already has torch, triton, transformers 5.17, huggingface_hub 1.33, safetensors, numpy,
# pillow, regex, filelock, requests, typer/click/rich, tqdm, matplotlib and onnxruntime (CPU).
# Carrying more hides the image's own packages (an older huggingface_hub did, and needed a
# package the image lacks). diffusers 0.42.1 needs huggingface_hub>=1.32 (the image's 1.33 fits)
# and imports importlib_metadata only on Python < 3.8. open-clip-torch ships the CLIP BPE
# vocabulary; it is installed but never imported (its dependencies are not carried).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl diffusers==0.42.1 open-clip-torch==3.3.0
du -ch .whl/*.whl | tail -1
