"""`world photos`: "user photos" of a novel concept for textual inversion.

The default concept is an orange heart with white dots, always pictured large on sand: orange
hearts are held out of the base model's training (`HELDOUT_PAIRS`) and dotted hearts are rare, so
the base model has not seen this instance. Each photo varies position, exact size, texture and
colour jitter; `concept.json` records the class word, attributes and background.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from compinv_rt.errors import ConfigError, OutputError
from compinv_rt.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    PATTERNS,
    SHAPES,
    WorldConfig,
    sample_scene,
)


def _check(name: str, value: str, allowed) -> str:
    v = value.strip().lower()
    if v not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; expected one of: {', '.join(allowed)}")
    return v


def make_photos(
    out_dir: str | Path,
    shape: str = "heart",
    colour: str = "orange",
    pattern: str = "dotted",
    background: str = "sand",
    count: int = 8,
    seed: int = 0,
    size: int = 64,
) -> dict:
    """Write `count` PNG photos and `concept.json` to `out_dir`; returns the concept record."""
    from PIL import Image

    shape = _check("shape", shape, SHAPES)
    colour = _check("colour", colour, COLOURS)
    pattern = _check("pattern", pattern, PATTERNS)
    background = _check("background", background, BACKGROUNDS)
    if not 1 <= count <= 1000:
        raise ConfigError(f"count must be between 1 and 1000, got {count}")
    if size < 32 or size % 8:
        raise ConfigError(f"size must be a multiple of 8 and >= 32, got {size}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e}") from e
    files, boxes = [], []
    wc = WorldConfig(size=size, size_word_prob=0.0)
    for i in range(count):
        scene, image = sample_scene(seed * 100_003 + 50_000_000 + i, "any", wc, background=background,
                                    objects=[(colour, shape, pattern)], sizes=["large"])
        name = f"photo_{i:03d}.png"
        tmp = out / (name + ".tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, out / name)
        files.append(name)
        boxes.append(list(scene.objects[0].box))
    words = ([pattern] if pattern != "plain" else []) + [colour, shape]
    concept = {
        "class_word": shape,
        "attributes": {"shape": shape, "colour": colour, "pattern": pattern, "size": "large"},
        "background": background,
        "description": "a " + " ".join(words) + f" on {background}",
        "seen_by_base_model": (colour, shape) not in HELDOUT_PAIRS,
        "count": count,
        "seed": seed,
        "image_size": size,
        "files": files,
        "boxes": boxes,
    }
    tmp = out / "concept.json.tmp"
    tmp.write_text(json.dumps(concept, indent=2))
    os.replace(tmp, out / "concept.json")
    return concept
