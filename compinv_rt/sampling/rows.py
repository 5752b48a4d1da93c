"""One denoising step for samples that are each at their own step: the step code of the loop in
`denoise`, per sample, with all samples' UNet rows in one call.

Each `RowSample` keeps what the whole-batch loop keeps for a batch: its latents, its own scheduler
(diffusers schedulers hold per-run state; each steps only its own rows, which gives the same bits
as stepping them inside a batch for ddim, dpm, dpm-karras, unipc and euler: tests/test_stepper.py),
and its `GuidedDenoiser` (text states, guidance scale and interval, attention bias). `step_rows`
builds one UNet batch [uncond rows of the guided samples; cond rows of all], with per-row
timesteps, bias maps (zeros where a sample has none: the same bits as no bias) and gains, then
guides and steps each sample on its own.

`FixedRows` pads every UNet call to one row count. On CPU (oneDNN) a row's output depends on the
batch's row count (the convolution kernels are chosen by batch size), never on the other rows'
contents or positions: at a fixed count, a sample's image does not depend on what it shares the
batch with or when it joined (benchmarks/serve.md has the measurements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compinv_rt.sampling.denoise import GuidedDenoiser
from compinv_rt.unet.backends import UNetBackend


@dataclass(eq=False)
class RowSample:
    latents: torch.Tensor  # (b, C, h, w): usually one image
    scheduler: object  # its own diffusers scheduler, timesteps set
    denoiser: GuidedDenoiser
    done: int = 0  # steps done

    @property
    def total(self) -> int:
        return len(self.scheduler.timesteps)  # type: ignore[attr-defined]

    @property
    def finished(self) -> bool:
        return self.done >= self.total


class FixedRows:
    """A backend that always runs `rows` rows (zero padding), so each row's bits are the same
    whatever else is in the call."""

    def __init__(self, backend: UNetBackend, rows: int):
        self.backend, self.rows, self.name = backend, rows, backend.name

    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        n = sample.shape[0]
        if n > self.rows:
            raise ValueError(f"{n} UNet rows do not fit the fixed batch of {self.rows}")
        pad = lambda x: x if x is None or n == self.rows else torch.cat(  # noqa: E731
            [x, x.new_zeros((self.rows - n, *x.shape[1:]))])
        out = self.backend(pad(sample), pad(timestep.expand(n)), pad(encoder_hidden_states),
                           pad(attention_bias), pad(bias_gain))
        return out[:n]

    def __getattr__(self, name):  # module, provider, ... of the wrapped backend
        return getattr(self.backend, name)


def step_rows(unet: UNetBackend, samples: list[RowSample]) -> None:
    """Advance every sample by one step (each at its own step index) with one UNet call."""
    xs, ts = [], []
    for s in samples:
        t = s.scheduler.timesteps[s.done]  # type: ignore[attr-defined]
        xs.append(s.scheduler.scale_model_input(s.latents, t))  # type: ignore[attr-defined]
        ts.append(t)
    g = [k for k, s in enumerate(samples) if s.denoiser.guided(s.done)]
    order = [samples[k] for k in g] + samples  # the rows: uncond of the guided samples, then cond of all
    xr, tr = [xs[k] for k in g] + xs, [ts[k] for k in g] + ts
    x = torch.cat(xr)
    # float32 timesteps (what the engines take); the UNet embeds an integer t as the same float
    t = torch.cat([tt.to(torch.float32).expand(len(xx)) for tt, xx in zip(tr, xr)])
    context = torch.cat([samples[k].denoiser.uncond for k in g]
                        + [s.denoiser.cond for s in samples])
    bias, gain = _bias_rows(order, len(g), tr)
    noise = unet(x, t, context, bias, gain)
    parts = _split(noise, xr)
    for k, s in enumerate(samples):
        n_s = parts[len(g) + k]
        if k in g:
            n_s = s.denoiser.combine(parts[g.index(k)], n_s)
        s.latents = s.scheduler.step(n_s, ts[k], s.latents, return_dict=False)[0]  # type: ignore[attr-defined]
        s.done += 1


def _split(rows: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(rows.split([len(v) for v in like]))


def _bias_rows(order: list[RowSample], n_uncond: int, ts: list):
    """(bias, gain) rows of one call: None when no row is biased at its step (the same bits as
    zero maps); zeros for unconditional rows and unbiased samples; gains only when a biased row is
    adaptive ([1, 0] elsewhere, the same bits as a fixed bias)."""
    models = [s.denoiser.model for s in order]
    active = [k >= n_uncond and m.biased(s.done) for k, (m, s) in enumerate(zip(models, order))]
    if not any(active):
        return None, None
    like = next(m.bias.maps for m, a in zip(models, active) if a)  # type: ignore[union-attr]
    maps, gains = [], []
    for s, m, t, a in zip(order, models, ts, active):
        b = len(s.latents)
        maps.append(m.bias.maps if a else like.new_zeros((b, *like.shape[1:])))  # type: ignore[union-attr]
        gains.append((m.gain(t, like) if a else like.new_tensor([[1.0, 0.0]])).expand(b, 2))
    adaptive = any(a and m.bias.gain is not None for m, a in zip(models, active))  # type: ignore[union-attr]
    return torch.cat(maps), (torch.cat(gains) if adaptive else None)
