"""How high can a layout model's mean IoU go on shapes-world captions?

Captions state which objects there are, their order (left to right) and sometimes their size, but
never where they are. This fits, on the evaluation set itself (an optimistic upper bound), the
single best box for every group of concepts a caption cannot tell apart: (number of objects,
slot, stated size, stated position if the caption has one: see `layout world-data --positions`).
No predictor that reads only the caption can beat it on average.

    .venv/bin/python benchmarks/spatial/iou_ceiling.py heldout.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict

import torch

from compinv_rt.spatial.layout_model import box_iou, read_jsonl


def main(path: str) -> dict:
    torch.set_num_threads(1)
    groups = defaultdict(list)
    for e in read_jsonl(path):
        for k, (phrase, box) in enumerate(zip(e.phrases, e.boxes)):
            size = next((w for w in ("small", "large") if phrase.startswith(w + " ")), None)
            where = re.search(re.escape(phrase) + r" (at the left|in the middle|at the right)", e.prompt)
            groups[(len(e.phrases), k, size, where and where.group(1))].append(box)
    total, count = 0.0, 0
    for boxes in groups.values():
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
        total += -loss.item() * len(boxes)
        count += len(boxes)
    result = {"groups": len(groups), "concepts": count, "ceiling_mean_iou": round(total / count, 4)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1])
