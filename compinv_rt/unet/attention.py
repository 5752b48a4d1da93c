"""Spatial regularization as an ordinary UNet input: an additive bias on cross-attention logits.

`attention_bias` has shape (N, T, H, W): one map per text token at latent resolution. Inside the
UNet each cross-attention layer average-pools it to its own resolution and adds it to the logits:
softmax(Q K^T / sqrt(d) + bias) V. Self-attention ignores it. Because it is an input rather than
a gradient step, it runs unchanged in ONNX Runtime, TensorRT and compiled graphs, and one engine
serves every concept and layout.

`bias_gain` (N, 2) = [fixed, adaptive] makes the bias adaptive inside the graph: each layer adds
`bias * (fixed + adaptive * spread)`, where `spread` is the standard deviation of that layer's own
logits over the key axis (per head and query). A bias given in units of the logits' spread acts
alike on layers and steps whose logit scales differ several-fold. The loop feeds one gain per step
(its schedule over the noise level), so one engine serves every schedule; [1, 0] is the fixed bias.
The result is clamped to +-BIAS_LIMIT: no -inf, finite in fp16 and bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from compinv_rt.core.errors import ConfigError

#: Cap on |effective bias|: exact in fp16 and bf16 (2**13), finite even added to the logits (fp16
#: max 65504), and far past where softmax saturates (exp(-8192) = 0).
BIAS_LIMIT = 8192.0


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


def logit_spread(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:  # (N, heads, L, 1)
    """Standard deviation over the key axis of the unbiased logits q.k_j / sqrt(d), per query.

    Computed without the logits: var_j(q.k_j) = q^T C q with C the keys' covariance (d x d per
    head), which costs L*d*d instead of L*T*d and leaves the fused attention's first MatMul with a
    single consumer (the pattern TensorRT fuses). In fp32: the fourth powers of half-precision
    activations overflow fp16 (inf, then NaN through 0 * inf), never fp32."""
    query, key = query.float(), key.float()  # no-ops (no Cast nodes) in fp32 graphs
    centred = key - key.mean(dim=-2, keepdim=True)  # (N, heads, T, d)
    cov = centred.transpose(-1, -2) @ centred / key.shape[-2]  # (N, heads, d, d)
    var = ((query @ cov) * query).sum(dim=-1, keepdim=True) / query.shape[-1]  # (N, heads, L, 1)
    return var.clamp(min=0).sqrt()


def _memo(cache: dict | None, key, make):
    """`make()` once per UNet call: layers of one resolution share their pooled bias and gains."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def layer_bias(attention_bias, seq_len: int, dtype, cache: dict | None = None) -> torch.Tensor:
    """The pooled (N, 1, seq_len, T) bias of a layer, cast to the layer's dtype."""
    def make():
        mask = bias_for_layer(attention_bias, seq_len)
        return mask if mask.dtype == dtype else mask.to(dtype)  # no Cast node when dtypes agree
    return _memo(cache, seq_len, make)


def adaptive_bias(mask: torch.Tensor, bias_gain: torch.Tensor, query, key,
                  cache: dict | None = None) -> torch.Tensor:
    """(N, 1, L, T) pooled bias and (N, 2) [fixed, adaptive] gains -> (N, heads, L, T) additive bias.

    The per-query factor is formed in fp32 and clamped before it meets the map, so a zero bias
    stays exactly zero (0 * finite: a zero map equals the stock processor) and nothing overflows
    to inf or NaN in fp16."""
    fixed, adaptive = _memo(cache, "gain", lambda: bias_gain.float().reshape(-1, 2, 1, 1, 1)
                            .unbind(1))  # (N, 1, 1, 1) each
    factor = (fixed + adaptive * logit_spread(query, key)).clamp(-BIAS_LIMIT, BIAS_LIMIT)
    return (mask * factor.to(mask.dtype)).clamp(-BIAS_LIMIT, BIAS_LIMIT)


class BiasAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor plus `attention_bias` on cross-attention.

    Without a bias (or in self-attention) it is exactly the stock processor. With one, Q is scaled
    inside SDPA before the first MatMul and the bias is added before Softmax: the pattern TensorRT
    fuses (Mul -> MatMul -> Add -> Softmax -> MatMul). `attention_bias` must be a declared keyword:
    diffusers drops undeclared cross_attention_kwargs. `bias_cache` (a dict per UNet call) lets the
    layers of one resolution pool the bias once instead of once each.
    """

    #: Subclasses that must see every cross-attention (e.g. to record probabilities) set this.
    always_cross_path = False

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None,
                 attention_mask=None, temb=None, attention_bias=None, bias_gain=None,
                 bias_cache=None):
        if encoder_hidden_states is None or (attention_bias is None and not self.always_cross_path):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, seq_len, _ = hidden_states.shape  # (N, h*w, C)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (N, heads, h*w, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (N, heads, T, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        mask = None
        if attention_bias is not None:
            mask = layer_bias(attention_bias, seq_len, hidden_states.dtype, bias_cache)  # (N, 1, h*w, T)
            if bias_gain is not None:
                mask = adaptive_bias(mask, bias_gain, query, key, bias_cache)  # (N, heads, h*w, T)
        if attention_mask is not None:
            extra = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1],
                                                batch).view(batch, attn.heads, -1,
                                                            encoder_hidden_states.shape[1])
            mask = extra if mask is None else mask + extra
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
    """The export contract as a module: (sample, timestep, encoder_hidden_states, attention_bias,
    bias_gain) -> noise_pred. Every backend (eager, compiled, ONNX, TensorRT, AOTInductor) runs
    this wrapper. Without `bias_gain` the bias is fixed (gain [1, 0], nothing computed for it)."""

    def __init__(self, unet):
        super().__init__()
        install_bias_processors(unet)
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        kwargs = None
        if attention_bias is not None:
            kwargs = {"attention_bias": attention_bias, "bias_cache": {}}
            if bias_gain is not None:
                kwargs["bias_gain"] = bias_gain
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         cross_attention_kwargs=kwargs, return_dict=False)[0]
