"""The one request builder: what a user asks for (CLI flags, a JSONL job line, an API body, an eval
cell, a bench row) -> a checked `session.Request`.

`RequestSpec` holds the options as given (None: the default); `build_request` checks everything that
needs no model and fills in the sampling and spatial configs, so every entry point validates a
request the same way and builds it in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compinv_rt.spatial.plan import SpatialConfig, SpatialOptions

if TYPE_CHECKING:  # both pull in torch: a spec is built and checked before that
    from compinv_rt.generate.session import Request
    from compinv_rt.sampling.pipeline import SamplingConfig


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    seed: int = 0
    n: int = 1
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    scheduler: str = "ddim"
    height: int | None = None  # None: the model's native size
    width: int | None = None
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    concepts: tuple[str, ...] = ()  # trained concept folders
    spatial: SpatialOptions = field(default_factory=SpatialOptions)
    cache_interval: int = 1  # DeepCache (SamplingConfig.cache_interval)

    def sampling(self) -> SamplingConfig:
        from compinv_rt.sampling.pipeline import SamplingConfig

        lo, hi = self.guidance_interval
        return SamplingConfig(self.steps, self.guidance, self.scheduler, self.height, self.width,
                              (float(lo), float(hi)), self.cache_interval)


def build_request(spec: RequestSpec, backend: str = "torch") -> Request:
    """A checked request (ConfigError on a bad spatial option). `backend` decides which spatial
    modes can run (guidance and attention capture need the eager UNet)."""
    from compinv_rt.generate.session import Request

    spatial = SpatialConfig.from_options(spec.spatial, backend=backend, total_steps=spec.steps)
    return Request(spec.prompt, spec.seed, spec.n, spec.negative_prompt, spec.sampling(),
                   tuple(str(c) for c in spec.concepts), spatial)
