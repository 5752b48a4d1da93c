#!/usr/bin/env bash
# Run on a development machine (network to PyPI): downloads the wheels the GPU machine lacks into
# .whl/ (git-ignored via .git/info/exclude), for its Python 3.12 / x86_64. The GPU machine has
# torch, triton, transformers, numpy and onnxruntime already (see shared/notes/environment.md).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
fetch() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$@"
}
fetch diffusers==0.42.1 typer==0.29.1 click rich shellingham markdown-it-py mdurl pygments \
      tqdm==4.70.1 safetensors==0.8.0 huggingface_hub==2.4.0 filelock regex importlib_metadata \
      zipp pillow==13.0.0 matplotlib==3.11.2 contourpy cycler fonttools kiwisolver pyparsing \
      python-dateutil six open-clip-torch==3.3.0
ls .whl | wc -l
