"""Backward layout guidance (the reference's generation-time regularization), as a latent hook.

During the first `steps` denoising steps, before the UNet step, up to `iterations` times while a
sample's loss is above `threshold`:  z <- z - sigma_t^2 * grad_z(scale * L_CA), with

    r_kp = sum_u M_k(u) A(u, p) / sum_u A(u, p)        (A: cross-attention probability of token p)
    L_CA = mean over concepts k and layers l of mean_p mean_heads (1 - r_kp)^2

over the mid block and the first up cross-attention layer. It needs gradients through the UNet,
so it runs only on the PyTorch backend; `--spatial bias` is the engine-friendly form.

sigma_t^2 is the reference's step for sigma-scaled latents (LMS, Euler: x = x0 + sigma eps). For
variance-preserving samplers (DDIM, DPM-Solver: x = sqrt(a) x0 + sqrt(1 - a) eps) the same move in
x0-space is a step of sigma_t^2 * a_t = 1 - a_t, so the guidance does the same on every sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compinv_rt.sampling.denoise import Step
from compinv_rt.spatial.bias_maps import concept_masks
from compinv_rt.unet.attention import bias_for_layer
from compinv_rt.unet.capture import capturing, guidance_layers


@dataclass(frozen=True)
class GuidanceConfig:
    steps: int = 10  # steps that get guidance (the reference: the first 10 of 50)
    iterations: int = 5
    threshold: float = 0.2
    scale: float = 30.0
    layers: tuple[str, ...] | None = None  # None: guidance_layers(unet)


def step_size(scheduler, t, latents: torch.Tensor) -> float:
    a = scheduler.alphas_cumprod[int(round(float(t)))].item()
    sigma2 = (1 - a) / a
    sigma_scaled = float(scheduler.init_noise_sigma) > 1.5  # k-diffusion style latents
    return sigma2 if sigma_scaled else sigma2 * a


class LayoutGuidance:
    """A step hook of the denoise loop: before each of the first `config.steps` steps it moves the
    latents along the gradient of the layout loss."""

    def __init__(self, module: torch.nn.Module, layouts, latent_hw: tuple[int, int],
                 config: GuidanceConfig = GuidanceConfig()):
        self.module = module  # BiasedUNet
        self.config = config
        self.layers = list(config.layers or guidance_layers(module))
        h, w = latent_hw
        # per sample: (K, h, w) region masks and the token positions of each concept
        self.items = [None if lay is None else (concept_masks(lay, h, w), [list(c.tokens) for c in lay.concepts])
                      for lay in layouts]
        self.history: list[dict] = []  # {"step", "iteration", "loss": [per sample]}

    def loss(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:  # (B,)
        """L_CA per sample from the captured probabilities {layer: (B, heads, h*w, T)}."""
        losses = []
        for b, item in enumerate(self.items):
            if item is None:
                losses.append(next(iter(probs.values())).new_zeros(()))
                continue
            masks, tokens = item
            per_layer = []
            for name in self.layers:
                p = probs[name][b]  # (heads, h*w, T)
                m = bias_for_layer(masks[None].to(p), p.shape[1])[0, 0]  # (h*w, K)
                terms = []
                for k, toks in enumerate(tokens):
                    a = p[:, :, toks]  # (heads, h*w, P)
                    r = (a * m[:, k, None]).sum(1) / a.sum(1).clamp_min(1e-12)  # (heads, P)
                    terms.append(((1 - r) ** 2).mean())
                per_layer.append(torch.stack(terms).mean())
            losses.append(torch.stack(per_layer).mean())
        return torch.stack(losses)

    def __call__(self, at: Step) -> torch.Tensor | None:
        cfg = self.config
        i, t, latents, cond, scheduler = at.done, at.timestep, at.latents, at.cond, at.scheduler
        if t is None or i >= cfg.steps or all(item is None for item in self.items):
            return None
        step = step_size(scheduler, t, latents)
        with torch.inference_mode(False), torch.enable_grad():
            x = latents.detach().clone()  # a normal tensor, even if made under inference_mode
            context = cond.detach().clone()
            tt = torch.as_tensor(t).detach().clone().expand(x.shape[0])
            for it in range(cfg.iterations):
                x.requires_grad_(True)
                probs: dict[str, torch.Tensor] = {}
                with capturing(self.module, lambda name, p: probs.__setitem__(name, p), self.layers):
                    self.module(scheduler.scale_model_input(x, t), tt, context)
                loss = self.loss(probs)  # (B,)
                active = (loss > cfg.threshold).to(loss)
                self.history.append({"step": i, "iteration": it,
                                     "loss": [round(v, 4) for v in loss.tolist()]})
                if not active.any():
                    break
                grad = torch.autograd.grad((cfg.scale * loss * active).sum(), x)[0]
                x = (x - step * grad).detach()
        return x.to(latents.dtype)
