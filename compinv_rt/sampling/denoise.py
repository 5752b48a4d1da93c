"""The one denoising loop. Every backend, every command and every batch shape goes through here.

The loop only steps a scheduler; what a step computes is a *denoiser* (k-diffusion style): the UNet
backend wrapped by `BiasedModel` (the attention bias on the first steps) and by `GuidedDenoiser`
(classifier-free guidance, optionally on an interval of the steps). Everything that watches or
steers the run is one step hook, called at every step boundary (like diffusers'
`callback_on_step_end`): progress, cancellation, the spatial layout guidance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from compinv_rt.unet.backends import UNetBackend

StepCallback = Callable[[int, int], None]  # (steps done, total steps)
# (timestep / first timestep: the noise level relative to the start) -> the (2,) [fixed, adaptive]
# gains of the bias at this step (spatial.bias_maps.BiasSchedule), fed as the UNet's bias_gain.
BiasGain = Callable[[float], torch.Tensor]


@dataclass
class Step:
    """The loop at a step boundary: `done` of `total` steps are done."""

    done: int
    total: int
    timestep: torch.Tensor | None  # the next step's t; None after the last step
    latents: torch.Tensor
    cond: torch.Tensor  # (B, 77, D) the conditional text states
    scheduler: Any  # a diffusers scheduler


# Called at every boundary (done = 0 .. total); before a step it may return new latents (e.g. the
# layout guidance moves them along an attention-loss gradient); None keeps them. May raise to stop.
StepHook = Callable[[Step], "torch.Tensor | None"]


def chain_hooks(*hooks: StepHook | None) -> StepHook | None:
    """One hook that runs `hooks` in order, each seeing the latents the previous one returned."""
    active = [h for h in hooks if h is not None]
    if len(active) <= 1:
        return active[0] if active else None

    def chained(step: Step) -> torch.Tensor | None:
        for hook in active:
            out = hook(step)
            if out is not None:
                step.latents = out
        return step.latents

    return chained


def progress_hook(on_step: StepCallback) -> StepHook:
    """A (done, total) progress callback as a step hook (called after each step)."""

    def hook(step: Step) -> None:
        if step.done:
            on_step(step.done, step.total)

    return hook


@dataclass(frozen=True)
class AttentionBias:
    """The spatial bias of one batch: maps for the conditional half, on the first `steps` steps,
    with per-step [fixed, adaptive] gains (`gain`; None: the fixed bias)."""

    maps: torch.Tensor  # (B, T, h, w)
    steps: int
    gain: BiasGain | None = None


def deep_cache_plan(guided: Sequence[bool], interval: int) -> list[bool]:
    """Per step: does it run the whole UNet (else DeepCache's shallow path, fed the deep features
    of the last full step; compinv_rt.unet.deep_cache). A full step every `interval` steps
    (DeepCache's uniform schedule), and wherever the last full step's features do not cover the
    step's rows: a guided step after an unguided full step has no unconditional features."""
    plan: list[bool] = []
    last_guided: bool | None = None
    for i, g in enumerate(guided):
        full = i % interval == 0 or last_guided is None or (g and not last_guided)
        if full:
            last_guided = g
        plan.append(full)
    return plan


class BiasedModel:
    """The UNet backend with the attention bias: (x, t, context, step index, guided) -> noise.
    `guided`: x is [uncond; cond], and the unconditional half is never biased. With `full_steps`
    (deep_cache_plan) the other steps run the backend's shallow path on the kept deep features."""

    def __init__(self, unet: UNetBackend, bias: AttentionBias | None, first_timestep: torch.Tensor,
                 full_steps: Sequence[bool] | None = None):
        self.unet, self.bias, self.first = unet, bias, float(first_timestep)
        maps = None if bias is None else bias.maps
        self.guided_maps = None if maps is None else torch.cat([torch.zeros_like(maps), maps])
        self.full_steps = full_steps
        self.features: torch.Tensor | None = None  # the last full step's deep features

    def __call__(self, x, t, context, i: int, guided: bool) -> torch.Tensor:
        rows = x.shape[0]
        inputs = (x, t.expand(rows), context, *self.bias_inputs(t, i, guided, rows))
        if self.full_steps is None:
            return self.unet(*inputs)
        if self.full_steps[i] or self.features is None:
            noise, self.features = self.unet.full(*inputs)  # type: ignore[attr-defined]
            return noise
        # a guided full step's features are [uncond; cond]: an unguided step takes the cond half
        deep = self.features[-rows:]
        return self.unet.shallow(*inputs, deep_features=deep)  # type: ignore[attr-defined]

    def bias_inputs(self, t, i: int, guided: bool, rows: int) -> tuple:
        """(None,) on unbiased steps, else (maps,) or (maps, gains) for the UNet call."""
        if self.bias is None or not self.biased(i):
            return (None,)
        bias = self.guided_maps if guided else self.bias.maps
        if self.bias.gain is None:
            return (bias,)
        return (bias, self.gain(t, bias).expand(rows, 2))

    def biased(self, i: int) -> bool:
        """Does step i get the bias."""
        return self.bias is not None and i < self.bias.steps

    def gain(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The (1, 2) [fixed, adaptive] gain at timestep t ([1, 0], the fixed bias, without a
        schedule: the UNet computes the same bits either way)."""
        if self.bias is None or self.bias.gain is None:
            return torch.tensor([[1.0, 0.0]]).to(like)
        return self.bias.gain(float(t) / self.first).to(like).view(1, 2)


class GuidedDenoiser:
    """Classifier-free guidance around a model: (x, t, step index) -> noise.

    Mirrors diffusers' StableDiffusionPipeline step for step ([uncond; cond] in one UNet batch,
    `uncond + g * (cond - uncond)`), so results match the stock pipeline exactly. On a step that
    `guided_steps` leaves out, only the conditional pass runs (guidance in a limited interval,
    Kynkaanniemi et al. 2024): half the UNet work of that step. `uncond` None: no guidance.
    """

    def __init__(self, model: BiasedModel, cond: torch.Tensor, uncond: torch.Tensor | None,
                 scale: float | torch.Tensor, guided_steps: Sequence[bool] | None = None):
        self.model, self.cond, self.uncond, self.guided_steps = model, cond, uncond, guided_steps
        self.context = cond if uncond is None else torch.cat([uncond, cond])  # (2B, 77, D)
        if isinstance(scale, torch.Tensor):  # (B,) per-sample scales
            scale = scale.to(cond).view(cond.shape[0], 1, 1, 1)
        self.scale = scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        if not self.guided(i):
            return self.model(x, t, self.cond, i, False)
        return self.combine(*self.model(torch.cat([x] * 2), t, self.context, i, True).chunk(2))

    def guided(self, i: int) -> bool:
        """Does step i run the unconditional pass."""
        return self.uncond is not None and (self.guided_steps is None or self.guided_steps[i])

    def combine(self, noise_uncond: torch.Tensor, noise_cond: torch.Tensor) -> torch.Tensor:
        return noise_uncond + self.scale * (noise_cond - noise_uncond)


def denoise(denoiser: GuidedDenoiser, scheduler, latents: torch.Tensor,
            hook: StepHook | None = None) -> torch.Tensor:
    """Run `scheduler.timesteps` (set by the caller) from `latents` (already scaled by
    init_noise_sigma) with `denoiser`, calling `hook` at every step boundary."""
    timesteps = scheduler.timesteps
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if hook is not None:
            latents = _call(hook, Step(i, total, t, latents, denoiser.cond, scheduler))
        noise = denoiser(scheduler.scale_model_input(latents, t), t, i)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    if hook is not None:
        latents = _call(hook, Step(total, total, None, latents, denoiser.cond, scheduler))
    return latents


def _call(hook: StepHook, step: Step) -> torch.Tensor:
    out = hook(step)
    return step.latents if out is None else out
