"""The one denoising loop. Every backend, every command and every batch shape goes through here."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from compinv_rt.unet.backends import UNetBackend

StepCallback = Callable[[int, int], None]  # (steps done, total steps)
# (step index, timestep, latents, cond, scheduler) -> latents, run before each UNet step (e.g. the
# spatial layout guidance, which moves the latents along an attention-loss gradient).
LatentHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]
# (timestep / first timestep: the noise level relative to the start) -> the (2,) [fixed, adaptive]
# gains of the bias at this step (spatial.bias_maps.BiasSchedule), fed as the UNet's bias_gain.
BiasGain = Callable[[float], torch.Tensor]


def denoise(
    unet: UNetBackend,
    scheduler,
    latents: torch.Tensor,  # (B, 4, h, w), already scaled by init_noise_sigma
    cond: torch.Tensor,  # (B, 77, D)
    uncond: torch.Tensor | None,  # (B, 77, D); None = no classifier-free guidance
    guidance: float | torch.Tensor,  # scalar or (B,) per-sample scale
    on_step: StepCallback | None = None,
    attention_bias: torch.Tensor | None = None,  # (B, T, h, w) for the conditional half
    bias_steps: int = 0,  # the first `bias_steps` steps get the bias
    latent_hook: LatentHook | None = None,
    bias_gain: BiasGain | None = None,  # per-step [fixed, adaptive] gains; None: fixed bias
    guided_steps: Sequence[bool] | None = None,  # per step: run the unconditional pass; None: all
) -> torch.Tensor:
    """Run `scheduler.timesteps` (set by the caller) with classifier-free guidance.

    Mirrors diffusers' StableDiffusionPipeline step for step ([uncond; cond] in one UNet batch,
    `uncond + g * (cond - uncond)`), so results match the stock pipeline exactly. On a step that
    `guided_steps` leaves out, only the conditional pass runs (guidance in a limited interval,
    Kynkaanniemi et al. 2024): half the UNet work of that step.
    """
    batch = latents.shape[0]
    if uncond is not None:
        context = torch.cat([uncond, cond])  # (2B, 77, D)
        if isinstance(guidance, torch.Tensor):
            guidance = guidance.to(latents).view(batch, 1, 1, 1)
    else:
        context = cond
    cond_bias = attention_bias  # an unguided step's batch is the conditional half alone
    if attention_bias is not None and uncond is not None:
        # The unconditional half of classifier-free guidance is never biased.
        attention_bias = torch.cat([torch.zeros_like(attention_bias), attention_bias])
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        if latent_hook is not None:
            latents = latent_hook(i, t, latents, cond, scheduler)
        guided = uncond is not None and (guided_steps is None or guided_steps[i])
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        bias = None if i >= bias_steps else attention_bias if guided else cond_bias
        tt = t.expand(model_in.shape[0])
        if bias is not None and bias_gain is not None:
            gain = bias_gain(float(t) / float(timesteps[0])).to(bias).expand(model_in.shape[0], 2)
            noise = unet(model_in, tt, context if guided else cond, bias, gain)
        else:
            noise = unet(model_in, tt, context if guided else cond, bias)
        if guided:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents
