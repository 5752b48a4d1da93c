"""`--quality`: named sampler settings chosen on the judged quality-vs-cost curve (issue 23,
benchmarks/speed.md). `reference` is the stock pipeline's 25 DDIM steps with guidance on every
step (bit-identical to before the presets existed); the others are the cheapest settings the judge
could not tell apart from it (`default`) or that stay close to it (`fast`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from compinv_rt.sampling.schedulers import SchedulerName


class Quality(str, Enum):
    reference = "reference"
    default = "default"
    fast = "fast"


@dataclass(frozen=True)
class SamplerPreset:
    scheduler: SchedulerName
    steps: int
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    cache_interval: int = 1  # DeepCache: a full UNet step every N steps (1: every step)


PRESETS = {
    Quality.reference: SamplerPreset(SchedulerName.ddim, 25),
    # 20 UNet evaluations per image instead of 50 (2.5x fewer FLOPs); the judge could not tell it
    # from the reference on words prompts (paired p = 0.60, every kind inside the interval)
    Quality.default: SamplerPreset(SchedulerName.ddim, 12, (0.0, 0.6)),
    # 15 evaluations (3.3x fewer): overall inside the interval, three-object prompts 12 points lower
    Quality.fast: SamplerPreset(SchedulerName.dpm, 10, (0.0, 0.5)),
}


def sampler_settings(quality: Quality | str | None, steps: int | None, scheduler: SchedulerName | str | None,
                     guidance_interval: tuple[float, float] | None,
                     cache_interval: int | None = None) -> SamplerPreset:
    """The preset of `quality`, with any option the user gave explicitly taking its place. Without
    --quality: the `default` preset, or, once --steps, --scheduler, --guidance-interval or
    --cache-interval is given,
    the reference for the parts not given (so `--steps 30` means 30 DDIM steps with guidance on
    every step, as before the presets existed)."""
    if quality is None:
        explicit = (steps, scheduler, guidance_interval, cache_interval) != (None, None, None, None)
        quality = Quality.reference if explicit else Quality.default
    p = PRESETS[Quality(quality)]
    return SamplerPreset(SchedulerName(scheduler) if scheduler is not None else p.scheduler,
                         steps if steps is not None else p.steps,
                         guidance_interval if guidance_interval is not None else p.guidance_interval,
                         cache_interval if cache_interval is not None else p.cache_interval)


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """'LO,HI' -> (lo, hi); range checks are SamplingConfig's."""
    from compinv_rt.core.errors import ConfigError

    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval must be LO,HI (fractions of the run, e.g. 0,0.6), got {text!r}") \
            from None
    return lo, hi
