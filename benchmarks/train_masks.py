"""IoU of `train --masks auto` (the base model's attention to the class word) with the shapes
world's subject silhouettes, for every `world photos` folder under a directory.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_masks.py PHOTOS_ROOT
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(root: str) -> None:
    from PIL import Image

    from compinv_rt.models.loading import load_model
    from compinv_rt.train.auto_masks import attention_masks, iou
    from compinv_rt.train.data import list_images, read_images

    torch.set_num_threads(1)
    m = load_model(None, device="cpu", dtype="fp32")
    rows = []
    for d in sorted(glob.glob(str(Path(root) / "*" / ""))):
        d = Path(d)
        c = json.loads((d / "concept.json").read_text())
        files = list_images(d)
        auto = attention_masks(m, read_images(files), c["image_size"], c["class_word"])
        true = [np.asarray(Image.open(d / "masks" / f.name), np.float32) / 255 for f in files]
        ious = [iou(a, t) for a, t in zip(auto, true)]
        box_ious = []
        for t, (x0, y0, x1, y1) in zip(true, c["boxes"]):
            b = np.zeros_like(t)
            b[y0:y1, x0:x1] = 1
            box_ious.append(iou(b, t))
        rows.append({"concept": c["description"], "iou_mean": round(float(np.mean(ious)), 3),
                     "iou_min": round(float(np.min(ious)), 3),
                     "box_iou_mean": round(float(np.mean(box_ious)), 3)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"iou_mean": round(float(np.mean([r["iou_mean"] for r in rows])), 3),
                      "box_iou_mean": round(float(np.mean([r["box_iou_mean"] for r in rows])), 3)}))


if __name__ == "__main__":
    main(sys.argv[1])
