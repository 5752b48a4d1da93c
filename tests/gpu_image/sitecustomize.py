"""Only the GPU image's packages, on this machine: with COMPINV_GPU_IMAGE=1 and this folder first on
PYTHONPATH, importing a package installed here but absent from the GPU machine (packages.txt, plus
the wheels benchmarks/fetch_gpu_wheels.sh carries, benchmarks/gpu_wheels.txt) raises
ModuleNotFoundError, and importlib.util.find_spec says it is not there (libraries probe optional
packages that way). COMPINV_GPU_IMAGE_BLOCK=a,b blocks more distributions (tests show a check fails).
Stdlib and modules of no installed distribution are never blocked. Versions are not simulated."""

import os

if os.environ.get("COMPINV_GPU_IMAGE") == "1":
    import importlib.metadata
    import importlib.util
    import re
    import sys
    from pathlib import Path

    def _norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    _here = Path(__file__).resolve().parent
    _wheels = _here.parent.parent / "benchmarks" / "gpu_wheels.txt"
    _lines = (line.partition("#")[0].strip() for line in (_here / "packages.txt").read_text().splitlines())
    _allowed = {_norm(n) for n in _lines if n}
    _allowed |= {_norm(line.split("-")[0]) for line in _wheels.read_text().splitlines() if line.strip()}
    _allowed.add("compinv-rt")  # the project itself travels as the working tree
    _allowed -= {_norm(n) for n in os.environ.get("COMPINV_GPU_IMAGE_BLOCK", "").split(",") if n}
    _dists = importlib.metadata.packages_distributions()  # top-level module -> distributions

    def _blocked(name: str) -> bool:
        top = name.lstrip(".").partition(".")[0]
        dists = _dists.get(top)
        return bool(dists) and not any(_norm(d) in _allowed for d in dists)

    class _GpuImageFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if _blocked(name):
                raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image: "
                                          "tests/gpu_image/packages.txt)", name=name)
            return None

    _find_spec = importlib.util.find_spec

    def _find_spec_gpu_image(name, package=None):
        return None if not name.startswith(".") and _blocked(name) else _find_spec(name, package)

    importlib.util.find_spec = _find_spec_gpu_image
    sys.meta_path.insert(0, _GpuImageFinder())
