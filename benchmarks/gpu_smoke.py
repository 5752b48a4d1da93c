"""Helpers of the GPU scripts (gpu_smoke.sh, world_gpu.sh, gpu.sh), standard library at import.

  python benchmarks/gpu_smoke.py CHECK OUT STEP RC MILLISECONDS [ARGS...]
      read one step's outputs, append one JSON line to OUT/summary.jsonl (RC "skipped": no time left);
  python benchmarks/gpu_smoke.py preflight OUT
      print the carried upload's size, then import every module the scripts' commands import: one
      `error:` line and exit 1 on the first that fails, in seconds rather than minutes into a loan;
  python benchmarks/gpu_smoke.py carried
      the upload's size as JSON (tests/test_gpu_scripts.py keeps it <= 60 MiB)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
# What the commands import beyond compinv_rt's own modules (all of which preflight imports, but
# compinv_rt.apps.serve: the scripts run no server), including what they import lazily, inside functions.
# The light ones first: a missing one fails the pre-flight before torch is even imported.
THIRD_PARTY = ("pydantic", "typer", "rich", "tqdm", "PIL.Image", "onnx", "onnxscript", "onnxruntime",
               "polygraphy.backend.onnx", "onnx_graphsurgeon", "safetensors.torch", "diffusers",
               "transformers", "torch._inductor", "matplotlib.pyplot")
LAZY = (("diffusers", "StableDiffusionPipeline"), ("diffusers", "UNet2DConditionModel"),
        ("transformers", "CLIPTextModel"), ("transformers", "CLIPTokenizer"))


def carried(root: Path = ROOT) -> dict:
    """What a device call uploads: the files git tracks or sees untracked-not-ignored, shared/, and
    the carried wheels. Wheels: .whl/ when it is there (downloaded), else the sizes
    fetch_gpu_wheels.sh recorded in benchmarks/gpu_wheels.txt. Without .git (on the device) the
    tree is every file that arrived."""
    if (root / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, check=True).stdout.decode()
        files = {root / f for f in out.split("\0") if f}
        if (root / "shared").is_dir():
            files |= set((root / "shared").rglob("*"))
    else:
        files = {f for f in root.rglob("*") if ".whl" not in f.relative_to(root).parts}
    tree = sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())
    wheels_dir = sorted((root / ".whl").glob("*.whl"))
    if wheels_dir:
        wheels, source = sum(w.stat().st_size for w in wheels_dir), "downloaded .whl/"
    else:
        lines = (root / "benchmarks" / "gpu_wheels.txt").read_text().split("\n")
        wheels = sum(int(line.split()[1]) for line in lines if line.strip())
        source = "recorded benchmarks/gpu_wheels.txt"
    return {"tree_mib": round(tree / MIB, 2), "wheels_mib": round(wheels / MIB, 2),
            "total_mib": round((tree + wheels) / MIB, 2), "wheels_from": source}


def preflight(out: str) -> int:
    import importlib
    import importlib.util
    import pkgutil
    import time

    t0 = time.time()
    size = carried()
    print(f"carried upload: {size['total_mib']} MiB (tree {size['tree_mib']} + wheels {size['wheels_mib']}, "
          f"wheels from {size['wheels_from']}); the device tool's limit is 64 MiB", flush=True)
    import compinv_rt

    names = [m.name for m in pkgutil.walk_packages(compinv_rt.__path__, "compinv_rt.")
             if not m.name.startswith("compinv_rt.apps.serve")]
    record: dict = {"step": "preflight", "carried": size}
    try:
        for name in (*THIRD_PARTY, *names):
            importlib.import_module(name)
        for name, attr in LAZY:
            name = f"{name}.{attr}"
            getattr(importlib.import_module(name.split(".")[0]), attr)
        name = "open_clip (the CLIP vocabulary's package)"
        if importlib.util.find_spec("open_clip") is None:
            raise ModuleNotFoundError("not installed")
    except Exception as exc:
        why = (str(exc).splitlines() or [""])[0]
        record.update(ok=False, error=f"error: pre-flight: importing {name} failed: {type(exc).__name__}: {why}")
    else:
        record.update(ok=True, modules=len(THIRD_PARTY) + len(names) + len(LAZY) + 1)
    record["seconds"] = round(time.time() - t0, 1)
    with open(Path(out) / "summary.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if not record["ok"]:
        print(record["error"], file=sys.stderr)
        return 1
    print(f"pre-flight imports ok: {record['modules']} modules in {record['seconds']} s", flush=True)
    return 0


def _sidecars(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))
            if not p.name.endswith("_grid.json")]


def _images(folder: Path) -> dict:
    import numpy as np
    from PIL import Image

    return {p.name: np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
            for p in sorted(Path(folder).glob("*.png"))
            if not p.stem.endswith(("_grid", "_attention"))}


def generated(folder, *rest) -> dict:
    side = _sidecars(folder)
    imgs = _images(folder)
    out = {"images": len(imgs), "backend": sorted({s["backend"] for s in side}),
           "device": sorted({s["device"] for s in side}), "dtype": sorted({s["dtype"] for s in side}),
           "provider": sorted({s["provider"] for s in side if "provider" in s}),
           "attention_pngs": len(list(Path(folder).glob("*_attention.png"))),
           "finite_and_varied": all(float(a.std()) > 1.0 for a in imgs.values()) and bool(imgs)}
    return out


def compare(folder, reference, *rest) -> dict:
    """Mean/max absolute difference (0-255) of same-named images: the device run vs the CPU one."""
    import numpy as np

    a, b = _images(folder), _images(reference)
    common = sorted(set(a) & set(b))
    diffs = [np.abs(a[k] - b[k]) for k in common]
    return {**generated(folder), "compared_with": str(reference), "pairs": len(common),
            "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 3) if diffs else None,
            "max_abs_diff": float(max(d.max() for d in diffs)) if diffs else None}


def trained(folder, *rest) -> dict:
    art = json.loads((Path(folder) / "artifact.json").read_text())
    return {"steps_done": art["steps_done"], "files": sorted(art["files"]),
            "loss_first_last": [art["loss"]["first_10pct_mean"][0], art["loss"]["last_10pct_mean"][0]]}


def bench(folder, *rest) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        return {"cells": 0}
    res = json.loads(path.read_text())
    cells = [{k: c[k] for k in ("backend", "precision", "batch", "bias", "step_ms_p50", "e2e_s",
                                "peak_cuda_mb", "peak_device_mb", "step_speedup", "provider") if k in c}
             for c in res["cells"]]
    return {"device_name": res["meta"]["device_name"], "baseline": res["meta"]["baseline"],
            "skipped": res["meta"].get("skipped", []), "cells": cells}


def none(*rest) -> dict:
    return {}


def main(argv):
    if argv[:1] == ["preflight"]:
        sys.exit(preflight(argv[1]))
    if argv[:1] == ["carried"]:
        print(json.dumps(carried()))
        return
    check, out, step, rc, seconds, *args = argv
    if rc == "skipped":  # the step did not start: what was left of the budget could not hold it
        record = {"step": step, "ok": False, "skipped": f"{seconds} s left of the budget"}
        with open(Path(out) / "summary.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))
        return
    record = {"step": step, "rc": int(rc), "ok": rc == "0", "timed_out": rc in ("124", "137"),
              "seconds": round(int(seconds) / 1000, 1)}
    import os

    log = os.environ.get("ERROR_LOG")
    if rc != "0" and log and Path(log).is_file():  # the CLI's one `error:` line, if it gave one
        errors = [line for line in Path(log).read_text().splitlines() if line.startswith("error:")]
        record["error"] = errors[-1] if errors else Path(log).read_text().strip().splitlines()[-1:]
    try:
        record.update(globals()[check](*args))
    except Exception as exc:  # a check never stops the script: it records why it could not look
        record["check_error"] = f"{type(exc).__name__}: {exc}"
    with open(Path(out) / "summary.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
