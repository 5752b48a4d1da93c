"""Layouts learned from the base model's own cross-attention on generated "A and B" (or "A") images (no
external data; works for any base model). Ground-truth layouts of the shapes world come from
`compinv_rt.apps.world.layouts`."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from compinv_rt.core.errors import ConfigError
from compinv_rt.spatial.layout_model import LayoutExample


def pair_prompts(words: list[str], templates: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Every template filled with all ordered pairs of different words ("{a}" and "{b}"
    placeholders) or, for a template with "{a}" only, with each word alone."""
    if len(words) < 2:
        raise ConfigError("--words needs at least two comma-separated words or phrases")
    for t in templates:
        if "{a}" not in t or t.count("{a}") > 1 or t.count("{b}") > 1:
            raise ConfigError(f"--template {t!r} needs {{a}} once (and {{b}} at most once)")
    out: list[tuple[str, tuple[str, ...]]] = []
    for t in templates:
        if "{b}" in t:
            out += [(t.format(a=a, b=b), (a, b)) for a, b in itertools.permutations(words, 2)]
        else:
            out += [(t.format(a=a), (a,)) for a in words]
    return out


def attention_examples(loaded, prompts: list[tuple[str, tuple[str, ...]]], images_per_prompt: int,
                       sampling, seed: int = 0, batch: int = 8, threshold: float = 0.5,
                       on_progress: Callable[[int, int], None] | None = None) -> list[LayoutExample]:
    """Generate `images_per_prompt` images per prompt with the plain base model, record its
    cross-attention (conditional half, averaged over steps, layers and heads) and read one box per
    concept: the bounding box of the cells above `threshold` of its tokens' mean map."""
    from compinv_rt.sampling.pipeline import Pipeline
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
