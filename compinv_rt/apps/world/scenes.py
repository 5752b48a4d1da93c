"""The shapes world: a seeded generator of small scenes with ground truth and captions.

A scene is a textured background (grass, sky, sand, night, brick) holding 1-3 flat, outlined
objects (6 shapes x 6 colours, optionally dotted or striped). Every scene carries its ground truth
(background, objects with shape/colour/pattern/size/box) and a caption that mentions every object
and the background, drawn from varied templates.

Generalization is measured on a deterministic held-out split:
- `HELDOUT_PAIRS`: colour-shape pairs that never appear in training scenes ("novel" prompts);
- held-out (colour-shape, background) combinations, about 1 in 6 ("single" prompts);
- held-out pairings of two colour-shapes in one scene, about 1 in 6 ("two" prompts).
`is_train_scene` says whether a scene may be used for training; `sample_scene(split="train")`
only returns such scenes. Only numpy and pillow are needed here (no torch).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
PATTERNS = ("plain", "dotted", "striped")
BACKGROUNDS = ("grass", "sky", "sand", "night", "brick")
SIZES = ("small", "large")
POSITIONS = ("left", "centre", "right")
VERTICAL = ("top", "middle", "bottom")
# Caption places: an object's box centre, as a fraction of the canvas, is "left"/"top" below
# PLACE_BOUNDS[0] and "right"/"bottom" above PLACE_BOUNDS[1]. Not thirds: object centres stay
# about a radius away from the border (large objects: 0.28-0.72), so thirds would almost never
# call a large object left or right.
PLACE_BOUNDS = (0.4, 0.6)

COLOUR_RGB = {
    "red": (225, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 20),
    "green": (40, 205, 60),
    "blue": (30, 80, 235),
    "purple": (150, 45, 205),
}

# Colour-shape pairs never shown in training (the photos concept, an orange heart, is one of them).
HELDOUT_PAIRS = frozenset(
    {("orange", "heart"), ("blue", "star"), ("green", "triangle"), ("purple", "cross")}
)

# Radii in pixels at the 64 px reference canvas (scaled with the canvas size).
SMALL_RADIUS = (10.0, 12.5)
LARGE_RADIUS = (14.0, 18.0)


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    pattern: str = "plain"
    size: str = "large"
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 in pixels (exclusive end)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    def position(self, width: int) -> str:
        return position_word(self.centre[0], width)

    def place(self, size: int) -> tuple[str, str]:
        return place_of(*self.centre, size)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[WorldObject, ...]
    caption: str
    size: int = 64
    seed: int = 0
    mention_size: bool = field(default=False, compare=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d["objects"] = [
            {**asdict(o), "box": list(o.box), "position": o.position(self.size)} for o in self.objects
        ]
        return d


def place_of(x: float, y: float, size: int) -> tuple[str, str]:
    """(vertical, horizontal) place words of a point: ("top", "left") ... ("bottom", "right")."""
    lo, hi = PLACE_BOUNDS

    def word(v, words):
        return words[0] if v < lo * size else words[2] if v > hi * size else words[1]

    return word(y, VERTICAL), word(x, POSITIONS)


def in_place(x: float, y: float, size: int, place: tuple[str, str], margin: float = 0.05) -> bool:
    """Is the point in the stated (vertical, horizontal) place, each region widened by `margin`
    (fraction of the canvas) so an object drawn just across a boundary still counts?"""
    lo, hi = PLACE_BOUNDS

    def ok(v, word, words):
        f = v / size
        i = words.index(word)
        return (f < lo + margin) if i == 0 else (f > hi - margin) if i == 2 else (lo - margin < f < hi + margin)

    return ok(y, place[0], VERTICAL) and ok(x, place[1], POSITIONS)


def position_word(x: float, width: int) -> str:
    if x < width / 3:
        return "left"
    if x > 2 * width / 3:
        return "right"
    return "centre"


# ---------------------------------------------------------------------------------------------
# The held-out split


def _hash_fraction(*parts: str) -> float:
    h = hashlib.sha1("|".join(parts).encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32


def all_pairs() -> list[tuple[str, str]]:
    return [(c, s) for s in SHAPES for c in COLOURS]


def train_pairs() -> list[tuple[str, str]]:
    return [p for p in all_pairs() if p not in HELDOUT_PAIRS]


def is_heldout_combo(pair: tuple[str, str], background: str) -> bool:
    """About 1 in 6 (seen colour-shape, background) combinations are held out."""
    return _hash_fraction("combo", *pair, background) < 1 / 6


def is_heldout_pairing(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """About 1 in 6 unordered pairings of two different colour-shapes are held out."""
    x, y = sorted([a, b])
    return x != y and _hash_fraction("pairing", *x, *y) < 1 / 6


def is_train_scene(background: str, pairs: list[tuple[str, str]]) -> bool:
    if any(p in HELDOUT_PAIRS for p in pairs):
        return False
    if any(is_heldout_combo(p, background) for p in pairs):
        return False
    for i in range(len(pairs)):
        for j in range(i + 1, len(pairs)):
            if is_heldout_pairing(pairs[i], pairs[j]):
                return False
    return True


# ---------------------------------------------------------------------------------------------
# Captions

BG_PHRASES = {
    "grass": ("on grass", "on the grass", "in a grass field", "on a lawn of grass"),
    "sky": ("in the sky", "against the sky", "on a cloudy sky", "in a sky with clouds"),
    "sand": ("on sand", "on the sand", "on a beach of sand", "lying on sand"),
    "night": ("at night", "in the night", "on a starry night", "under the night"),
    "brick": ("on brick", "on a brick wall", "in front of a brick wall", "against bricks"),
}
TEMPLATES = (
    "{objs} {bg}",
    "a photo of {objs} {bg}",
    "photo of {objs} {bg}",
    "an image of {objs} {bg}",
    "a picture of {objs} {bg}",
    "{objs} {bg}, simple drawing",
)
PATTERN_WORD = {"plain": "", "dotted": "dotted", "striped": "striped"}


# (vertical, horizontal) -> phrase; `parse_prompt` inverts it (a missing axis word = middle/centre)
PLACE_PHRASES = {
    ("top", "left"): "at the top left", ("top", "centre"): "at the top", ("top", "right"): "at the top right",
    ("middle", "left"): "on the left", ("middle", "centre"): "in the centre", ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "centre"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}


def object_phrase(obj: WorldObject, mention_size: bool = False, place: tuple[str, str] | None = None) -> str:
    words = []
    if mention_size:
        words.append(obj.size)
    if obj.pattern != "plain":
        words.append(PATTERN_WORD[obj.pattern])
    words += [obj.colour, obj.shape]
    phrase = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    return phrase + " " + PLACE_PHRASES[place] if place else phrase


def objects_phrase(objects, mention_size: bool = False, canvas: int | None = None) -> str:
    """`canvas` (the image size) set: each object's place, from its box, follows it."""
    parts = [object_phrase(o, mention_size, o.place(canvas) if canvas else None) for o in objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def make_caption(background: str, objects, rng: np.random.Generator | None = None,
                 mention_size: bool = False, canvas: int | None = None) -> str:
    """A caption naming every object and the background; `rng=None` gives the plain template.
    With `canvas` (image size) it states every object's place from its ground-truth box."""
    if rng is None:
        template, bg = TEMPLATES[0], BG_PHRASES[background][0]
    else:
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        bg = BG_PHRASES[background][rng.integers(len(BG_PHRASES[background]))]
    return template.format(objs=objects_phrase(objects, mention_size, canvas), bg=bg)


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt states: background and objects (pattern None = not stated)."""

    background: str | None
    objects: tuple[tuple[str | None, str | None, str | None], ...]  # (colour, shape, pattern)
    # per object: its stated (vertical, horizontal) place or None; empty when no place is stated
    places: tuple[tuple[str, str] | None, ...] = ()

    @property
    def kind_default(self) -> str:
        return {1: "single", 2: "two", 3: "three"}.get(len(self.objects), "other")


_BG_WORDS = {"grass": "grass", "lawn": "grass", "sky": "sky", "clouds": "sky", "cloudy": "sky",
             "sand": "sand", "beach": "sand", "night": "night", "starry": "night",
             "brick": "brick", "bricks": "brick"}
_PLACE_WORDS = {"top": "top", "bottom": "bottom", "left": "left", "right": "right",
                "centre": "centre", "center": "centre", "middle": "centre"}


def parse_prompt(prompt: str) -> PromptSpec:
    """Read the stated background and objects out of a shapes-world prompt.

    Objects are closed by a shape word and take the colour/pattern words seen since the last one.
    Unknown words are ignored, so user prompts like "a red star on grass" parse too.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    bgs: list[str] = []
    objects: list[tuple[str | None, str, str | None]] = []
    place_words: list[set] = []  # place words seen after each object's shape word
    colour = pattern = None
    for w in words:
        if w in _PLACE_WORDS and objects:
            place_words[-1].add(_PLACE_WORDS[w])
            continue
        if w in COLOURS:
            colour = w
        elif w in ("dotted", "dots", "spotted"):
            pattern = "dotted"
        elif w in ("striped", "stripes", "stripy"):
            pattern = "striped"
        elif w in ("plain",):
            pattern = "plain"
        elif w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES):
            objects.append((colour, w if w in SHAPES else w[:-1], pattern))
            place_words.append(set())
            colour = pattern = None
        elif w in _BG_WORDS:
            bgs.append(_BG_WORDS[w])
    # "starry night" / "sky with clouds": the first background word wins, night beats sky
    bg = None
    if bgs:
        bg = "night" if "night" in bgs else bgs[0]
    places: tuple = ()
    if any(place_words):
        places = tuple(
            ((({"top", "bottom"} & pw or {"middle"}).pop(), ({"left", "right"} & pw or {"centre"}).pop())
             if pw else None) for pw in place_words)
    return PromptSpec(bg, tuple(objects), places)


# ---------------------------------------------------------------------------------------------
# Rendering

_SS = 4  # supersampling factor for anti-aliased shape masks


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.86 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        cy2 = cy + 0.15 * r
        return [
            (cx + 1.12 * r * math.cos(a), cy2 + 1.12 * r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r * (1.08 if k % 2 == 0 else 0.45)
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 16.5))
        return pts
    if shape == "cross":
        a, b = 0.34 * r, 1.0 * r
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a),
                (cx + b, cy + a), (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b),
                (cx - a, cy + a), (cx - b, cy + a), (cx - b, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased fill and outline alpha masks, float32 in [0, 1], shape (size, size)."""
    big = size * _SS
    img = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([(cx - r) * _SS, (cy - r) * _SS, (cx + r) * _SS, (cy + r) * _SS], fill=255)
    else:
        d.polygon([(x * _SS, y * _SS) for x, y in _shape_polygon(shape, cx, cy, r)], fill=255)
    small = img.resize((size, size), Image.BOX)
    fill = np.asarray(small, dtype=np.float32) / 255.0
    out = np.asarray(small.filter(ImageFilter.MaxFilter(3)), dtype=np.float32) / 255.0
    return fill, out


def _noise(rng, size, scale):
    """Smooth-ish value noise: a coarse random grid upsampled bilinearly."""
    n = max(2, size // scale)
    g = rng.standard_normal((n, n)).astype(np.float32)
    im = Image.fromarray(g, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(im)


def render_background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 RGB in [0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    jitter = rng.uniform(-12, 12, size=3).astype(np.float32)
    if name == "grass":
        base = np.array([55, 115, 38], np.float32) + jitter
        img = np.broadcast_to(base, (size, size, 3)).copy()
        img += _noise(rng, size, 8)[..., None] * 10
        # blades: short vertical strokes, darker and lighter
        blades = rng.standard_normal((size // 2 + 1, size)).astype(np.float32)
        blades = np.repeat(blades, 2, axis=0)[:size]
        img += blades[..., None] * np.array([6, 16, 5], np.float32)
    elif name == "sky":
        top = np.array([95, 150, 235], np.float32) + jitter
        bottom = np.array([175, 210, 250], np.float32) + jitter
        img = top + (bottom - top) * yy[..., None]
        for _ in range(rng.integers(2, 5)):
            cx, cy = rng.uniform(0, 1, 2)
            rx, ry = rng.uniform(0.12, 0.25), rng.uniform(0.05, 0.1)
            a = np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) * 2.0)
            img = img * (1 - 0.85 * a[..., None]) + 250 * 0.85 * a[..., None]
    elif name == "sand":
        base = np.array([222, 196, 142], np.float32) + jitter
        f, ph, tilt = rng.uniform(5, 9), rng.uniform(0, 2 * np.pi), rng.uniform(-0.5, 0.5)
        rip = np.sin(2 * np.pi * f * (yy + tilt * xx + 0.05 * _noise(rng, size, 16)) + ph)
        img = base + rip[..., None] * np.array([14, 14, 12], np.float32)
        img += rng.standard_normal((size, size, 1)).astype(np.float32) * 5
    elif name == "night":
        top = np.array([8, 10, 35], np.float32) + jitter / 3
        bottom = np.array([25, 30, 70], np.float32) + jitter / 3
        img = top + (bottom - top) * yy[..., None]
        n = rng.integers(size // 3, size // 2)
        ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
        img[ys, xs] = rng.uniform(160, 255, (n, 1))
    elif name == "brick":
        mortar = np.array([185, 178, 165], np.float32)
        img = np.broadcast_to(mortar, (size, size, 3)).copy()
        bh = max(4, size // 8)
        bw = 2 * bh
        base = np.array([165, 68, 48], np.float32) + jitter
        for row, y0 in enumerate(range(0, size, bh)):
            off = (bh if row % 2 else 0) - bw
            for x0 in range(off, size, bw):
                c = base + rng.uniform(-18, 18) + rng.uniform(-6, 6, 3)
                xa, xb = max(0, x0 + 1), min(size, x0 + bw)
                ya, yb = y0 + 1, min(size, y0 + bh)
                if xb > xa and yb > ya:
                    img[ya:yb, xa:xb] = c
        img += rng.standard_normal((size, size, 1)).astype(np.float32) * 4
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.clip(img, 0, 255)


def pattern_mask(pattern: str, size: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # coarse enough (period 9 px at 64 px) for a factor-4 VAE to keep them
    if pattern == "dotted":
        p = max(6.0, 9.0 * scale)
        ox, oy = rng.uniform(0, p, 2)
        dx = ((xx + ox) % p) - p / 2
        dy = ((yy + oy) % p) - p / 2
        return np.clip(2.4 * scale + 0.5 - np.sqrt(dx * dx + dy * dy), 0, 1)
    if pattern == "striped":
        p = max(6.0, 9.0 * scale)
        o = rng.uniform(0, p)
        v = ((xx + yy + o) % p) / p
        return ((v > 0.5)).astype(np.float32)
    return np.zeros((size, size), np.float32)


def render_scene(scene: Scene, rng: np.random.Generator, masks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Draw `scene` with the objects' (fill, outline) masks; returns uint8 (size, size, 3)."""
    size = scene.size
    img = render_background(scene.background, size, rng)
    scale = size / 64
    for obj, (fill, out) in zip(scene.objects, masks):
        colour = np.array(COLOUR_RGB[obj.colour], np.float32) + rng.uniform(-12, 12, 3)
        body = np.broadcast_to(np.clip(colour, 0, 255), (size, size, 3))
        if obj.pattern != "plain":
            pm = pattern_mask(obj.pattern, size, rng, scale)[..., None]
            body = body * (1 - pm) + 250 * pm
        img = img * (1 - out[..., None]) + 20 * out[..., None]
        img = img * (1 - fill[..., None]) + body * fill[..., None]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _box_from_mask(m: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(m > 0.3)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class WorldConfig:
    size: int = 64
    count_probs: tuple[float, float, float] = (0.5, 0.4, 0.1)  # 1, 2, 3 objects
    pattern_prob: float = 0.2  # probability that an object is dotted or striped
    size_word_prob: float = 0.3  # probability that the caption states object sizes
    place_prob: float = 0.4  # probability that the caption states every object's place (and size)


def _layout(rng, n, size, sizes):
    """Non-overlapping centres/radii for n objects; returns None when it cannot place them."""
    s = size / 64
    for _ in range(100):
        placed: list[tuple[float, float, float]] = []
        ok = True
        for sz in sizes:
            lo, hi = SMALL_RADIUS if sz == "small" else LARGE_RADIUS
            r = rng.uniform(lo, hi) * s
            m = r + 2 * s
            for _ in range(30):
                cx, cy = rng.uniform(m, size - m, 2)
                if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 3 * s) ** 2 for x, y, rr in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                ok = False
                break
        if ok:
            return placed
    return None


def sample_scene(
    seed: int,
    split: str = "train",
    config: WorldConfig = WorldConfig(),
    background: str | None = None,
    objects: list[tuple[str, str, str]] | None = None,
    sizes: list[str] | None = None,
) -> tuple[Scene, np.ndarray]:
    """One seeded scene and its uint8 image. `split`: "train" (respects the held-out split) or
    "any". `background`/`objects` ((colour, shape, pattern) triples)/`sizes` fix parts of it."""
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        bg = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        if objects is not None:
            spec = list(objects)
        else:
            n = int(rng.choice([1, 2, 3], p=config.count_probs))
            spec = []
            for _ in range(n):
                pat = "plain"
                if rng.random() < config.pattern_prob:
                    pat = ("dotted", "striped")[rng.integers(2)]
                spec.append((COLOURS[rng.integers(6)], SHAPES[rng.integers(6)], pat))
        pairs = [(c, s) for c, s, _ in spec]
        if objects is None and len(set(pairs)) < len(pairs):
            continue  # no duplicates of one colour-shape in random scenes
        if split == "train" and not is_train_scene(bg, pairs):
            if objects is not None and background is not None:
                raise ValueError(f"scene {bg} {spec} is held out of training")
            continue
        n = len(spec)
        if sizes is None:
            szs = ["small"] * n if n == 3 else [SIZES[rng.integers(2)] for _ in range(n)]
        else:
            szs = list(sizes)
        layout = _layout(rng, n, config.size, szs)
        if layout is None:
            continue
        items = []
        for (c, s, p), sz, (cx, cy, r) in zip(spec, szs, layout):
            masks = shape_mask(s, cx, cy, r, config.size)
            items.append((WorldObject(s, c, p, sz, _box_from_mask(masks[0])), masks))
        items.sort(key=lambda t: t[0].centre[0])  # left to right, so captions read naturally
        objs = [o for o, _ in items]
        mention = bool(rng.random() < config.size_word_prob)
        # a separate stream decides places, so images stay those of earlier versions for each seed
        placed = bool(np.random.default_rng([seed, 1]).random() < config.place_prob)
        caption = make_caption(bg, objs, rng, mention_size=mention or placed,
                               canvas=config.size if placed else None)
        scene = Scene(bg, tuple(objs), caption, config.size, seed, mention)
        image = render_scene(scene, rng, [m for _, m in items])
        return scene, image
    raise RuntimeError("could not sample a scene")


def sample_batch(seeds, split: str = "train", config: WorldConfig = WorldConfig()):
    """Scenes and a (N, size, size, 3) uint8 array for the given seeds."""
    scenes, images = [], []
    for s in seeds:
        sc, im = sample_scene(int(s), split, config)
        scenes.append(sc)
        images.append(im)
    return scenes, np.stack(images)


# ---------------------------------------------------------------------------------------------
# Held-out prompts


HELDOUT_KINDS = ("single", "novel", "two", "two-patterns", "three", "positioned")


def _pool_single():
    return [((p,), bg) for p in train_pairs() for bg in BACKGROUNDS if is_heldout_combo(p, bg)]


def _pool_two():
    tp = train_pairs()
    return [((a, b), bg) for i, a in enumerate(tp) for b in tp[i + 1:] if is_heldout_pairing(a, b)
            for bg in BACKGROUNDS if not is_heldout_combo(a, bg) and not is_heldout_combo(b, bg)]


def _pool_three():
    """Three seen colour-shapes, each seen on the background, at least one pairing held out."""
    tp = train_pairs()
    out = []
    for i, a in enumerate(tp):
        for j in range(i + 1, len(tp)):
            for b_ in tp[j + 1:]:
                trio = (a, tp[j], b_)
                if not any(is_heldout_pairing(x, y) for x, y in ((a, tp[j]), (a, b_), (tp[j], b_))):
                    continue
                out += [(trio, bg) for bg in BACKGROUNDS if not any(is_heldout_combo(p, bg) for p in trio)]
    return out


def heldout_prompts(kind: str, n: int, seed: int = 0) -> list[str]:
    """`n` deterministic held-out prompts of one kind.

    - "single": one seen colour-shape on a background it was never shown on in training;
    - "novel": one held-out colour-shape pair (never seen in training) on any background;
    - "two": two seen colour-shapes whose pairing was never shown together in training;
    - "two-patterns": a "two" pairing with both objects' patterns stated (dotted or striped);
    - "three": three seen colour-shapes with at least one held-out pairing among them;
    - "positioned": a "single" or "two" scene (alternately) with every object's size and place
      stated, taken from a real layout of the world's sampler (seeded).
    Prompts use the plain template "a {colour} {shape}[ and a ...] {bg phrase}".
    """
    rng = np.random.default_rng(seed)
    pool: list
    if kind == "single":
        pool = _pool_single()
    elif kind == "novel":
        pool = [((p,), bg) for p in sorted(HELDOUT_PAIRS) for bg in BACKGROUNDS]
    elif kind in ("two", "two-patterns"):
        pool = _pool_two()
    elif kind == "three":
        pool = _pool_three()
    elif kind == "positioned":
        return _positioned_prompts(n, rng)
    else:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {', '.join(HELDOUT_KINDS)}")
    idx = rng.permutation(len(pool))[: min(n, len(pool))]
    out = []
    for i in sorted(idx):
        pairs, bg = pool[i]
        pats = ["plain"] * len(pairs)
        if kind == "two-patterns":
            pats = [("dotted", "striped")[rng.integers(2)] for _ in pairs]
        objs = [WorldObject(s, c, pt) for (c, s), pt in zip(pairs, pats)]
        out.append(make_caption(bg, objs))
    return out


def _positioned_prompts(n: int, rng: np.random.Generator) -> list[str]:
    pools = (_pool_single(), _pool_two())
    picks = [rng.permutation(len(p)) for p in pools]
    out = []
    for i in range(n):
        pool, order = pools[i % 2], picks[i % 2]
        pairs, bg = pool[order[(i // 2) % len(pool)]]
        scene, _ = sample_scene(int(rng.integers(2**31)), "any", background=bg,
                                objects=[(c, s, "plain") for c, s in pairs])
        out.append(make_caption(bg, scene.objects, mention_size=True, canvas=scene.size))
    return out


def combination_prompts() -> list[tuple[tuple[str, str, str, str], str]]:
    """Every colour x pattern x shape on every background, in words: ((colour, pattern, shape,
    background), prompt), held-out pairs and combinations included."""
    return [((c, pt, s, bg), make_caption(bg, [WorldObject(s, c, pt)]))
            for s in SHAPES for c in COLOURS for pt in PATTERNS for bg in BACKGROUNDS]
