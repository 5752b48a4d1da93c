"""How high can a layout model's mean IoU go on shapes-world captions?

A caption states which objects there are, their order (left to right), sometimes their size and,
in about 40 % of the world's captions, each object's place ("at the top left", "on the right",
"in the centre"); within a stated place (or anywhere, when none is stated) the world puts the
object at random. This fits, on the evaluation set itself (an optimistic upper bound), the single
best box for every group of concepts a caption cannot tell apart: (number of objects, slot, stated
size, stated place). No predictor that reads only the caption can beat it on average. Reported
over all prompts and separately over those that state places and those that do not.

    .venv/bin/python benchmarks/spatial/iou_ceiling.py heldout.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch

from compinv_rt.apps.world.scenes import parse_prompt
from compinv_rt.spatial.layout_model import box_iou, read_jsonl


def best_box_iou(boxes: list) -> float:
    """Mean IoU of the single box that best fits all `boxes` (Adam on centre and size)."""
    target = torch.tensor(boxes)
    raw = torch.zeros(4, requires_grad=True)  # centre, size through a sigmoid
    with torch.no_grad():
        raw[:2] = torch.logit(((target[:, :2] + target[:, 2:]) / 2).mean(0).clamp(0.01, 0.99))
        raw[2:] = torch.logit((target[:, 2:] - target[:, :2]).mean(0).clamp(0.01, 0.99))
    opt = torch.optim.Adam([raw], lr=0.02)
    for _ in range(600):
        c, s = torch.sigmoid(raw[:2]), torch.sigmoid(raw[2:])
        box = torch.cat([c - s / 2, c + s / 2])
        loss = -box_iou(box.expand_as(target), target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return -loss.item()


def main(path: str) -> dict:
    torch.set_num_threads(1)
    groups = defaultdict(list)
    for e in read_jsonl(path):
        places = parse_prompt(e.prompt).places
        for k, (phrase, box) in enumerate(zip(e.phrases, e.boxes)):
            size = next((w for w in ("small", "large") if phrase.startswith(w + " ")), None)
            place = places[k] if k < len(places) else None
            groups[(len(e.phrases), k, size, place)].append(box)
    sums = defaultdict(lambda: [0.0, 0])
    for (*_, place), boxes in groups.items():
        iou = best_box_iou(boxes)
        for name in ("all", "positioned" if place else "unpositioned"):
            sums[name][0] += iou * len(boxes)
            sums[name][1] += len(boxes)
    result = {"groups": len(groups), "concepts": sums["all"][1],
              **{f"ceiling_mean_iou_{name}": round(t / c, 4) for name, (t, c) in sums.items()},
              **{f"concepts_{name}": c for name, (t, c) in sums.items() if name != "all"}}
    result["ceiling_mean_iou"] = result.pop("ceiling_mean_iou_all")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1])
