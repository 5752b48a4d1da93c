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
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from compinv_rt.apps.world.scenes import (
    BACKGROUNDS,
    HELDOUT_KINDS,
    PromptSpec,
    combination_prompts,
    heldout_prompts,
    in_place,
    parse_prompt,
)
from compinv_rt.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)
DEFAULT_KINDS = ("single", "two", "novel")
KINDS = HELDOUT_KINDS + ("combinations",)  # combinations: every colour x pattern x shape x background


@dataclass(frozen=True)
class ScoreConfig:
    k: int = 5  # images per prompt (25 prompts x 5 = 125 samples per kind; novel has 20 prompts)
    prompts_per_kind: int = 25
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    batch: int = 32  # images per pipeline call
    size: int = 64
    combination_k: int = 0  # images per "combinations" prompt (0: k); 540 prompts make k costly

    def k_for(self, kind: str) -> int:
        return self.combination_k or self.k if kind == "combinations" else self.k


def _match(stated, detected, places=(), size: int = 64) -> bool:
    """Is there a one-to-one assignment of stated objects to detections that agrees (attributes,
    and the stated place of each object where `places` gives one)?"""
    if len(detected) < len(stated):
        return False
    places = tuple(places) or (None,) * len(stated)
    for perm in itertools.permutations(range(len(detected)), len(stated)):
        ok = True
        for (colour, shape, pattern), place, j in zip(stated, places, perm):
            d = detected[j]
            if (colour and d.colour != colour) or (shape and d.shape != shape) or (pattern and d.pattern != pattern):
                ok = False
                break
            if place and not in_place((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2, size, place):
                ok = False
                break
        if ok:
            return True
    return False


def check(spec: PromptSpec, judgement, size: int = 64) -> dict:
    """Verdict on one sample. `exact`: background, count and every stated object (attributes and,
    where stated, place) right. `placed` (only for prompts that state places): every stated
    object found in its stated place, ignoring background and extra objects."""
    bg = spec.background is None or judgement.background == spec.background
    count = len(judgement.objects) == len(spec.objects)
    objects = _match(spec.objects, judgement.objects)
    colours = _match([(c, None, None) for c, _, _ in spec.objects], judgement.objects)
    shapes = _match([(None, s, None) for _, s, _ in spec.objects], judgement.objects)
    out = {"exact": bg and count and objects, "background": bg, "count": count,
           "objects": objects, "colours": colours, "shapes": shapes}
    if spec.places:
        out["placed"] = _match(spec.objects, judgement.objects, spec.places, size)
        out["exact"] = out["exact"] and out["placed"]
    return out


def prompt_kind(spec: PromptSpec) -> str:
    return spec.kind_default


def default_prompts(kinds=DEFAULT_KINDS, per_kind: int = 25, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, prompt) pairs from the held-out split; "combinations" adds all 540 cells."""
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"unknown prompt kind {kind!r}; expected some of {', '.join(KINDS)}")
    out = []
    for kind in kinds:
        if kind == "combinations":
            out += [(kind, p) for _, p in combination_prompts()]
        else:
            out += [(kind, p) for p in heldout_prompts(kind, per_kind, seed)]
    return out


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

    from compinv_rt.apps.world.model import default_model_dir

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


# The base model's bars per kind (issues 14 and 22), on `exact` ("positioned": exact includes placed).
BARS = {"single": 0.98, "two": 0.85, "two-patterns": 0.70, "three": 0.50, "positioned": 0.80}


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def two_proportion_p(h1: int, n1: int, h2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (H0: both rates are equal)."""
    pool = (h1 + h2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (h1 / n1 - h2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


def compare(old: dict, new: dict, alpha: float = 0.05) -> dict:
    """The ship rule (issue 22) on two `score.json` summaries: the candidate ships when it meets more
    bars than the shipped model and no kind's `exact` is worse beyond chance (two-proportion test at
    `alpha`). Kinds in only one of the two are not compared."""
    rows, worse = [], []
    for kind in [k for k in new if k in old]:
        o, n = old[kind], new[kind]
        ho, no_ = round(o["exact"] * o["samples"]), o["samples"]
        hn, nn = round(n["exact"] * n["samples"]), n["samples"]
        pv = two_proportion_p(ho, no_, hn, nn)
        verdict = "worse" if hn / nn < ho / no_ and pv < alpha else (
            "better" if hn / nn > ho / no_ and pv < alpha else "same within noise")
        if verdict == "worse":
            worse.append(kind)
        rows.append({"kind": kind, "old": [ho, no_], "new": [hn, nn], "p": pv, "verdict": verdict,
                     "bar": BARS.get(kind)})
    bars_old = sum(1 for r in rows if r["bar"] is not None and r["old"][0] / r["old"][1] >= r["bar"])
    bars_new = sum(1 for r in rows if r["bar"] is not None and r["new"][0] / r["new"][1] >= r["bar"])
    ship = bars_new > bars_old and not worse
    return {"kinds": rows, "bars_old": bars_old, "bars_new": bars_new, "worse": worse, "ship": ship}


def compare_markdown(c: dict) -> str:
    lines = ["| kind | shipped | candidate | bar | p (two-proportion) | verdict |", "|---|---|---|---|---|---|"]
    for r in c["kinds"]:
        (ho, no_), (hn, nn) = r["old"], r["new"]
        bar = f"{100 * r['bar']:.0f} %" if r["bar"] is not None else "-"
        lines.append(f"| {r['kind']} | {ho}/{no_} = {100 * ho / no_:.1f} % | {hn}/{nn} = {100 * hn / nn:.1f} % "
                     f"| {bar} | {r['p']:.3f} | {r['verdict']} |")
    lines += ["", f"bars met: shipped {c['bars_old']}, candidate {c['bars_new']}; worse beyond chance: "
              f"{', '.join(c['worse']) or 'none'} -> **{'ship' if c['ship'] else 'do not ship'}**"]
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict]) -> dict:
    """Per kind: samples, prompts, the fraction of samples passing each check (a check only some
    samples have, like `placed`, is a fraction of those) and its 95 % interval (`ci`)."""
    kinds: dict = {}
    for r in rows:
        kd = kinds.setdefault(r["kind"], {"samples": 0, "prompts": set(), "hits": {}, "n": {}})
        kd["samples"] += 1
        kd["prompts"].add(r["prompt"])
        for key, v in r["check"].items():
            kd["hits"][key] = kd["hits"].get(key, 0) + int(v)
            kd["n"][key] = kd["n"].get(key, 0) + 1
    return {kind: {"samples": kd["samples"], "prompts": len(kd["prompts"]),
                   **{k: v / kd["n"][k] for k, v in kd["hits"].items()},
                   "ci": {k: list(wilson(v, kd["n"][k])) for k, v in kd["hits"].items()}}
            for kind, kd in kinds.items()}


def markdown_table(summary: dict) -> str:
    cols = ["exact", "placed", "objects", "background", "count", "colours", "shapes"]
    lines = ["| kind | prompts | samples | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]

    def cell(s: dict, c: str) -> str:
        if c not in s:
            return "-"
        text = f"{100 * s[c]:.1f}%"
        if c in ("exact", "placed") and c in s.get("ci", {}):
            lo, hi = s["ci"][c]
            text += f" ({100 * lo:.1f}-{100 * hi:.1f})"
        return text

    for kind, s in summary.items():
        lines.append(f"| {kind} | {s['prompts']} | {s['samples']} | " + " | ".join(cell(s, c) for c in cols) + " |")
    lines.append("\n(95 % Wilson intervals in brackets.)")
    return "\n".join(lines) + "\n"


def combination_table(rows: list[dict], worst: int = 10, bar: float = 0.8, min_backgrounds: int = 4) -> dict:
    """Per colour x pattern x shape cell: exact rate on each background. A combination passes when
    it reaches `bar` on at least `min_backgrounds` backgrounds; the `worst` cells are listed."""
    cells: dict = {}
    for r in rows:
        if r["kind"] != "combinations":
            continue
        spec = parse_prompt(r["prompt"])
        (colour, shape, pattern), bg = spec.objects[0], spec.background
        key = (colour, pattern or "plain", shape)
        hit, n = cells.setdefault(key, {}).get(bg, (0, 0))
        cells[key][bg] = (hit + int(r["check"]["exact"]), n + 1)
    rates = {key: {bg: h / n for bg, (h, n) in per.items()} for key, per in cells.items()}
    mean = {key: sum(per.values()) / len(per) for key, per in rates.items()}
    # worst first; among equal cells, those of the combinations that fail most overall
    flat = sorted(((rate, mean[key], key, bg) for key, per in rates.items() for bg, rate in per.items()))
    passing = [key for key, per in rates.items() if sum(v >= bar for v in per.values()) >= min_backgrounds]
    by_pattern: dict = {}
    for (_, pattern, _), per in cells.items():
        h, n = by_pattern.get(pattern, (0, 0))
        by_pattern[pattern] = (h + sum(x for x, _ in per.values()), n + sum(y for _, y in per.values()))
    return {
        "combinations": len(rates),
        "passing": len(passing),
        "bar": bar,
        "min_backgrounds": min_backgrounds,
        "samples_per_cell": max((n for per in cells.values() for _, n in per.values()), default=0),
        "cells_at_zero": sum(1 for rate, *_ in flat if rate == 0),
        "exact_by_pattern": {p: h / n for p, (h, n) in sorted(by_pattern.items())},
        "worst": [{"colour": k[0], "pattern": k[1], "shape": k[2], "background": bg, "exact": rate,
                   "combination_mean": m} for rate, m, k, bg in flat[:worst]],
        "cells": {" ".join(k): per for k, per in sorted(rates.items())},
    }


def combination_markdown(table: dict) -> str:
    lines = [f"{table['passing']} of {table['combinations']} colour x pattern x shape combinations reach "
             f"{100 * table['bar']:.0f} % exact on at least {table['min_backgrounds']} of {len(BACKGROUNDS)} "
             f"backgrounds ({table['samples_per_cell']} samples per cell); {table['cells_at_zero']} cells at 0 %; "
             "exact by pattern: " + ", ".join(f"{p} {100 * v:.1f} %" for p, v in table["exact_by_pattern"].items())
             + ".", "",
             "| worst cells | background | exact | combination, all backgrounds |", "|---|---|---|---|"]
    for w in table["worst"]:
        lines.append(f"| {w['pattern']} {w['colour']} {w['shape']} | {w['background']} | {100 * w['exact']:.0f}% "
                     f"| {100 * w['combination_mean']:.0f}% |")
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

    from compinv_rt.apps.world.judge import load_judge

    if cfg.k < 1:
        raise ConfigError(f"k must be >= 1, got {cfg.k}")
    t0 = time.time()
    pipe = pipe or load_pipeline(model_dir)
    judge = load_judge(judge_dir)
    jobs = [(kind, prompt, j) for kind, prompt in prompts for j in range(cfg.k_for(kind))]
    with torch.no_grad():
        images = sample_images(pipe, [p for _, p, _ in jobs], 1, cfg, progress)
    verdicts = judge(images)
    rows = []
    for (kind, prompt, j), v in zip(jobs, verdicts):
        spec = parse_prompt(prompt)
        if kind == "combinations":  # a cell's unstated pattern is "plain", and is checked
            spec = PromptSpec(spec.background, tuple((c, sh, p or "plain") for c, sh, p in spec.objects))
        rows.append({"kind": kind, "prompt": prompt, "index": j,
                     "check": check(spec, v, cfg.size), "judgement": v.to_json()})
    summary = summarize(rows)
    result: dict = {"config": cfg.__dict__, "model": str(model_dir or "embedded"),
                    "seconds": round(time.time() - t0, 1), "summary": summary, "samples": rows}
    md = markdown_table(summary)
    if any(r["kind"] == "combinations" for r in rows):
        table = combination_table(rows)
        result["combinations"] = table
        md += "\n" + combination_markdown(table)
    result["markdown"] = md
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "score.json").write_text(json.dumps(result, indent=1))
        (out / "score.md").write_text(md)
        for kind in summary:
            kk = cfg.k_for(kind)
            idx = [i for i, r in enumerate(rows) if r["kind"] == kind][: 8 * kk]
            grid_image(images[idx], cols=kk * 2).save(out / f"grid_{kind}.png")
    result["images"] = images
    return result
