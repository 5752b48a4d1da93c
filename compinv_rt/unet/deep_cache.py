"""DeepCache (Ma et al., CVPR 2024) as part of the export contract: reuse the deep path's features.

A UNet's high-level features change slowly from one denoising step to the next; its shallow path
(conv_in, the first down block's resnets, the last up block, conv_out) is cheap. DeepCache runs the
whole UNet on some steps, keeps the input of the last up block (the deep path's output, at latent
resolution) and, on the steps between, recomputes the shallow path only, with the kept features in
place of the deep path (on the embedded model 17 % of a step's FLOPs; on SD 1.5 about 10 %).

Both halves are the BiasedUNet contract plus one tensor: `full` returns (noise_pred, deep_features)
and `shallow` takes deep_features as a sixth input. Every engine format exports the two as two
graphs (compinv_rt.unet.iospec: DEEP_FEATURES), so ONNX Runtime, AOTInductor and TensorRT get the
same caching as eager PyTorch. `full`'s noise is bit-identical to BiasedUNet's: the same modules
are called in the same order with the same arguments as diffusers' UNet2DConditionModel.forward
(restricted to the SD 1.x/2.x configuration: no class/addition embeddings, adapters or ControlNet
residuals; `deep_channels` refuses other UNets).
"""

from __future__ import annotations

import torch

from compinv_rt.unet.attention import BiasedUNet
from compinv_rt.unet.iospec import deep_channels


def _call_block(block, hidden, emb, context, kwargs, **extra):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=hidden, temb=emb, encoder_hidden_states=context,
                     cross_attention_kwargs=kwargs, **extra)
    return block(hidden_states=hidden, temb=emb, **extra)


class CachedUNet(torch.nn.Module):
    """The BiasedUNet split where DeepCache splits it: `full` and `shallow` (see the module doc)."""

    def __init__(self, biased: BiasedUNet):
        super().__init__()
        deep_channels(biased.unet.config)  # refuses a UNet it cannot split
        self.biased = biased

    @property
    def unet(self):
        return self.biased.unet

    @staticmethod
    def _kwargs(attention_bias, bias_gain) -> dict | None:
        """BiasedUNet's cross_attention_kwargs (one pooled-bias cache per UNet call)."""
        if attention_bias is None:
            return None
        kwargs = {"attention_bias": attention_bias, "bias_cache": {}}
        if bias_gain is not None:
            kwargs["bias_gain"] = bias_gain
        return kwargs

    def _head(self, sample, timestep, context, kwargs):
        """Time embedding, conv_in and the first down block: (emb, hidden, skip tensors)."""
        u = self.unet
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        hidden = u.conv_in(sample)
        skips = (hidden,)
        hidden, res = _call_block(u.down_blocks[0], hidden, emb, context, kwargs)
        return emb, hidden, skips + res

    def _tail(self, deep, emb, skips, context, kwargs):
        """The last up block and the output convs. The last up block takes the first skip tensors
        (conv_in's and the first down block's resnets'), fed from the end as diffusers does."""
        u = self.unet
        last = u.up_blocks[-1]
        sample = _call_block(last, deep, emb, context, kwargs, upsample_size=None,
                             res_hidden_states_tuple=skips[:len(last.resnets)])
        if u.conv_norm_out is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        return u.conv_out(sample)

    def full(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        """(noise_pred, deep_features): the whole UNet, keeping the last up block's input."""
        u, kwargs = self.unet, self._kwargs(attention_bias, bias_gain)
        emb, hidden, skips = self._head(sample, timestep, encoder_hidden_states, kwargs)
        for block in u.down_blocks[1:]:
            hidden, res = _call_block(block, hidden, emb, encoder_hidden_states, kwargs)
            skips += res
        if u.mid_block is not None:
            hidden = _call_block(u.mid_block, hidden, emb, encoder_hidden_states, kwargs)
        for block in u.up_blocks[:-1]:
            n = len(block.resnets)
            skips, res = skips[:-n], skips[-n:]
            hidden = _call_block(block, hidden, emb, encoder_hidden_states, kwargs,
                                 upsample_size=None, res_hidden_states_tuple=res)
        return self._tail(hidden, emb, skips, encoder_hidden_states, kwargs), hidden

    def shallow(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None,
                deep_features=None):
        """noise_pred from the shallow path, with `deep_features` (from an earlier `full`) in place
        of the deep path. The first down block's down-sampler still runs (one small conv): its
        output is a skip tensor of the deep path only, dropped here."""
        kwargs = self._kwargs(attention_bias, bias_gain)
        emb, _, skips = self._head(sample, timestep, encoder_hidden_states, kwargs)
        return self._tail(deep_features, emb, skips, encoder_hidden_states, kwargs)


class FullGraph(torch.nn.Module):
    """`CachedUNet.full` as a module's forward, for exporters (outputs: noise_pred, deep_features)."""

    def __init__(self, cached: CachedUNet):
        super().__init__()
        self.cached = cached

    def forward(self, sample, timestep, encoder_hidden_states, attention_bias, bias_gain):
        return self.cached.full(sample, timestep, encoder_hidden_states, attention_bias, bias_gain)


class ShallowGraph(torch.nn.Module):
    """`CachedUNet.shallow` as a module's forward, for exporters (sixth input: deep_features)."""

    def __init__(self, cached: CachedUNet):
        super().__init__()
        self.cached = cached

    def forward(self, sample, timestep, encoder_hidden_states, attention_bias, bias_gain, deep_features):
        return self.cached.shallow(sample, timestep, encoder_hidden_states, attention_bias, bias_gain,
                                   deep_features)
