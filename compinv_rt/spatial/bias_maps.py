"""Layouts -> region masks and `attention_bias` maps at latent resolution.

For each concept's tokens the bias is `+s` inside its region and `-s` outside; every other token
(BOS, EOS, padding, words that are not concepts) gets 0, and so does the unconditional half of
classifier-free guidance (the denoise loop zeroes it). The UNet pools the map to each
cross-attention resolution itself (`bias_for_layer`).

`BiasSchedule` gives the adaptive bias's per-step gains (the UNet's `bias_gain` input): the map's
+-s is then in units of each layer's logit spread, weighted by the noise level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compinv_rt.spatial.layouts import Layout
from compinv_rt.spatial.plan import check_strength


def region_mask(boxes, height: int, width: int) -> torch.Tensor:  # (h, w) in [0, 1]
    """Fraction of each latent cell covered by the union of `boxes` (normalized x0,y0,x1,y1).

    Fractional coverage keeps small boxes visible on coarse grids; overlapping boxes are merged by
    taking the maximum coverage."""
    ys = torch.arange(height, dtype=torch.float64)
    xs = torch.arange(width, dtype=torch.float64)
    mask = torch.zeros(height, width, dtype=torch.float64)
    for x0, y0, x1, y1 in boxes:
        cover_y = ((torch.clamp(ys + 1, max=y1 * height) - torch.clamp(ys, min=y0 * height))
                   .clamp(min=0, max=1))  # (h,)
        cover_x = ((torch.clamp(xs + 1, max=x1 * width) - torch.clamp(xs, min=x0 * width))
                   .clamp(min=0, max=1))  # (w,)
        mask = torch.maximum(mask, cover_y[:, None] * cover_x[None, :])
    return mask.float()


def concept_masks(layout: Layout, height: int, width: int) -> torch.Tensor:  # (K, h, w)
    return torch.stack([region_mask(c.boxes, height, width) for c in layout.concepts])


def bias_map(layout: Layout, strength: float, height: int, width: int,
             seq_len: int = 77, dtype=torch.float32) -> torch.Tensor:  # (T, h, w)
    """One prompt's attention bias: `s * (2 * coverage - 1)` on each concept token, else 0."""
    strength = check_strength(strength)
    bias = torch.zeros(seq_len, height, width)
    for concept, mask in zip(layout.concepts, concept_masks(layout, height, width)):
        for p in concept.tokens:
            bias[p] = strength * (2.0 * mask - 1.0)  # +s inside, -s outside
    return bias.to(dtype)


def bias_batch(layouts, strengths: float | Sequence[float], height: int, width: int, seq_len: int = 77,
               dtype=torch.float32) -> torch.Tensor | None:  # (B, T, h, w) or None
    """Stack per-prompt bias maps (one strength, or one per prompt); prompts without a layout get
    zeros. None if no prompt has one."""
    if all(layout is None for layout in layouts):
        return None
    if not isinstance(strengths, Sequence):
        strengths = [strengths] * len(layouts)
    zero = torch.zeros(seq_len, height, width, dtype=dtype)
    return torch.stack([zero if layout is None else
                        bias_map(layout, s, height, width, seq_len, dtype)
                        for layout, s in zip(layouts, strengths)])


@dataclass(frozen=True)
class BiasSchedule:
    """Adaptive-bias gains per step: [fixed 0, adaptive level ** decay], `level` = t / t_first (1 at
    the first step, falling with the noise). decay 0 keeps the full strength on every biased step."""

    decay: float = 0.0

    def __call__(self, level: float) -> torch.Tensor:  # (2,)
        return torch.tensor([0.0, max(float(level), 0.0) ** self.decay])
