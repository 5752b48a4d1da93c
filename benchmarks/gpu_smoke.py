"""Checks for benchmarks/gpu_smoke.sh: read one step's outputs, append one JSON line to
OUT/summary.jsonl. Usage: python benchmarks/gpu_smoke.py CHECK OUT STEP RC MILLISECONDS [ARGS...]"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
    check, out, step, rc, seconds, *args = argv
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
