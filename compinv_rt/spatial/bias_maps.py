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

from compinv_rt.core.errors import ConfigError
from compinv_rt.spatial.layouts import Layout

MAX_STRENGTH = 1000.0  # far inside fp16's range (65504) even after pooling and summing


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


def check_strength(strength: float) -> float:
    if not (strength == strength and 0.0 <= strength <= MAX_STRENGTH):
        raise ConfigError(f"--bias-strength must be in [0, {MAX_STRENGTH:g}], got {strength:g}")
    return float(strength)


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


def resolve_steps(value: str | float | int, total: int, option: str = "--bias-steps") -> int:
    """A fraction of the steps (`0.2`, `1.0`) or a count (`10`) -> a number of steps in [0, total].

    Text with a decimal point, or any value below 1, is a fraction; an integer is a count."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{option} takes a fraction (0.2) or a step count (10), got {text!r}") from None
    if not (number == number) or number < 0:
        raise ConfigError(f"{option} must be >= 0, got {text!r}")
    if "." in text or "e" in text.lower() or number < 1:
        if number > 1:
            raise ConfigError(f"{option} fraction must be in [0, 1], got {text!r} "
                              "(use an integer for a step count)")
        return int(round(number * total))
    return min(int(number), total)


def check_decay(decay: float) -> float:
    if not (decay == decay and 0.0 <= decay <= 100.0):
        raise ConfigError(f"--bias-decay must be in [0, 100], got {decay:g}")
    return float(decay)


@dataclass(frozen=True)
class BiasSchedule:
    """Adaptive-bias gains per step: [fixed 0, adaptive level ** decay], `level` = t / t_first (1 at
    the first step, falling with the noise). decay 0 keeps the full strength on every biased step."""

    decay: float = 0.0

    def __call__(self, level: float) -> torch.Tensor:  # (2,)
        return torch.tensor([0.0, max(float(level), 0.0) ** self.decay])
