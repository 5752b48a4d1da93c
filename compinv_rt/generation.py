"""`generate` as a library call: load the model, sample, write PNGs, JSON sidecars and a grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compinv_rt.outputs import atomic_write_json, image_metadata, make_grid, save_png, slug
from compinv_rt.runtime.denoise import StepCallback
from compinv_rt.runtime.pipeline import Pipeline, SamplingConfig


@dataclass(frozen=True)
class GenerationResult:
    images: list[Path]
    sidecars: list[Path]
    grid: Path
    attention: list[Path] = field(default_factory=list)  # --save-attention heatmap grids


def generate_to_folder(
    prompt: str,
    negative_prompt: str,
    seeds: list[int],
    config: SamplingConfig,
    model: str | None,
    out: Path,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "torch",
    engine: Path | None = None,
    engines_root: Path = Path("engines"),
    on_step: StepCallback | None = None,
    on_status=None,
    spatial=None,  # compinv_rt.spatial.plan.SpatialConfig; None = no spatial regularization
    concepts=(),  # trained concept folders (`compinv-rt train --out`), see train/artifact.py
) -> GenerationResult:
    from compinv_rt.models.loading import load_model
    from compinv_rt.runtime.registry import open_backend

    loaded = load_model(model, device=device, dtype=precision)
    from compinv_rt.train.artifact import expand_prompt, load_concepts

    concepts = load_concepts(loaded, concepts)  # their tokens join the text encoder's table
    text, negative = expand_prompt(prompt, concepts), expand_prompt(negative_prompt, concepts)
    config = config.resolved(loaded.files)
    unet = open_backend(backend, loaded, config.height, config.width, len(seeds),
                        guidance=config.guidance > 1.0, engine=engine, engines_root=engines_root,
                        on_status=on_status)
    pipe = Pipeline(loaded, unet)
    from compinv_rt.spatial.plan import SpatialConfig, plan_spatial

    spatial = spatial or SpatialConfig()
    plan = plan_spatial(spatial, loaded, pipe.backend, text, len(seeds), config, on_status,
                        expand=lambda phrase: expand_prompt(phrase, concepts))
    images = pipe.generate([text] * len(seeds), seeds, config,
                           negative_prompts=[negative] * len(seeds), on_step=on_step,
                           **plan.kwargs)
    stem = slug(prompt)
    common = {
        "concepts": [{"folder": str(c.folder), "token": c.token, "vectors": c.vectors}
                     for c in concepts],
        "spatial": plan.sidecar(spatial),
    }
    out = Path(out)
    heat = _attention_outputs(plan, loaded.tokenizer, text, images) if plan.recorder else None
    pngs, sidecars, heatmaps = [], [], []
    for i, (seed, image) in enumerate(zip(seeds, images)):
        png = save_png(out / f"{stem}_{seed}.png", image)
        meta = image_metadata(prompt, negative_prompt, seed, config.as_dict(), loaded,
                              pipe.backend.name, **common, index=i, image=png.name)
        if heat is not None:
            grid_img, shares = heat[i]
            heatmaps.append(save_png(out / f"{stem}_{seed}_attention.png", grid_img))
            meta["attention"] = {"heatmaps": heatmaps[-1].name, "share": shares}
        sidecars.append(atomic_write_json(png.with_suffix(".json"), meta))
        pngs.append(png)
    grid = save_png(out / f"{stem}_{seeds[0]}_grid.png", make_grid(images))
    return GenerationResult(pngs, sidecars, grid, heatmaps)


def _attention_outputs(plan, tokenizer, prompt: str, images) -> list:
    """Per image: (heatmap grid PNG, {token: share of the attention among the prompt's tokens})."""
    from compinv_rt.spatial.heatmaps import attention_shares, heatmap_grid, prompt_token_labels

    labels = prompt_token_labels(tokenizer, prompt)
    positions = [p for p, _ in labels]
    boxes = {}
    if plan.layout is not None:
        boxes = {p: c.boxes for c in plan.layout.concepts for p in c.tokens}
    maps = plan.recorder.maps()  # (B, T, h, w)
    out = []
    for i, image in enumerate(images):
        shares = attention_shares(maps[i], positions)
        named = [{"position": p, "token": t, "share": round(s, 4)} for (p, t), s in zip(labels, shares)]
        out.append((heatmap_grid(image, maps[i], labels, boxes=boxes), named))
    return out
