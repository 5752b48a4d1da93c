"""Per-image metrics from the judge's reading and the recorded cross-attention, and their means.

For a prompt the judge can read (every concept has world attributes), its stated objects are
"slots" in order of mention: a concept slot asks for the concept's colour, pattern and shape, a
pretrained slot for what the prompt states (colour and shape; pattern only where stated). Per image:
- identity: share of the prompt's concepts found (colour + pattern + shape on one detection);
  `identity_by` keeps it per concept, so a concept's identity is counted on that concept alone;
- other: the prompt's other (pretrained) objects as stated, one-to-one (None without any);
- coi: the concept of interest is there: for a pretrained composition the other (pretrained)
  objects as stated (colour and shape), one-to-one; for an inverted pair both concepts' classes
  (shapes), one-to-one -- class-level presence, as the paper's detector measures it;
- accuracy: every stated object one-to-one and the stated background;
- region: every stated object one-to-one with its detected centre inside its layout box (first
  mention left 0.1,0.2,0.5,0.8, second right 0.6,0.2,0.95,0.8: the reference's fixed boxes), the
  same boxes whether or not the method was given a layout.
Attention dominance per image (cross-attention averaged over steps, layers and heads): the share of
the attention mass (among the prompt's own tokens) on each concept's placeholder token(s), the
normalized spatial entropy of that map (1 = spread evenly over the canvas), and the share of the
other objects' tokens.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

METRICS = ("coi", "identity", "accuracy", "region")
# Word parity is only meaningful where the base draws the concept from words at all: concepts
# whose words identity in compositions is below this floor are reported but left out of the means.
WORDS_FLOOR = 0.2
ATTENTION = ("concept_share", "concept_entropy", "other_share")


@dataclass(frozen=True)
class Slot:
    colour: str | None
    shape: str | None
    pattern: str | None
    concept: str | None  # concept name, None = a pretrained object

    def matches(self, d) -> bool:
        return ((self.colour is None or d.colour == self.colour)
                and (self.shape is None or d.shape == self.shape)
                and (self.pattern is None or d.pattern == self.pattern))


def prompt_slots(prompt, concepts) -> tuple[list[Slot], str | None] | None:
    """(slots in order of mention, stated background), or None when the judge cannot read it."""
    from compinv_rt.apps.world.scenes import parse_prompt

    used = [concepts[n] for n in prompt.concepts]
    if not all(c.is_world for c in used):
        return None
    spec = parse_prompt(prompt.render(concepts, "world"))
    pending = list(used)
    slots = []
    for colour, shape, pattern in spec.objects:
        c = next((c for c in pending if c.colour == colour and c.shape == shape), None)
        if c is not None:
            pending.remove(c)
            slots.append(Slot(c.colour, c.shape, c.pattern or "plain", c.name))
        else:
            slots.append(Slot(colour, shape, pattern, None))
    if pending:  # a concept the parser did not find: the prompt is not readable
        return None
    return slots, spec.background


def _assignments(slots, detections):
    """Every one-to-one assignment slot -> detection that agrees with every slot."""
    for perm in itertools.permutations(range(len(detections)), len(slots)):
        if all(s.matches(detections[j]) for s, j in zip(slots, perm)):
            yield perm


def _inside(det, box, size: int) -> bool:
    x0, y0, x1, y1 = box
    cx, cy = (det.box[0] + det.box[2]) / 2 / size, (det.box[1] + det.box[3]) / 2 / size
    return x0 <= cx <= x1 and y0 <= cy <= y1


def score_image(slots: list[Slot], background: str | None, judgement, judge_size: int) -> dict:
    from compinv_rt.spatial.layouts import fixed_boxes

    dets = list(judgement.objects)
    concept_slots = [s for s in slots if s.concept]
    other = [s for s in slots if not s.concept]

    def present(group):
        return next(_assignments(group, dets), None) is not None

    identity_by = {s.concept: float(present([s])) for s in concept_slots}
    identity = sum(identity_by.values()) / len(concept_slots)
    # CoI is class-level, like the paper's detector: the pretrained objects as stated, or for an
    # inverted pair both concepts' classes (shapes); their full likeness is `identity`/`accuracy`
    coi = present(other) if other else present([Slot(None, s.shape, None, s.concept)
                                                 for s in concept_slots])
    everything = present(slots)
    boxes = fixed_boxes(len(slots))
    region = any(all(_inside(dets[j], b, judge_size) for j, b in zip(perm, boxes))
                 for perm in _assignments(slots, dets))
    bg_ok = background is None or judgement.background == background
    return {"coi": float(coi), "identity": float(identity),
            "accuracy": float(everything and bg_ok), "region": float(region),
            "background": judgement.background,
            # per concept of the prompt (so a concept's identity is counted on it alone), and
            # whether the other (pretrained) objects came out as stated (None: there are none)
            "identity_by": identity_by, "other": float(present(other)) if other else None}


def attention_stats(maps, content: list[int], concept_positions: list[list[int]],
                    other_positions: list[list[int]]) -> dict:
    """maps: (T, h, w) mean attention per pixel for one image; positions index T."""
    import torch

    mass = maps.flatten(1).sum(1)  # (T,)
    total = float(mass[content].sum().clamp_min(1e-12))
    shares, entropies = [], []
    for pos in concept_positions:
        shares.append(float(mass[pos].sum()) / total)
        m = maps[pos].sum(0).flatten().double()
        p = m / m.sum().clamp_min(1e-12)
        h = float(-(p * torch.log(p.clamp_min(1e-30))).sum())
        entropies.append(h / math.log(p.numel()))
    other = sum(float(mass[pos].sum()) for pos in other_positions) / total if other_positions else None
    return {"concept_share": sum(shares) / len(shares),
            "concept_entropy": sum(entropies) / len(entropies),
            "other_share": other}


def mean_of(records: list[dict], key: str) -> float | None:
    vals = [r[key] for r in records if r.get(key) is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def aggregate(samples: list[dict], keys=METRICS + ATTENTION + ("clip_text", "clip_image",
                                                              "detr_coi")) -> dict:
    """Means over images of every metric (None where no image had it), with the image count."""
    return {"images": len(samples), **{k: mean_of(samples, k) for k in keys}}


def concept_metrics(samples: list[dict], name: str) -> dict:
    """One concept's identity (on that concept only) and the other objects' rate, over images."""
    ident = [r["identity_by"][name] for r in samples if name in (r.get("identity_by") or {})]
    other = [r["other"] for r in samples if r.get("other") is not None]
    return {"images": len(samples),
            "identity": round(sum(ident) / len(ident), 4) if ident else None,
            "other": round(sum(other) / len(other), 4) if other else None}


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else round(value / base, 4)


def relative(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return round((value - base) / base, 4)
