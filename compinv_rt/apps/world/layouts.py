"""Ground-truth layouts from the shapes world, for fitting and scoring the layout model
(`compinv-rt layout world-data`): captions, one phrase per object and its box."""

from __future__ import annotations

from compinv_rt.apps.world.scenes import is_train_scene, object_phrase, parse_prompt, sample_scene
from compinv_rt.core.errors import ConfigError
from compinv_rt.spatial.layout_model import LayoutExample

HELDOUT_SEED0 = 50_000_000  # held-out scenes are drawn from seeds far from the training seeds
PLACES = ("any", "stated", "unstated")


def _article(phrase: str) -> str:
    return phrase.split(" ", 1)[1] if phrase.startswith(("a ", "an ")) else phrase


def states_places(caption: str) -> bool:
    """Does a world caption state where its objects are ("... at the top left ...")?"""
    return bool(parse_prompt(caption).places)


def world_examples(n: int, split: str = "train", seed: int = 0,
                   places: str = "any") -> list[LayoutExample]:
    """`n` shapes-world scenes as layout records: the world's own caption, one phrase per object
    (its words as the caption says them, without the article and the place, e.g. "small dotted
    red star"), its ground-truth box normalized to [0, 1].

    split "train": scenes the world allows for training; "heldout": scenes it holds out (unseen
    colour-shape pairs, pairings or backgrounds), from a disjoint seed range.
    places "any": captions as the world makes them (about 40 % state every object's place and
    size, the rest say only which objects there are); "stated" / "unstated": only those scenes
    whose caption does / does not state places (the scenes' seeds are skipped, not rewritten)."""
    if split not in ("train", "heldout"):
        raise ConfigError(f"--split must be train or heldout, got {split!r}")
    if places not in PLACES:
        raise ConfigError(f"--places must be one of {', '.join(PLACES)}, got {places!r}")
    out: list[LayoutExample] = []
    s = seed if split == "train" else HELDOUT_SEED0 + seed
    while len(out) < n:
        scene, _ = sample_scene(s, split="train" if split == "train" else "any")
        s += 1
        if split == "heldout" and is_train_scene(scene.background, [o.pair for o in scene.objects]):
            continue
        placed = states_places(scene.caption)
        if places != "any" and placed != (places == "stated"):
            continue
        size = scene.size
        # placed captions state every object's size too (sample_scene)
        phrases = tuple(_article(object_phrase(o, scene.mention_size or placed)) for o in scene.objects)
        boxes = tuple((o.box[0] / size, o.box[1] / size, o.box[2] / size, o.box[3] / size)
                      for o in scene.objects)
        out.append(LayoutExample(scene.caption, phrases, boxes))
    return out
