"""`world score`: sample K images per prompt, judge them, report accuracy per prompt kind.

A sample counts as right ("exact") when the judge finds the stated background, exactly as many
objects as stated, and every stated object (shape, colour and pattern where stated) under a
one-to-one matching. Lenient columns report the parts separately (background right, count right,
stated objects all present ignoring background and extras).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from compinv_rt.errors import ConfigError, ModelError
from compinv_rt.world.scenes import PromptSpec, heldout_prompts, parse_prompt

log = logging.getLogger(__name__)
DEFAULT_KINDS = ("single", "two", "novel")


@dataclass(frozen=True)
class ScoreConfig:
    k: int = 5  # images per prompt (25 prompts x 5 = 125 samples per kind; novel has 20 prompts)
    prompts_per_kind: int = 25
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    batch: int = 32  # images per pipeline call
    size: int = 64


def _match(stated, detected) -> bool:
    """Is there a one-to-one assignment of stated objects to detections that agrees?"""
    if len(detected) < len(stated):
        return False
    for perm in itertools.permutations(range(len(detected)), len(stated)):
        ok = True
        for (colour, shape, pattern), j in zip(stated, perm):
            d = detected[j]
            if (colour and d.colour != colour) or (shape and d.shape != shape) or (pattern and d.pattern != pattern):
                ok = False
                break
        if ok:
            return True
    return False


def check(spec: PromptSpec, judgement) -> dict:
    bg = spec.background is None or judgement.background == spec.background
    count = len(judgement.objects) == len(spec.objects)
    objects = _match(spec.objects, judgement.objects)
    colours = _match([(c, None, None) for c, _, _ in spec.objects], judgement.objects)
    shapes = _match([(None, s, None) for _, s, _ in spec.objects], judgement.objects)
    return {"exact": bg and count and objects, "background": bg, "count": count,
            "objects": objects, "colours": colours, "shapes": shapes}


def prompt_kind(spec: PromptSpec) -> str:
    return spec.kind_default


def default_prompts(kinds=DEFAULT_KINDS, per_kind: int = 25, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, prompt) pairs from the held-out split."""
    return [(kind, p) for kind in kinds for p in heldout_prompts(kind, per_kind, seed)]


def read_prompt_file(path: str | Path) -> list[tuple[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file not found: {p}")
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:  # "kind<TAB>prompt"
            kind, prompt = line.split("\t", 1)
        else:
            prompt = line
            kind = prompt_kind(parse_prompt(prompt))
        out.append((kind.strip(), prompt.strip()))
    if not out:
        raise ConfigError(f"no prompts in {p}")
    return out


def load_pipeline(model_dir: str | Path | None = None):
    """Stock diffusers pipeline, offline, float32 on CPU."""

    from compinv_rt.world.model import default_model_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = Path(model_dir) if model_dir else default_model_dir()
    if not (d / "model_index.json").is_file():
        raise ModelError(f"no diffusers model at {d} (model_index.json missing)")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(d))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(pipe, prompts: list[str], k: int, cfg: ScoreConfig,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """k images per prompt, uint8 (len(prompts) * k, H, W, 3), prompt-major order. Seeded."""
    import torch

    flat = [p for p in prompts for _ in range(k)]
    out = []
    for i in range(0, len(flat), cfg.batch):
        chunk = flat[i:i + cfg.batch]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        res = pipe(chunk, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, generator=gen,
                   height=cfg.size, width=cfg.size, output_type="np")
        out.append((np.clip(res.images, 0, 1) * 255 + 0.5).astype(np.uint8))
        if progress:
            progress(min(i + cfg.batch, len(flat)), len(flat))
    return np.concatenate(out)


def grid_image(images: np.ndarray, cols: int, scale: int = 2):
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def summarize(rows: list[dict]) -> dict:
    kinds: dict = {}
    for r in rows:
        kd = kinds.setdefault(r["kind"], {"samples": 0, "prompts": set()})
        kd["samples"] += 1
        kd["prompts"].add(r["prompt"])
        for key, v in r["check"].items():
            kd[key] = kd.get(key, 0) + int(v)
    out = {}
    for kind, kd in kinds.items():
        n = kd.pop("samples")
        prompts = kd.pop("prompts")
        out[kind] = {"samples": n, "prompts": len(prompts), **{k: v / n for k, v in kd.items()}}
    return out


def markdown_table(summary: dict) -> str:
    cols = ["exact", "objects", "background", "count", "colours", "shapes"]
    lines = ["| kind | prompts | samples | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for kind, s in summary.items():
        lines.append(f"| {kind} | {s['prompts']} | {s['samples']} | "
                     + " | ".join(f"{100 * s[c]:.1f}%" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def score(
    prompts: list[tuple[str, str]],
    cfg: ScoreConfig = ScoreConfig(),
    model_dir: str | Path | None = None,
    judge_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    pipe=None,
) -> dict:
    """Sample, judge and summarize; writes score.json, score.md and grid PNGs when out_dir is set."""
    import torch

    from compinv_rt.world.judge import load_judge

    if cfg.k < 1:
        raise ConfigError(f"k must be >= 1, got {cfg.k}")
    t0 = time.time()
    pipe = pipe or load_pipeline(model_dir)
    judge = load_judge(judge_dir)
    texts = [p for _, p in prompts]
    with torch.no_grad():
        images = sample_images(pipe, texts, cfg.k, cfg, progress)
    verdicts = judge(images)
    rows = []
    for i, v in enumerate(verdicts):
        kind, prompt = prompts[i // cfg.k]
        spec = parse_prompt(prompt)
        rows.append({"kind": kind, "prompt": prompt, "index": i % cfg.k,
                     "check": check(spec, v), "judgement": v.to_json()})
    summary = summarize(rows)
    result = {"config": cfg.__dict__, "model": str(model_dir or "embedded"),
              "seconds": round(time.time() - t0, 1), "summary": summary, "samples": rows}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "score.json").write_text(json.dumps(result, indent=1))
        (out / "score.md").write_text(markdown_table(summary))
        for kind in summary:
            idx = [i for i, r in enumerate(rows) if r["kind"] == kind][: 8 * cfg.k]
            grid_image(images[idx], cols=cfg.k * 2).save(out / f"grid_{kind}.png")
    result["images"] = images
    return result
