"""`world photos`: "user photos" of a novel concept for textual inversion.

The default concept is an orange heart with white dots, always pictured large on sand: orange
hearts are held out of the base model's training (`HELDOUT_PAIRS`) and dotted hearts are rare, so
the base model has not seen this instance. Each photo varies position, exact size, texture and
colour jitter; `concept.json` records the class word, attributes and background.

Besides the photos it writes what a user would know about them: `captions.json` (per photo, what it
shows besides the concept: one of the world's own phrases for its background, e.g. "on the sand";
`compinv-rt train` names it in the training prompts) and `masks/<photo>.png` (the subject's
silhouette, 255 = subject; for `train --masks`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compinv_rt.apps.world.scenes import (
    BACKGROUNDS,
    BG_PHRASES,
    COLOURS,
    HELDOUT_PAIRS,
    PATTERNS,
    SHAPES,
    WorldConfig,
    _box_from_mask,
    _layout,
    sample_scene,
    shape_mask,
)
from compinv_rt.core.errors import ConfigError, OutputError

CAPTIONS = "captions.json"
MASKS = "masks"


def _check(name: str, value: str, allowed) -> str:
    v = value.strip().lower()
    if v not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; expected one of: {', '.join(allowed)}")
    return v


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def subject_mask(scene_seed: int, shape: str, size: int, box) -> np.ndarray:
    """The silhouette (fill + outline, float in [0, 1]) of a one-object photo.

    `sample_scene` does not return its masks; with one object, a fixed background and sizes, its
    first random draws are the layout, so the same seed gives the same circle of the shape. The
    result is checked against the scene's box; on a mismatch (the scene code changed) the box
    itself is the mask."""
    placed = _layout(np.random.default_rng(scene_seed), 1, size, ["large"])
    if placed:
        cx, cy, r = placed[0]
        fill, outline = shape_mask(shape, cx, cy, r, size)
        if list(_box_from_mask(fill)) == list(box):
            return np.maximum(fill, outline)
    m = np.zeros((size, size), np.float32)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1.0
    return m


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class PhotoConcept:
    """The concept the photos show, by the world's attribute words (checked by `make_photos`).
    The default is the held-out orange dotted heart on sand."""

    shape: str = "heart"
    colour: str = "orange"
    pattern: str = "dotted"
    background: str = "sand"


def make_photos(
    out_dir: str | Path,
    concept: PhotoConcept = PhotoConcept(),
    count: int = 8,
    seed: int = 0,
    size: int = 64,
    overwrite: bool = True,
) -> dict:
    """Write `count` PNG photos and `concept.json` to `out_dir`; returns the concept record."""
    shape = _check("shape", concept.shape, SHAPES)
    colour = _check("colour", concept.colour, COLOURS)
    pattern = _check("pattern", concept.pattern, PATTERNS)
    background = _check("background", concept.background, BACKGROUNDS)
    if not 1 <= count <= 1000:
        raise ConfigError(f"count must be between 1 and 1000, got {count}")
    if size < 32 or size % 8:
        raise ConfigError(f"size must be a multiple of 8 and >= 32, got {size}")
    out = Path(out_dir)
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{out} is not empty; photos are never overwritten: choose another "
                          "folder or delete it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e}") from e
    (out / MASKS).mkdir(exist_ok=True)
    files, boxes, captions = [], [], {}
    wc = WorldConfig(size=size, size_word_prob=0.0)
    phrases = BG_PHRASES[background]
    rng = np.random.default_rng([seed, 17])
    for i in range(count):
        scene_seed = seed * 100_003 + 50_000_000 + i
        scene, image = sample_scene(scene_seed, "any", wc, background=background,
                                    objects=[(colour, shape, pattern)], sizes=["large"])
        name = f"photo_{i:03d}.png"
        _write_atomic(out / name, _png(image))
        box = list(scene.objects[0].box)
        mask = subject_mask(scene_seed, shape, size, box)
        _write_atomic(out / MASKS / name, _png((mask * 255).round().astype(np.uint8)))
        files.append(name)
        boxes.append(box)
        captions[name] = phrases[int(rng.integers(len(phrases)))]
    _write_atomic(out / CAPTIONS, (json.dumps(captions, indent=2) + "\n").encode())
    words = ([pattern] if pattern != "plain" else []) + [colour, shape]
    record = {
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
        "captions": CAPTIONS,
        "masks": MASKS,
    }
    tmp = out / "concept.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / "concept.json")
    return record
