"""Spatial regularization as an ordinary UNet input: an additive bias on cross-attention logits.

`attention_bias` has shape (N, T, H, W): one map per text token at latent resolution. Inside the
UNet each cross-attention layer average-pools it to its own resolution and adds it to the logits:
softmax(Q K^T / sqrt(d) + bias) V. Self-attention ignores it. Because it is an input rather than
a gradient step, it runs unchanged in ONNX Runtime, TensorRT and compiled graphs, and one engine
serves every concept and layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from compinv_rt.errors import ConfigError


def bias_for_layer(attention_bias: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(N, T, H, W) latent-resolution bias -> (N, 1, seq_len, T) for a layer with seq_len = h*w.

    The pooling factor depends only on the layer's depth (2**level), so it is a constant in
    exported graphs even when H and W are dynamic.
    """
    n, t, h, w = attention_bias.shape
    factor = int(round(math.sqrt(h * w / seq_len)))
    if factor > 1:
        attention_bias = F.avg_pool2d(attention_bias, kernel_size=factor)  # (N, T, h/f, w/f)
    return attention_bias.flatten(2).transpose(1, 2).unsqueeze(1)  # (N, 1, seq_len, T)


class BiasAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor plus `attention_bias` on cross-attention.

    Without a bias (or in self-attention) it is exactly the stock processor. With one, Q is scaled
    inside SDPA before the first MatMul and the bias is added before Softmax: the pattern TensorRT
    fuses (Mul -> MatMul -> Add -> Softmax -> MatMul). `attention_bias` must be a declared keyword:
    diffusers drops undeclared cross_attention_kwargs.
    """

    #: Subclasses that must see every cross-attention (e.g. to record probabilities) set this.
    always_cross_path = False

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None,
                 attention_mask=None, temb=None, attention_bias=None):
        if encoder_hidden_states is None or (attention_bias is None and not self.always_cross_path):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, seq_len, _ = hidden_states.shape  # (N, h*w, C)
        mask = None
        if attention_bias is not None:
            mask = bias_for_layer(attention_bias, seq_len)  # (N, 1, h*w, T)
            if mask.dtype != hidden_states.dtype:  # no Cast node in exported graphs when dtypes agree
                mask = mask.to(hidden_states.dtype)
        if attention_mask is not None:
            extra = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1],
                                                batch).view(batch, attn.heads, -1,
                                                            encoder_hidden_states.shape[1])
            mask = extra if mask is None else mask + extra
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (N, heads, h*w, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (N, heads, T, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        out = self.attend(query, key, value, mask)  # (N, heads, h*w, d)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def attend(self, query, key, value, mask):
        """softmax(Q K^T / sqrt(d) + mask) V, fused. Subclasses may compute it explicitly."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def _check_supported(name: str, attn: Attention) -> None:
    unsupported = [f for f in ("spatial_norm", "group_norm", "norm_q", "norm_k")
                   if getattr(attn, f, None) is not None]
    if attn.is_cross_attention and (unsupported or attn.norm_cross):
        raise ConfigError(f"attention layer {name} uses {unsupported or ['norm_cross']}, "
                          "which the attention-bias processor does not support")


def install_bias_processors(unet) -> None:
    """Put BiasAttnProcessor on every attention module (self-attention ignores the bias)."""
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            _check_supported(name, module)
    unet.set_attn_processor(BiasAttnProcessor())


class BiasedUNet(torch.nn.Module):
    """The export contract as a module: (sample, timestep, encoder_hidden_states, attention_bias)
    -> noise_pred. Every backend (eager, compiled, ONNX, TensorRT, AOTInductor) runs this wrapper."""

    def __init__(self, unet):
        super().__init__()
        install_bias_processors(unet)
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, attention_bias=None):
        kwargs = None if attention_bias is None else {"attention_bias": attention_bias}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         cross_attention_kwargs=kwargs, return_dict=False)[0]
