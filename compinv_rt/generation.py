"""`generate` as a library call: load the model, sample, write PNGs, JSON sidecars and a grid."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from compinv_rt import __version__
from compinv_rt.outputs import atomic_write_json, make_grid, save_png, slug
from compinv_rt.runtime.denoise import StepCallback
from compinv_rt.runtime.pipeline import Pipeline, SamplingConfig


@dataclass(frozen=True)
class GenerationResult:
    images: list[Path]
    sidecars: list[Path]
    grid: Path


def generate_to_folder(
    prompt: str,
    negative_prompt: str,
    seeds: list[int],
    config: SamplingConfig,
    model: str | None,
    out: Path,
    device: str = "auto",
    backend: str = "torch",
    engine: Path | None = None,
    engines_root: Path = Path("engines"),
    on_step: StepCallback | None = None,
    on_status=None,
) -> GenerationResult:
    from compinv_rt.models.loading import load_model
    from compinv_rt.runtime.registry import open_backend

    loaded = load_model(model, device=device)
    config = config.resolved(loaded.files)
    unet = open_backend(backend, loaded, config.height, config.width, len(seeds),
                        guidance=config.guidance > 1.0, engine=engine, engines_root=engines_root,
                        on_status=on_status)
    pipe = Pipeline(loaded, unet)
    images = pipe.generate([prompt] * len(seeds), seeds, config,
                           negative_prompts=[negative_prompt] * len(seeds), on_step=on_step)
    stem = slug(prompt)
    common = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "model": {"path": str(loaded.root), "hash": loaded.hash},
        "settings": config.as_dict(),
        "backend": pipe.backend.name,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "compinv_rt": __version__,
        "python": platform.python_version(),
    }
    out = Path(out)
    pngs, sidecars = [], []
    for i, (seed, image) in enumerate(zip(seeds, images)):
        png = save_png(out / f"{stem}_{seed}.png", image)
        meta = {**common, "seed": seed, "index": i, "image": png.name,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        sidecars.append(atomic_write_json(png.with_suffix(".json"), meta))
        pngs.append(png)
    grid = save_png(out / f"{stem}_{seeds[0]}_grid.png", make_grid(images))
    return GenerationResult(pngs, sidecars, grid)
