"""Ground-truth layouts from the shapes world, for fitting and scoring the layout model
(`compinv-rt layout world-data`): captions, one phrase per object and its box."""

from __future__ import annotations

from compinv_rt.errors import ConfigError
from compinv_rt.spatial.layout_model import LayoutExample
from compinv_rt.world.scenes import BG_PHRASES, is_train_scene, object_phrase, sample_scene

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
    if split not in ("train", "heldout"):
        raise ConfigError(f"--split must be train or heldout, got {split!r}")
    out: list[LayoutExample] = []
    s = seed if split == "train" else HELDOUT_SEED0 + seed
    while len(out) < n:
        scene, _ = sample_scene(s, split="train" if split == "train" else "any")
        s += 1
        if split == "heldout" and is_train_scene(scene.background, [o.pair for o in scene.objects]):
            continue
        size = scene.size
        phrases = tuple(_article(object_phrase(o, scene.mention_size)) for o in scene.objects)
        boxes = tuple((o.box[0] / size, o.box[1] / size, o.box[2] / size, o.box[3] / size)
                      for o in scene.objects)
        caption = scene.caption
        if positions:
            where = {"left": "at the left", "centre": "in the middle", "right": "at the right"}
            parts = [f"{object_phrase(o, scene.mention_size)} {where[o.position(size)]}"
                     for o in scene.objects]
            objs = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
            caption = f"{objs} {BG_PHRASES[scene.background][0]}"
        out.append(LayoutExample(caption, phrases, boxes))
    return out
