"""Where layouts to learn from come from: the shapes world's ground truth, or the base model's own
cross-attention on generated "A and B" images (no external data; works for any base model)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from compinv_rt.errors import ConfigError
from compinv_rt.spatial.layout_model import LayoutExample

HELDOUT_SEED0 = 50_000_000  # held-out scenes are drawn from seeds far from the training seeds


def _article(phrase: str) -> str:
    return phrase.split(" ", 1)[1] if phrase.startswith(("a ", "an ")) else phrase


def world_examples(n: int, split: str = "train", seed: int = 0,
                   positions: bool = False) -> list[LayoutExample]:
    """`n` shapes-world scenes as layout records: caption, one phrase per object (its words
    without the article, e.g. "dotted red star"), its ground-truth box normalized to [0, 1].

    split "train": scenes the world allows for training; "heldout": scenes it holds out (unseen
    colour-shape pairs, pairings or backgrounds), from a disjoint seed range.

    The world's captions never say where objects are (scenes place them at random), which caps
    any caption-only predictor. `positions=True` rewrites each caption to state every object's
    horizontal position from the ground truth ("a red star at the left and a blue circle at the
    right on grass"), to measure what the model learns when the text does carry layout."""
    from compinv_rt.world.scenes import BG_PHRASES, is_train_scene, object_phrase, sample_scene

    if split not in ("train", "heldout"):
        raise ConfigError(f"--split must be train or heldout, got {split!r}")
    out = []
    s = seed if split == "train" else HELDOUT_SEED0 + seed
    while len(out) < n:
        scene, _ = sample_scene(s, split="train" if split == "train" else "any")
        s += 1
        if split == "heldout" and is_train_scene(scene.background, [o.pair for o in scene.objects]):
            continue
        size = scene.size
        phrases = tuple(_article(object_phrase(o, scene.mention_size)) for o in scene.objects)
        boxes = tuple(tuple(v / size for v in o.box) for o in scene.objects)
        caption = scene.caption
        if positions:
            where = {"left": "at the left", "centre": "in the middle", "right": "at the right"}
            parts = [f"{object_phrase(o, scene.mention_size)} {where[o.position(size)]}"
                     for o in scene.objects]
            objs = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
            caption = f"{objs} {BG_PHRASES[scene.background][0]}"
        out.append(LayoutExample(caption, phrases, boxes))
    return out


def pair_prompts(words: list[str], templates: list[str]) -> list[tuple[str, tuple[str, str]]]:
    """All ordered pairs of different words in every template ("{a}", "{b}" placeholders)."""
    if len(words) < 2:
        raise ConfigError("--words needs at least two comma-separated words or phrases")
    for t in templates:
        if "{a}" not in t or "{b}" not in t:
            raise ConfigError(f"--template {t!r} needs both {{a}} and {{b}}")
    return [(t.format(a=a, b=b), (a, b)) for t in templates
            for a, b in itertools.permutations(words, 2)]


def attention_examples(loaded, prompts: list[tuple[str, tuple[str, ...]]], images_per_prompt: int,
                       sampling, seed: int = 0, batch: int = 8, threshold: float = 0.5,
                       on_progress: Callable[[int, int], None] | None = None) -> list[LayoutExample]:
    """Generate `images_per_prompt` images per prompt with the plain base model, record its
    cross-attention (conditional half, averaged over steps, layers and heads) and read one box per
    concept: the bounding box of the cells above `threshold` of its tokens' mean map."""
    from compinv_rt.runtime.pipeline import Pipeline
    from compinv_rt.spatial.heatmaps import AttentionRecorder, box_from_map
    from compinv_rt.spatial.layouts import concept_tokens

    cfg = sampling.resolved(loaded.files)
    f = loaded.files.vae_scale_factor
    h, w = cfg.height // f, cfg.width // f
    pipe = Pipeline(loaded)
    flat = [(p, phrases, seed + 1000 * i + j) for i, (p, phrases) in enumerate(prompts)
            for j in range(images_per_prompt)]
    tokens = {p: concept_tokens(loaded.tokenizer, p, phrases) for p, phrases in prompts}
    out = []
    for start in range(0, len(flat), batch):
        chunk = flat[start:start + batch]
        rec = AttentionRecorder(len(chunk), h, w)
        pipe.generate([c[0] for c in chunk], [c[2] for c in chunk], cfg, attention_recorder=rec)
        maps = rec.maps()  # (B, T, h, w)
        for b, (prompt, phrases, _) in enumerate(chunk):
            boxes = tuple(box_from_map(maps[b, toks].mean(0), threshold) for toks in tokens[prompt])
            out.append(LayoutExample(prompt, tuple(phrases), boxes))
        if on_progress:
            on_progress(min(start + batch, len(flat)), len(flat))
    return out


def split_holdout(examples: list, fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Split by prompt (all images of a prompt on one side) into (train, held-out)."""
    g = torch.Generator().manual_seed(seed)
    prompts = sorted({e.prompt for e in examples})
    perm = torch.randperm(len(prompts), generator=g).tolist()
    held = {prompts[i] for i in perm[:max(1, int(round(fraction * len(prompts))))]}
    return [e for e in examples if e.prompt not in held], [e for e in examples if e.prompt in held]
