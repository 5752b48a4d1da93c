"""UNet backends behind one small interface. The denoise loop only ever calls
`backend(sample, timestep, encoder_hidden_states) -> noise_pred`; backends differ in nothing else."""

from __future__ import annotations

from typing import Protocol

import torch


class UNetBackend(Protocol):
    name: str

    def __call__(
        self,
        sample: torch.Tensor,  # (N, 4, h, w)
        timestep: torch.Tensor,  # (N,)
        encoder_hidden_states: torch.Tensor,  # (N, 77, D)
    ) -> torch.Tensor:  # (N, 4, h, w)
        ...


class TorchBackend:
    """Eager PyTorch: the diffusers UNet as loaded."""

    name = "torch"

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    @torch.inference_mode()
    def __call__(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         return_dict=False)[0]
