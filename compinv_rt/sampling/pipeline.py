"""Text -> images: prompt encoding, seeded initial noise, the denoise loop, VAE decoding."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace

import torch

from compinv_rt.core.errors import ConfigError
from compinv_rt.models.loading import LoadedModel, ModelFiles
from compinv_rt.sampling.denoise import (
    AttentionBias,
    BiasedModel,
    GuidedDenoiser,
    StepHook,
    deep_cache_plan,
    denoise,
)
from compinv_rt.sampling.schedulers import SchedulerName, make_scheduler
from compinv_rt.unet.backends import TorchBackend, UNetBackend

MAX_CACHE_INTERVAL = 10


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 25
    guidance: float = 7.5
    scheduler: SchedulerName | str = SchedulerName.ddim
    height: int | None = None  # None: the model's native size
    width: int | None = None
    # classifier-free guidance only on the steps in [lo, hi) (fractions of the run): the others run
    # the conditional pass alone. (0, 1): every step, the stock pipeline's behaviour.
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # DeepCache: the whole UNet every `cache_interval` steps, the shallow path on the kept deep
    # features between (compinv_rt.unet.deep_cache). 1: every step full, the stock behaviour.
    cache_interval: int = 1

    def resolved(self, files: ModelFiles) -> "SamplingConfig":
        """Fill in the model's native size and validate everything against the model."""
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.guidance < 0:
            raise ConfigError(f"--guidance must be >= 0, got {self.guidance}")
        lo, hi = self.guidance_interval
        if not 0 <= lo < hi <= 1:
            raise ConfigError(f"--guidance-interval must be LO,HI with 0 <= LO < HI <= 1, got {lo},{hi}")
        if not 1 <= self.cache_interval <= MAX_CACHE_INTERVAL:
            raise ConfigError(f"--cache-interval must be in [1, {MAX_CACHE_INTERVAL}], got {self.cache_interval}")
        factor = files.spatial_factor
        h = self.height or files.default_size
        w = self.width or files.default_size
        for name, v in (("height", h), ("width", w)):
            if v <= 0 or v % factor:
                raise ConfigError(
                    f"--{name} {v} is not a positive multiple of {factor} (this model's factor: "
                    f"VAE x{files.vae_scale_factor} times the UNet's down-sampling)"
                )
        return replace(self, scheduler=SchedulerName(self.scheduler), height=h, width=w,
                       guidance_interval=(float(lo), float(hi)))

    def guided_steps(self) -> list[bool]:
        """Per step: does it run the unconditional pass (step i of n is in [lo n, hi n))."""
        lo, hi = self.guidance_interval
        return [lo * self.steps <= i < hi * self.steps for i in range(self.steps)]

    def unconditional_steps(self) -> list[bool]:
        """Per step: does it run the unconditional pass (guidance on, and the step in the interval)."""
        return [self.guidance > 1.0 and g for g in self.guided_steps()]

    def full_steps(self) -> list[bool] | None:
        """Per step: whole UNet (True) or DeepCache's shallow path; None without caching."""
        if self.cache_interval == 1:
            return None
        return deep_cache_plan(self.unconditional_steps(), self.cache_interval)

    def unet_evaluations(self) -> int:
        """UNet sample-evaluations per image (a guided step costs two), full or shallow."""
        return sum(2 if g else 1 for g in self.unconditional_steps())

    def unet_flops(self, full: float, shallow: float) -> float:
        """UNet FLOPs per image, given one sample-evaluation's FLOPs on the full and shallow paths."""
        plan = self.full_steps() or [True] * self.steps
        return sum((2 if g else 1) * (full if f else shallow)
                   for g, f in zip(self.unconditional_steps(), plan))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of a resolved config."""
        if self.height is None or self.width is None:
            raise ConfigError("the sampling config is not resolved for a model yet (.resolved())")
        return self.height, self.width

    def as_dict(self) -> dict:
        d = asdict(self)
        d["scheduler"] = SchedulerName(self.scheduler).value
        d["guidance_interval"] = list(self.guidance_interval)
        if self.cache_interval == 1:
            del d["cache_interval"]  # records (sidecars, job hashes) of uncached runs stay as they were
        return d


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One CPU generator per image, as diffusers does with a list of generators: an image depends
    only on its own seed (not on batch size, position or device)."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    )


class Pipeline:
    def __init__(self, model: LoadedModel, backend: UNetBackend | None = None):
        self.model = model
        self.backend = backend or TorchBackend(model.unet)

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:  # (B, 77, D)
        tok, te = self.model.tokenizer, self.model.text_encoder
        unique = list(dict.fromkeys(prompts))  # each distinct prompt is encoded once
        ids = tok(unique, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        mask = ids.attention_mask.to(self.model.device) if getattr(
            te.config, "use_attention_mask", False) else None
        states = te(ids.input_ids.to(self.model.device), attention_mask=mask)[0]
        states = states.to(self.model.dtype)
        return states[[unique.index(p) for p in prompts]]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list:
        from PIL import Image

        vae = self.model.vae
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        # A NaN would become a black pixel: such images are refused (the rest of the batch kept).
        finite = torch.isfinite(latents).flatten(1).all(1) & torch.isfinite(images).flatten(1).all(1)
        images = (torch.nan_to_num(images) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        images = images.float().cpu().numpy()
        out = [Image.fromarray(a) if ok else None
               for a, ok in zip((images * 255).round().astype("uint8"), finite.tolist())]
        bad = [i for i, im in enumerate(out) if im is None]
        if bad:
            from compinv_rt.core.errors import NonFiniteOutput

            raise NonFiniteOutput(bad, out)
        return out

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        config: SamplingConfig,
        negative_prompts: list[str] | None = None,
        hook: StepHook | None = None,  # progress, cancellation, layout guidance (denoise.Step)
        bias: AttentionBias | None = None,  # the spatial attention bias (conditional half)
        attention_recorder=None,  # spatial.heatmaps.AttentionRecorder: needs the torch backend
    ) -> list:
        cfg = config.resolved(self.model.files)
        if len(prompts) != len(seeds):
            raise ConfigError("one seed per prompt is needed")
        scheduler, latents, denoiser = self.start(prompts, seeds, cfg, negative_prompts, bias)
        recording: contextlib.AbstractContextManager = contextlib.nullcontext()
        if attention_recorder is not None:
            from compinv_rt.unet.capture import capturing

            recording = capturing(self.torch_module("--save-attention"), attention_recorder,
                                  exclusive=False)
        with recording:
            latents = denoise(denoiser, scheduler, latents, hook)
        return self.decode(latents)

    @torch.inference_mode()
    def start(self, prompts: list[str], seeds: list[int], cfg: SamplingConfig,
              negative_prompts: list[str] | None = None, bias: AttentionBias | None = None) -> tuple:
        """(scheduler, initial latents, denoiser) of a run with the resolved `cfg`: what the loop
        steps. A step loop that admits requests one by one (compinv_rt.generate.stepper) starts
        each the same way, so its images are this loop's."""
        files, m = self.model.files, self.model
        scheduler = make_scheduler(cfg.scheduler, files.scheduler_config)
        scheduler.set_timesteps(cfg.steps, device=m.device)
        f = files.vae_scale_factor
        height, width = cfg.size
        shape = (m.unet.config.in_channels, height // f, width // f)
        latents = initial_noise(seeds, shape).to(m.device, m.dtype) * scheduler.init_noise_sigma
        cond = self.encode_prompts(prompts)
        use_cfg = cfg.guidance > 1.0
        uncond = self.encode_prompts(negative_prompts or [""] * len(prompts)) if use_cfg else None
        if bias is not None:
            bias = replace(bias, maps=bias.maps.to(m.device, m.dtype))
        full_steps = cfg.full_steps()
        if full_steps is not None and not hasattr(self.backend, "shallow"):
            raise ConfigError(f"--cache-interval needs deep-feature caching, which the {self.backend.name} "
                              "backend does not have (torch, onnxruntime, aoti and tensorrt do)")
        model = BiasedModel(self.backend, bias, scheduler.timesteps[0], full_steps)
        guided_steps = None if cfg.guidance_interval == (0.0, 1.0) else cfg.guided_steps()
        return scheduler, latents, GuidedDenoiser(model, cond, uncond, cfg.guidance, guided_steps)

    def torch_module(self, feature: str) -> torch.nn.Module:
        """The eager BiasedUNet behind the backend, for features that need PyTorch itself."""
        if self.backend.name != "torch":
            raise ConfigError(f"{feature} needs the UNet's internals and runs only with --backend "
                              f"torch (got {self.backend.name})")
        return self.backend.module  # type: ignore[union-attr]  # the torch backend has one
