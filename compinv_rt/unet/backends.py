"""UNet backends behind one small interface. The denoise loop only ever calls
`backend(sample, timestep, encoder_hidden_states, attention_bias, bias_gain) -> noise_pred`; backends differ
in nothing else. Engine-based backends live next to their exporters and are created by
`compinv_rt.engines.registry.open_backend`."""

from __future__ import annotations

from typing import Protocol

import torch

from compinv_rt.unet.attention import BiasedUNet
from compinv_rt.unet.deep_cache import CachedUNet


class UNetBackend(Protocol):
    name: str

    def __call__(
        self,
        sample: torch.Tensor,  # (N, 4, h, w)
        timestep: torch.Tensor,  # (N,)
        encoder_hidden_states: torch.Tensor,  # (N, T, D)
        attention_bias: torch.Tensor | None = None,  # (N, T, h, w) or None
        bias_gain: torch.Tensor | None = None,  # (N, 2) [fixed, adaptive]; None: fixed bias
    ) -> torch.Tensor:  # (N, 4, h, w)
        ...


class TorchBackend:
    """Eager PyTorch: the diffusers UNet as loaded, wrapped with the attention-bias contract."""

    name = "torch"

    def __init__(self, unet: torch.nn.Module):
        self.module = BiasedUNet(unet)
        self._cached: CachedUNet | None = None

    @torch.inference_mode()
    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        return self.module(sample, timestep, encoder_hidden_states, attention_bias, bias_gain)

    @property
    def cached(self) -> CachedUNet:
        if self._cached is None:
            self._cached = CachedUNet(self.module)  # ConfigError for a UNet it cannot split
        return self._cached

    @torch.inference_mode()
    def full(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        """(noise_pred, deep_features): DeepCache's full step (compinv_rt.unet.deep_cache)."""
        return self.cached.full(sample, timestep, encoder_hidden_states, attention_bias, bias_gain)

    @torch.inference_mode()
    def shallow(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None,
                deep_features=None):
        """noise_pred from the shallow path on `deep_features` of an earlier full step."""
        return self.cached.shallow(sample, timestep, encoder_hidden_states, attention_bias, bias_gain,
                                   deep_features)
