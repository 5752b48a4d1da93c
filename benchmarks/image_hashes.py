"""Fixed-seed image hashes of `generate`, `generate --jobs` and `eval` cells, to prove a refactor
changes no pixel: record them with one version of the code, check them with another.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/image_hashes.py record benchmarks/results/image_hashes.json
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/image_hashes.py check  benchmarks/results/image_hashes.json

Cells run on the tiny test model (built from seed 0, like tests/conftest.py) and on the embedded
model: plain, negative prompt, no guidance, layout bias, layout guidance, --save-attention, a
trained concept; a jobs file mixing sizes, layouts and concepts (packed into shared batches); and
the eval protocol's cells (5 methods, concepts trained for 2 steps). Only PNG bytes are hashed
(sidecars hold timestamps). Hashes are for one machine and one torch build: compare on the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def _cli(args: list[str]) -> None:
    from typer.testing import CliRunner

    from compinv_rt.apps.cli import app

    res = CliRunner().invoke(app, args)
    if res.exit_code != 0:
        raise SystemExit(f"compinv-rt {' '.join(args)} failed:\n{res.output}\n{res.exception!r}")


def _train(model: str, tmp: Path, token: str, name: str) -> Path:
    from compinv_rt.apps.world.photos import make_photos
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept

    photos = tmp / f"photos-{name}"
    make_photos(photos, count=3, size=64)
    out = tmp / f"concept-{name}"
    # The training recipe is held at the one the hashes were recorded with (no context captions,
    # no norm constraint: the defaults before issue 13), so the check measures generation, not
    # train's defaults.
    cfg = TrainConfig(token=token, class_word="heart", vectors=2, steps=4, batch=2,
                      resolution=64, variants=2, checkpoint_every=2, captions="none", norm="none")
    train_concept(prepare(cfg, photos, model), out, device="cpu")
    return out


def run(tmp: Path) -> dict:
    import torch

    from compinv_rt.models.architectures import save_model, tiny_components
    from compinv_rt.models.embedded import default_model_dir

    torch.set_num_threads(1)
    tiny = str(save_model(tiny_components(seed=0), tmp / "tiny"))
    models = {"tiny": tiny, "embedded": str(default_model_dir())}
    result: dict = {}
    for name, model in models.items():
        concept = _train(model, tmp, "<ref-heart>", name)
        # the reference sampler (25-step DDIM's scheduler, 4 steps here): --quality's other presets
        # may change, the reference may not
        common = ["--model", model, "--quality", "reference", "--steps", "4", "--seed", "3"]
        cells = {
            "plain": ["a red star and a blue circle", "-n", "2"],
            "negative": ["a red star", "-n", "2", "--negative-prompt", "blue"],
            "noguidance": ["a red star", "-n", "1", "--guidance", "1.0"],
            "bias": ["a red star and a blue circle", "-n", "2", "--layout",
                     "red star=0.1,0.1,0.5,0.9;blue circle=0.5,0.1,0.9,0.9", "--bias-steps", "0.5"],
            "auto_bias": ["a red star and a blue circle", "-n", "1", "--spatial", "bias"],
            "guidance": ["a red star and a blue circle", "-n", "1", "--spatial", "guidance",
                         "--layout", "red star=0.1,0.1,0.5,0.9;blue circle=0.5,0.1,0.9,0.9"],
            "attention": ["a red star", "-n", "1", "--save-attention"],
            "concept": ["a <ref-heart> heart and a blue circle", "-n", "2", "--concept",
                        str(concept), "--layout", "<ref-heart> heart=0.1,0.1,0.5,0.9"],
        }
        for cell, args in cells.items():
            out = tmp / name / "generate" / cell
            _cli(["generate", *args, *common, "--out", str(out)])
            result[f"{name}/generate/{cell}"] = _hashes(out)
        jobs = tmp / f"{name}-jobs.jsonl"
        lines = [
            {"id": "a", "prompt": "a red star", "n": 2, "seed": 1},
            {"id": "b", "prompt": "a blue circle on grass", "seed": 7, "negative_prompt": "red"},
            {"id": "c", "prompt": "a red star and a blue circle", "seed": 2,
             "layout": "red star=0.1,0.1,0.5,0.9;blue circle=0.5,0.1,0.9,0.9"},
            {"id": "d", "prompt": "a <ref-heart> heart", "seed": 4, "concepts": [str(concept)],
             "layout": "<ref-heart> heart=0.2,0.2,0.8,0.8"},
            {"id": "e", "prompt": "a red star", "seed": 5, "guidance": 3.0},
            {"id": "f", "prompt": "a red star", "seed": 6, "height": 64, "width": 64}
            if name == "tiny" else {"id": "f", "prompt": "a red star", "seed": 6, "steps": 3},
        ]
        jobs.write_text("\n".join(json.dumps(j) for j in lines))
        out = tmp / name / "jobs"
        _cli(["generate", "--jobs", str(jobs), "--model", model, "--quality", "reference", "--steps", "4", "--max-batch",
              "3", "--out", str(out)])
        result[f"{name}/jobs"] = _hashes(out)
        concepts = tmp / "concepts.jsonl"
        concepts.write_text("\n".join(json.dumps(c) for c in [
            {"name": "heart", "shape": "heart", "colour": "orange", "pattern": "dotted",
             "background": "sand"},
            {"name": "square", "shape": "square", "colour": "red", "pattern": "striped",
             "background": "night"}]))
        prompts = tmp / "prompts.json"
        prompts.write_text(json.dumps(["a {heart} and a blue circle on grass",
                                       "a {heart} and a {square} on grass"]))
        out = tmp / name / "eval"
        _cli(["eval", "--out", str(out), "--model", model, "--concepts", str(concepts),
              "--prompts", str(prompts), "--samples", "2", "--steps", "3", "--train-steps", "2",
              "--seed", "5"])
        result[f"{name}/eval"] = _hashes(out / "cells")
    return result


def main() -> None:
    mode, path = sys.argv[1], Path(sys.argv[2])
    with tempfile.TemporaryDirectory(prefix="image-hashes-") as tmp:
        os.environ.setdefault("COMPINV_CACHE", str(Path(tmp) / "cache"))
        got = run(Path(tmp))
    n = sum(len(v) for v in got.values())
    if mode == "record":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {n} image hashes in {len(got)} cells to {path}")
        return
    want = json.loads(path.read_text())
    pairs = [(f"{cell}/{png}", want.get(cell, {}).get(png), got.get(cell, {}).get(png))
             for cell in sorted(set(want) | set(got))
             for png in sorted(set(want.get(cell, {})) | set(got.get(cell, {})))]
    new = [name for name, w, _ in pairs if w is None]  # cells added since the record: not compared
    bad = [name for name, w, g in pairs if w is not None and w != g]
    for name in new:
        print(f"new (not in the record): {name}")
    for b in bad:
        print(f"DIFFERS: {b}")
    compared = n - len(new)
    print(f"{compared - len(bad)}/{compared} recorded images bit-identical to {path} ({len(new)} new)")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
