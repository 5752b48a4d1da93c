"""Recording cross-attention probabilities: for layout guidance (with gradients) and heatmaps.

`CaptureAttnProcessor` is BiasAttnProcessor with the attention product computed explicitly, so the
softmax probabilities exist as a tensor and are handed to a sink; everything else (projections,
the bias, the output) is the parent's code. `capturing(...)` swaps it onto chosen cross-attention
layers for the duration of a `with` block and restores whatever was there before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention

from compinv_rt.unet.attention import BiasAttnProcessor

Sink = Callable[[str, torch.Tensor], None]  # (layer name, probs (N, heads, h*w, T))


class CaptureAttnProcessor(BiasAttnProcessor):
    always_cross_path = True

    def __init__(self, name: str, sink: Sink):
        super().__init__()
        self.name = name
        self.sink = sink
        self._upcast = (False, False)

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None,
                 attention_mask=None, temb=None, attention_bias=None, bias_gain=None,
                 bias_cache=None):
        # SD 2.x sets upcast_attention: Q.K^T overflows fp16 there (diffusers' own
        # get_attention_scores computes it in fp32); upcast_softmax likewise for the softmax.
        # (Keywords spelled out: diffusers drops those a processor's signature does not declare.)
        self._upcast = (attn.upcast_attention, attn.upcast_softmax)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                attention_bias=attention_bias, bias_gain=bias_gain,
                                bias_cache=bias_cache)

    def attend(self, query, key, value, mask):
        upcast_qk, upcast_softmax = self._upcast
        if upcast_qk:
            query, key = query.float(), key.float()
        scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5  # (N, heads, h*w, T)
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        probs = (scores.float() if upcast_softmax else scores).softmax(dim=-1).to(value.dtype)
        self.sink(self.name, probs)
        return probs @ value


def cross_attention_layers(unet) -> dict[str, Attention]:
    """Cross-attention modules of a diffusers UNet (or a wrapper holding one as `.unet`)."""
    unet = getattr(unet, "unet", unet)
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, Attention) and m.is_cross_attention}


def guidance_layers(unet) -> list[str]:
    """The reference's layers, by structure: the mid block's cross-attention and the first
    cross-attention layer of up block 1, the second-coarsest level (SD 1.x/2.x: 8x8 mid and 16x16
    up_blocks.1.attentions.0; up block 0 has no attention there). UNets that do attend in up block 0
    (the embedded model) still get up block 1: its 4x4 maps are too coarse to place anything
    (guidance there: 70 % / 46 % presence / region, at up block 1: 94 % / 94 %,
    benchmarks/spatial.md). Falls back to the first up block with cross-attention."""
    names = list(cross_attention_layers(unet))
    mid = [n for n in names if n.startswith("mid_block.")]
    ups = [n for n in names if n.startswith("up_blocks.")]
    first_up = []
    if ups:
        chosen = next((n for n in ups if n.startswith("up_blocks.1.")), ups[0])
        block = ".".join(chosen.split(".")[:4])  # up_blocks.<i>.attentions.<j>
        first_up = [n for n in ups if n.startswith(block + ".")]
    return mid + first_up


@contextmanager
def capturing(unet, sink: Sink, layers: Iterable[str] | None = None, exclusive: bool = True):
    """Record the probabilities of `layers` (default: every cross-attention) into `sink`.

    With `exclusive`, every other cross-attention layer gets a plain BiasAttnProcessor meanwhile,
    so recorders installed outside this block see nothing of what runs inside it."""
    modules = cross_attention_layers(unet)
    wanted = set(modules) if layers is None else set(layers)
    unknown = wanted - set(modules)
    if unknown:
        raise ValueError(f"not cross-attention layers of this UNet: {sorted(unknown)}")
    saved = {name: m.processor for name, m in modules.items()}
    try:
        plain = BiasAttnProcessor()
        for name, m in modules.items():
            if name in wanted:
                m.set_processor(CaptureAttnProcessor(name, sink))
            elif exclusive:
                m.set_processor(plain)
        yield
    finally:
        for name, m in modules.items():
            m.set_processor(saved[name])
