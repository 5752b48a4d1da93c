"""Layouts: normalized boxes per concept phrase, the `--layout` text format, and the token lookup.

A layout gives each concept (a word or phrase of the prompt) one or more boxes `x0,y0,x1,y1` in
[0, 1] image coordinates (x right, y down). `--layout` takes:

- `none`: no layout;
- `auto`: the concepts are read out of the prompt (`concept_phrases`) and their boxes come from
  the layout model, or from the reference's fixed boxes when there is none;
- `phrase=x0,y0,x1,y1;phrase=...`: explicit boxes; a phrase named twice gets two boxes;
- `phrase;phrase`: explicit concepts, boxes from the layout model (entries may mix both forms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from compinv_rt.core.errors import ConfigError

MAX_CONCEPTS = 4
Box = tuple[float, float, float, float]  # x0, y0, x1, y1, normalized

# The reference implementation's fixed evaluation boxes (first concept left, second right).
REFERENCE_BOXES: tuple[Box, ...] = ((0.1, 0.2, 0.5, 0.8), (0.6, 0.2, 0.95, 0.8))


class SpatialMode(str, Enum):
    none = "none"
    bias = "bias"  # additive attention-logit bias: an ordinary UNet input, every backend
    adaptive = "adaptive"  # the bias in units of each layer's logit spread, decaying with noise level
    guidance = "guidance"  # backward layout guidance on the latents: PyTorch only


class LayoutSource(str, Enum):
    explicit = "explicit"
    model = "model"
    fixed = "fixed"


@dataclass(frozen=True)
class ConceptRegion:
    phrase: str
    boxes: tuple[Box, ...]  # empty: to be filled in by the layout model or the fixed boxes


@dataclass(frozen=True)
class LayoutSpec:
    """What `--layout` asked for, before the prompt and the tokenizer are known."""

    kind: str  # "none" | "auto" | "explicit"
    regions: tuple[ConceptRegion, ...] = ()

    @property
    def needs_boxes(self) -> bool:
        return self.kind == "auto" or any(not r.boxes for r in self.regions)


@dataclass(frozen=True)
class ResolvedConcept:
    phrase: str
    boxes: tuple[Box, ...]
    tokens: tuple[int, ...]  # positions in the 77-token sequence (BOS = 0)

    def to_json(self) -> dict:
        return {"phrase": self.phrase, "boxes": [list(b) for b in self.boxes],
                "tokens": list(self.tokens)}


@dataclass(frozen=True)
class Layout:
    concepts: tuple[ResolvedConcept, ...]
    source: LayoutSource

    def to_json(self) -> dict:
        return {"source": self.source.value, "concepts": [c.to_json() for c in self.concepts]}


def check_box(box, where: str = "box") -> Box:
    """A valid normalized box or a ConfigError saying what is wrong."""
    if len(box) != 4:
        raise ConfigError(f"{where} needs 4 numbers x0,y0,x1,y1, got {len(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(v == v and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):  # v == v: not NaN
        raise ConfigError(f"{where} {x0:g},{y0:g},{x1:g},{y1:g} is outside [0, 1] "
                          "(boxes are normalized x0,y0,x1,y1)")
    if not (x0 < x1 and y0 < y1):
        raise ConfigError(f"{where} {x0:g},{y0:g},{x1:g},{y1:g} is empty or inverted "
                          "(need x0 < x1 and y0 < y1)")
    return (x0, y0, x1, y1)


def check_concept_count(n: int) -> None:
    if n > MAX_CONCEPTS:
        raise ConfigError(f"the layout names {n} concepts; at most {MAX_CONCEPTS} are supported")


def parse_layout(text: str | None) -> LayoutSpec:
    """Parse `--layout`. Raises ConfigError on malformed text, bad boxes or too many concepts."""
    if text is None or text.strip().lower() in ("", "none"):
        return LayoutSpec("none")
    if text.strip().lower() == "auto":
        return LayoutSpec("auto")
    boxes: dict[str, list[Box]] = {}
    for raw in text.split(";"):
        entry = raw.strip()
        if not entry:
            raise ConfigError(f"--layout {text!r} has an empty entry; expected "
                              "'phrase=x0,y0,x1,y1;phrase=...'")
        phrase, sep, coords = entry.partition("=")
        phrase = " ".join(phrase.split())
        if not phrase:
            raise ConfigError(f"--layout entry {entry!r} has no phrase before '='")
        if sep and "=" in coords:
            raise ConfigError(f"--layout entry {entry!r} has more than one '='")
        if not sep and re.search(r"[\d.]+\s*,", phrase):
            raise ConfigError(f"--layout entry {entry!r} is malformed; expected "
                              "'phrase=x0,y0,x1,y1' (or a phrase alone for a predicted box)")
        box_list = boxes.setdefault(phrase, [])
        if not sep:
            continue  # a phrase without a box: boxes from the layout model
        parts = [p.strip() for p in coords.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--layout entry {entry!r}: boxes are 4 comma-separated numbers "
                              "x0,y0,x1,y1") from None
        box_list.append(check_box(values, f"--layout box for {phrase!r}"))
    check_concept_count(len(boxes))
    kinds = {bool(b) for b in boxes.values()}
    if kinds == {True, False}:
        raise ConfigError("--layout gives boxes for some phrases but not for others; give boxes "
                          "for all of them or for none")
    return LayoutSpec("explicit", tuple(ConceptRegion(p, tuple(b)) for p, b in boxes.items()))


def boxes_layout(phrases, boxes) -> LayoutSpec:
    """Explicit boxes given in code, one per phrase (a phrase named twice gets both boxes), checked
    as `--layout`'s are: what `parse_layout` gives for the same text, without the text."""
    merged: dict[str, list[Box]] = {}
    for phrase, box in zip(phrases, boxes):
        merged.setdefault(" ".join(phrase.split()), []).append(check_box(box, f"box for {phrase!r}"))
    check_concept_count(len(merged))
    return LayoutSpec("explicit", tuple(ConceptRegion(p, tuple(b)) for p, b in merged.items()))


def format_layout(regions) -> str:
    """The `--layout` text for resolved regions (inverse of parse_layout)."""
    return ";".join(f"{r.phrase}=" + ",".join(f"{v:.3g}" for v in b) for r in regions for b in r.boxes)


# --- concepts and their tokens -------------------------------------------------------------

_SPLIT = re.compile(r",|\band\b|\bwith\b|\bnext to\b|\bbeside\b|\bin front of\b|\bbehind\b")
_TRAIL = re.compile(r"\b(on|in|at|under|against|over|above|below|lying|near|by)\b.*$")
_LEAD = re.compile(r"^((a|an|the|one|some|two|photo|picture|image|drawing|painting|of)\s+)+")


def concept_phrases(prompt: str) -> list[str]:
    """Concepts a plain prompt composes: "a photo of a cat and a dog on grass" -> ["cat", "dog"]
    style parts split at "and", commas, "with", "next to", "in front of"..., without articles
    and trailing place phrases. A heuristic: pass the phrases explicitly when it guesses wrong."""
    phrases = []
    for part in _SPLIT.split(prompt.lower()):
        part = _TRAIL.sub("", " ".join(part.split())).strip()
        part = _LEAD.sub("", part).strip()
        if part and part not in phrases:
            phrases.append(part)
    if not phrases:
        raise ConfigError(f"no concepts found in the prompt {prompt!r}; name them with "
                          "--layout 'phrase;phrase' or give boxes")
    return phrases


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special, truncation=False).input_ids


def token_positions(tokenizer, prompt: str, phrase: str, taken: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Positions (BOS = 0) of every token of `phrase` in the tokenized prompt.

    The phrase is tokenized exactly like the prompt, so multi-token phrases and multi-vector
    placeholder tokens (several added tokens) are matched as one contiguous run. The first run
    that does not overlap `taken` wins (a phrase named twice finds its second occurrence).
    """
    prompt_ids = _ids(tokenizer, prompt, special=True)  # [BOS, ..., EOS]
    phrase_ids = _ids(tokenizer, phrase, special=False)
    if not phrase_ids:
        raise ConfigError(f"the layout phrase {phrase!r} has no tokens")
    n, limit = len(phrase_ids), tokenizer.model_max_length - 1  # the last kept slot is EOS
    found_beyond = False
    for start in range(1, len(prompt_ids) - n + 1):
        if prompt_ids[start:start + n] == phrase_ids:
            span = list(range(start, start + n))
            if span[-1] >= limit:
                found_beyond = True
                break
            if not taken.intersection(span):
                return span
    if found_beyond:
        raise ConfigError(f"the layout phrase {phrase!r} lies beyond the text encoder's "
                          f"{tokenizer.model_max_length}-token limit; shorten the prompt")
    raise ConfigError(f"the layout phrase {phrase!r} is not in the prompt {prompt!r}")


def concept_tokens(tokenizer, prompt: str, phrases) -> list[list[int]]:
    """token_positions for several phrases; no token belongs to two concepts."""
    taken: set[int] = set()
    out = []
    for phrase in phrases:
        pos = token_positions(tokenizer, prompt, phrase, taken)
        taken.update(pos)
        out.append(pos)
    return out


def fixed_boxes(n: int) -> list[Box]:
    """The reference's fixed boxes for 2 concepts; equal columns otherwise."""
    if n == 2:
        return list(REFERENCE_BOXES)
    if n == 1:
        return [(0.2, 0.2, 0.8, 0.8)]
    w = 1.0 / n
    return [(round(i * w + 0.05 * w, 4), 0.2, round((i + 1) * w - 0.05 * w, 4), 0.8) for i in range(n)]


def fixed_layout(prompt: str) -> LayoutSpec:
    """The prompt's concepts (`concept_phrases`) with the reference's fixed boxes, explicitly: what
    `--layout auto` gives when the model has no layout model (comparisons that must not change
    when one is shipped)."""
    phrases = concept_phrases(prompt)
    return boxes_layout(phrases, fixed_boxes(len(phrases)))


def resolve_layout(spec: LayoutSpec, tokenizer, prompt: str, predictor=None,
                   expand=None) -> Layout | None:
    """Turn `--layout` into concepts with boxes and token positions for this prompt.

    `predictor(prompt, token_lists) -> list[Box]` is the layout model (None: fixed boxes).
    `expand(text) -> text` applies the prompt's placeholder expansion (a multi-vector concept token
    becomes all its vectors) to user-given phrases, so every vector gets the concept's region."""
    if spec.kind == "none":
        return None
    if spec.kind == "explicit":
        phrases = [r.phrase for r in spec.regions]
        lookup = [expand(p) if expand else p for p in phrases]
    else:  # read out of the (already expanded) prompt
        phrases = lookup = concept_phrases(prompt)
    check_concept_count(len(phrases))
    tokens = concept_tokens(tokenizer, prompt, lookup)
    if not spec.needs_boxes:
        boxes = [r.boxes for r in spec.regions]
        source = LayoutSource.explicit
    elif predictor is not None:
        boxes = [(check_box(b, "predicted box"),) for b in predictor(prompt, tokens)]
        source = LayoutSource.model
    else:
        boxes = [(b,) for b in fixed_boxes(len(phrases))]
        source = LayoutSource.fixed
    return Layout(tuple(ResolvedConcept(p, tuple(b), tuple(t))
                        for p, b, t in zip(phrases, boxes, tokens)), source)
