"""Per-token cross-attention heatmaps: record (averaged over steps and layers), render, read boxes.

`AttentionRecorder` is a capture sink: it keeps the conditional half of each batch, averages the
heads, brings every layer to latent resolution and accumulates. The same maps serve the
`--save-attention` PNGs, the attention share per token in the sidecars, and the boxes the layout
model learns from when it is fit on the base model's own attention.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class AttentionRecorder:
    def __init__(self, batch: int, height: int, width: int):
        self.batch, self.height, self.width = batch, height, width  # latent size
        self.total: torch.Tensor | None = None  # (B, T, h, w)
        self.calls = 0

    def __call__(self, name: str, probs: torch.Tensor) -> None:  # probs (N, heads, h'*w', T)
        p = probs.detach()[-self.batch:].float().mean(1)  # conditional half, heads averaged
        f = int(round(math.sqrt(self.height * self.width / p.shape[1])))
        p = p.transpose(1, 2).reshape(p.shape[0], p.shape[2], self.height // f, self.width // f)
        if f > 1:
            p = F.interpolate(p, size=(self.height, self.width), mode="bilinear", align_corners=False)
        self.total = p if self.total is None else self.total + p
        self.calls += 1

    def maps(self) -> torch.Tensor:  # (B, T, h, w): mean attention probability per pixel, on CPU
        if self.total is None:
            raise RuntimeError("no cross-attention was recorded")
        return (self.total / self.calls).cpu()  # its readers (numpy, PIL) need host memory


def prompt_token_labels(tokenizer, prompt: str) -> list[tuple[int, str]]:
    """(position, text) of the prompt's own tokens: BOS, EOS and padding left out."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    words = tokenizer.convert_ids_to_tokens(ids[1:-1])
    return [(i + 1, w.replace("</w>", "")) for i, w in enumerate(words)]


def attention_shares(maps: torch.Tensor, positions: list[int]) -> list[float]:
    """Each token's share of the attention mass among `positions` (maps: (T, h, w))."""
    mass = maps[positions].flatten(1).mean(1)
    return (mass / mass.sum().clamp_min(1e-12)).tolist()


def box_from_map(attn: torch.Tensor, threshold: float = 0.5):
    """Normalized box of the region a token attends to, from its (h, w) map: the 4-connected
    component around the peak of the cells above `threshold` of the map's range (stray hot cells
    elsewhere do not stretch the box)."""
    a = attn.float()
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    hot = (a >= threshold).tolist()
    h, w = a.shape
    peak = int(a.argmax())
    stack, seen = [divmod(peak, w)], {divmod(peak, w)}
    while stack:
        y, x = stack.pop()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and hot[ny][nx] and (ny, nx) not in seen:
                seen.add((ny, nx))
                stack.append((ny, nx))
    ys = [y for y, _ in seen]
    xs = [x for _, x in seen]
    return (min(xs) / w, min(ys) / h, (max(xs) + 1) / w, (max(ys) + 1) / h)


def _colormap(v: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, a dark-blue -> red -> yellow ramp ("inferno"-like, no matplotlib)."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], float)
    x = np.clip(v, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    t = (x - i)[..., None]
    return (stops[i] * (1 - t) + stops[i + 1] * t).astype(np.uint8)


def heatmap_grid(image, maps: torch.Tensor, labels: list[tuple[int, str]], tile: int = 128,
                 boxes: dict | None = None):
    """The image followed by one heatmap tile per token, on one shared scale (so the token that
    dominates is the brightest), each titled with the token and its share of the attention.
    `boxes`: token position -> normalized layout boxes drawn on its tile."""
    from PIL import Image, ImageDraw

    positions = [p for p, _ in labels]
    shares = attention_shares(maps, positions)
    sel = maps[positions].float().cpu()  # (n, h, w); numpy below needs host memory
    scale = sel.max().clamp_min(1e-12)
    cols = min(len(labels) + 1, 6)
    rows = math.ceil((len(labels) + 1) / cols)
    title = 14
    grid = Image.new("RGB", (cols * (tile + 4), rows * (tile + title + 4)), "white")
    draw = ImageDraw.Draw(grid)
    base = np.asarray(image.convert("L").resize((tile, tile)), dtype=np.float32)[..., None]
    tiles: list[tuple] = [("image", image.convert("RGB").resize((tile, tile)), None)]
    for k, ((pos, text), share) in enumerate(zip(labels, shares)):
        m = F.interpolate(sel[k][None, None], size=(tile, tile), mode="bilinear",
                          align_corners=False)[0, 0]
        heat = _colormap((m / scale).numpy())
        blend = (0.35 * base + 0.65 * heat).clip(0, 255).astype(np.uint8)
        tiles.append((f"{text} {100 * share:.0f}%", Image.fromarray(blend), pos))
    for k, (text, im, _) in enumerate(tiles):
        r, c = divmod(k, cols)
        x, y = c * (tile + 4) + 2, r * (tile + title + 4) + 2
        draw.text((x, y), text[:22], fill="black")
        grid.paste(im, (x, y + title))
        for b in (boxes or {}).get(pos, []):
            draw.rectangle([x + b[0] * tile, y + title + b[1] * tile,
                            x + b[2] * tile - 1, y + title + b[3] * tile - 1], outline="cyan")
    return grid
