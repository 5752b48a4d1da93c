"""The judge: a small CNN that reads a shapes-world image back into ground truth.

It predicts the background (global head) and, CenterNet-style on a stride-8 grid, for each cell an
objectness logit, the shape / colour / pattern of the object centred there and its box (centre
offset in the cell, width and height). Decoding keeps the cells whose objectness is a local 3x3
maximum above 0.5. Trained on the scene generator (all colour-shape pairs, including those held
out of the diffusion model's training), with mild blur/noise augmentation so it also reads the
softer images a VAE or a diffusion model produces; it is evaluated on clean held-out scenes.

Saved as `judge.safetensors` + `judge.json` (config and measured accuracy); never pickle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from compinv_rt.apps.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    PATTERNS,
    SHAPES,
    Scene,
    WorldConfig,
    position_word,
    sample_batch,
)
from compinv_rt.core.errors import ModelError
from compinv_rt.models.embedded import EMBEDDED_JUDGE_DIR

log = logging.getLogger(__name__)
STRIDE = 8
_NHEAD = 1 + len(SHAPES) + len(COLOURS) + len(PATTERNS) + 4
TEST_SEED0 = 900_000_000  # seeds of the clean held-out evaluation scenes (never used to train)


@dataclass(frozen=True)
class JudgeConfig:
    size: int = 64
    width: int = 32
    steps: int = 2500
    batch: int = 64
    lr: float = 2e-3
    train_scenes: int = 24000
    seed: int = 0


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    pattern: str
    score: float
    box: tuple[float, float, float, float]
    position: str

    def to_json(self) -> dict:
        return {**asdict(self), "box": [round(v, 1) for v in self.box], "score": round(self.score, 3)}


@dataclass(frozen=True)
class Judgement:
    background: str
    objects: tuple[Detection, ...]

    def to_json(self) -> dict:
        return {"background": self.background, "objects": [o.to_json() for o in self.objects]}


def _net(width: int):
    import torch.nn as nn

    def block(ci, co, stride=1, dil=1):
        return [nn.Conv2d(ci, co, 3, stride, padding=dil, dilation=dil, bias=False),
                nn.BatchNorm2d(co), nn.ReLU(inplace=True)]

    w = width

    class JudgeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                *block(3, w, 2), *block(w, w),  # 32x32
                *block(w, 2 * w, 2), *block(2 * w, 2 * w),  # 16x16
                *block(2 * w, 4 * w, 2),  # 8x8
                *block(4 * w, 4 * w, dil=2), *block(4 * w, 4 * w, dil=2),
            )
            self.head = nn.Conv2d(4 * w, _NHEAD, 1)
            self.bg = nn.Linear(4 * w, len(BACKGROUNDS))

        def forward(self, x):  # x: (B, 3, H, W) in [0, 1]
            f = self.body((x - 0.5) / 0.25)  # (B, 4w, H/8, W/8)
            return self.head(f), self.bg(f.mean((2, 3)))

    return JudgeNet()


def _targets(scenes: list[Scene], size: int):
    """Dense targets: (N, g, g) objectness, classes (-1 = none), (N, 4, g, g) boxes; bg (N,)."""
    g = size // STRIDE
    n = len(scenes)
    obj = np.zeros((n, g, g), np.float32)
    cls = np.full((n, 3, g, g), -1, np.int64)
    box = np.zeros((n, 4, g, g), np.float32)
    bg = np.zeros(n, np.int64)
    for i, sc in enumerate(scenes):
        bg[i] = BACKGROUNDS.index(sc.background)
        for o in sc.objects:
            cx, cy = o.centre
            gx, gy = min(g - 1, int(cx // STRIDE)), min(g - 1, int(cy // STRIDE))
            obj[i, gy, gx] = 1
            cls[i, :, gy, gx] = (SHAPES.index(o.shape), COLOURS.index(o.colour), PATTERNS.index(o.pattern))
            x0, y0, x1, y1 = o.box
            box[i, :, gy, gx] = (cx / STRIDE - gx, cy / STRIDE - gy, (x1 - x0) / size, (y1 - y0) / size)
    return obj, cls, box, bg


def _augment(x, gen):
    """Mild blur / noise / brightness changes on half of a batch (x: (B,3,H,W) in [0,1])."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    sel = torch.rand(b, generator=gen) < 0.5
    if sel.any():
        sigma = 0.4 + 0.8 * torch.rand(1, generator=gen).item()
        k = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-(k ** 2) / (2 * sigma ** 2))
        k = k / k.sum()
        xs = x[sel]
        c = xs.shape[1]
        xs = F.conv2d(F.pad(xs, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
        xs = F.conv2d(F.pad(xs, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)
        x = x.clone()
        x[sel] = xs
    noise = torch.rand(b, 1, 1, 1, generator=gen) * 0.05
    x = x + noise * torch.randn(x.shape, generator=gen)
    x = x * (1 + 0.08 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5))
    return x.clamp(0, 1)


class Judge:
    """A loaded judge. `judge(images)` takes uint8 (N,H,W,3) arrays, PIL images or a float
    (N,3,H,W) tensor in [0, 1] and returns one `Judgement` per image."""

    def __init__(self, net, config: JudgeConfig, meta: dict | None = None):
        self.net = net.eval()
        self.config = config
        self.meta = meta or {}

    # -- inputs ------------------------------------------------------------------------------
    def _tensor(self, images):
        import torch
        import torch.nn.functional as F

        if isinstance(images, torch.Tensor):
            x = images.float()
        else:
            if isinstance(images, np.ndarray) and images.ndim == 3:
                images = images[None]
            arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        s = self.config.size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x

    def raw(self, images):
        import torch

        with torch.no_grad():
            return self.net(self._tensor(images))

    def __call__(self, images, threshold: float = 0.5, batch: int = 256) -> list[Judgement]:
        import torch
        import torch.nn.functional as F

        x = self._tensor(images)
        out: list[Judgement] = []
        s = self.config.size
        with torch.no_grad():
            for i in range(0, x.shape[0], batch):
                dense, bg = self.net(x[i:i + batch])
                prob = torch.sigmoid(dense[:, 0])  # (B, g, g)
                peak = (prob == F.max_pool2d(prob[:, None], 3, 1, 1)[:, 0]) & (prob > threshold)
                o = 1
                sh = dense[:, o:o + 6].argmax(1)
                co = dense[:, o + 6:o + 12].argmax(1)
                pa = dense[:, o + 12:o + 15].argmax(1)
                bx = torch.sigmoid(dense[:, o + 15:o + 19])
                bgi = bg.argmax(1)
                for b in range(dense.shape[0]):
                    dets = []
                    for gy, gx in peak[b].nonzero().tolist():
                        ox, oy = bx[b, 0, gy, gx].item(), bx[b, 1, gy, gx].item()
                        w, h = bx[b, 2, gy, gx].item() * s, bx[b, 3, gy, gx].item() * s
                        cx, cy = (gx + ox) * STRIDE, (gy + oy) * STRIDE
                        dets.append(Detection(
                            SHAPES[sh[b, gy, gx]], COLOURS[co[b, gy, gx]], PATTERNS[pa[b, gy, gx]],
                            prob[b, gy, gx].item(), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
                            position_word(cx, s)))
                    dets.sort(key=lambda d: d.box[0] + d.box[2])
                    out.append(Judgement(BACKGROUNDS[bgi[b]], tuple(dets)))
        return out

    # -- persistence -------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
        tmp = out / "judge.safetensors.tmp"
        save_file(sd, str(tmp), metadata={"config": json.dumps(asdict(self.config))})
        os.replace(tmp, out / "judge.safetensors")
        meta = {"config": asdict(self.config), "stride": STRIDE, "backgrounds": BACKGROUNDS,
                "shapes": SHAPES, "colours": COLOURS, "patterns": PATTERNS, **self.meta}
        tmp = out / "judge.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out / "judge.json")
        return out


def load_judge(path: str | Path | None = None) -> Judge:
    """Load a judge folder (default: the one shipped in the package)."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else default_judge_dir()
    f = d / "judge.safetensors"
    if not f.is_file():
        raise ModelError(f"no judge at {d} (expected judge.safetensors + judge.json)")
    meta = json.loads((d / "judge.json").read_text())
    fields = JudgeConfig.__dataclass_fields__
    config = JudgeConfig(**{k: v for k, v in meta["config"].items() if k in fields})
    net = _net(config.width)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
    net.load_state_dict(sd)
    meta.pop("config", None)
    return Judge(net, config, meta)


def default_judge_dir() -> Path:
    return EMBEDDED_JUDGE_DIR


# ---------------------------------------------------------------------------------------------
# Training


def train_judge(
    config: JudgeConfig = JudgeConfig(),
    progress: Callable[[int, int, dict], None] | None = None,
) -> Judge:
    """Train a judge from scratch on freshly generated scenes (split "any"). Seeded."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    wc = WorldConfig(size=config.size)
    t0 = time.time()
    first = config.seed * 10_000_000
    scenes, images = sample_batch(range(first, first + config.train_scenes), "any", wc)
    log.info("generated %d scenes in %.1fs", len(scenes), time.time() - t0)
    obj, cls, box, bg = (torch.from_numpy(a) for a in _targets(scenes, config.size))
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, H, W)
    net = _net(config.width)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    n = x_all.shape[0]
    net.train()
    for step in range(config.steps):
        lr = config.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        idx = torch.randint(0, n, (config.batch,), generator=gen)
        x = _augment(x_all[idx].float() / 255.0, gen)
        dense, bgl = net(x)
        pos = obj[idx]  # (B, g, g)
        l_obj = F.binary_cross_entropy_with_logits(dense[:, 0], pos, pos_weight=torch.tensor(4.0))
        m = pos > 0
        c = cls[idx]
        l_cls = 0.0
        for j, (a, b) in enumerate(((1, 7), (7, 13), (13, 16))):
            logits = dense[:, a:b].permute(0, 2, 3, 1)[m]  # (P, k)
            l_cls = l_cls + F.cross_entropy(logits, c[:, j][m])
        pb = dense[:, 16:20].permute(0, 2, 3, 1)[m]
        tb = box[idx].permute(0, 2, 3, 1)[m]
        l_box = F.l1_loss(torch.sigmoid(pb), tb)
        l_bg = F.cross_entropy(bgl, bg[idx])
        loss = l_obj + l_cls + 5 * l_box + l_bg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, config.steps, {"loss": loss.item()})
    net.eval()
    return Judge(net, config)


def evaluate_judge(judge: Judge, n: int = 1000, seed0: int = TEST_SEED0, images=None, scenes=None) -> dict:
    """Accuracy on clean held-out scenes (or on the given images with their scenes' truth)."""
    if scenes is None:
        scenes, images = sample_batch(range(seed0, seed0 + n), "any", WorldConfig(size=judge.config.size))
    preds = judge(images)
    return compare(scenes, preds)


def compare(scenes: list[Scene], preds: list[Judgement]) -> dict:
    """Per-attribute accuracy of judgements against ground truth scenes."""
    tot = dict(bg=0, count=0, exact=0, objects=0, found=0, shape=0, colour=0, pattern=0, position=0)
    for sc, pr in zip(scenes, preds):
        tot["bg"] += pr.background == sc.background
        tot["count"] += len(pr.objects) == len(sc.objects)
        truth = sorted((o.shape, o.colour, o.pattern) for o in sc.objects)
        got = sorted((d.shape, d.colour, d.pattern) for d in pr.objects)
        tot["exact"] += truth == got
        for o in sc.objects:
            tot["objects"] += 1
            cx, cy = o.centre
            best = None
            for d in pr.objects:
                dx = (d.box[0] + d.box[2]) / 2 - cx
                dy = (d.box[1] + d.box[3]) / 2 - cy
                dist = math.hypot(dx, dy)
                if dist < 8 and (best is None or dist < best[0]):
                    best = (dist, d)
            if best is None:
                continue
            d = best[1]
            tot["found"] += 1
            tot["shape"] += d.shape == o.shape
            tot["colour"] += d.colour == o.colour
            tot["pattern"] += d.pattern == o.pattern
            tot["position"] += d.position == o.position(sc.size)
    n = max(1, len(scenes))
    m = max(1, tot["objects"])
    return {
        "scenes": len(scenes),
        "objects": tot["objects"],
        "background": tot["bg"] / n,
        "count": tot["count"] / n,
        "exact_object_set": tot["exact"] / n,
        "found": tot["found"] / m,
        "shape": tot["shape"] / m,
        "colour": tot["colour"] / m,
        "pattern": tot["pattern"] / m,
        "position": tot["position"] / m,
    }
