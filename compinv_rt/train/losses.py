"""The reconstruction loss: per the scheduler's prediction type, per pixel, masked mean."""

from __future__ import annotations

import torch

from compinv_rt.core.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def diffusion_target(scheduler, prediction_type: str, latents, noise, timesteps) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ConfigError(f"unsupported prediction_type {prediction_type!r}; expected one of "
                      f"{', '.join(PREDICTION_TYPES)}")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred/target (B, C, h, w), mask (B, 1, h, w) in {0, 1}: the mean squared error over the
    masked elements only (the reference averaged to a scalar first, so its mask did nothing)."""
    err = (pred.float() - target.float()) ** 2  # (B, C, h, w), per element
    m = mask.to(err.dtype).expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)
