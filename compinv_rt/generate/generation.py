"""`generate` as a library call: one request through a `GenerationSession`, written to a folder as
PNGs, JSON sidecars, a grid and (with --save-attention) attention heatmaps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compinv_rt.core.outputs import atomic_write_json, make_grid, save_png, slug
from compinv_rt.generate.session import GeneratedImage, GenerationSession, Request
from compinv_rt.sampling.denoise import StepCallback


@dataclass(frozen=True)
class GenerationResult:
    images: list[Path]
    sidecars: list[Path]
    grid: Path
    attention: list[Path] = field(default_factory=list)  # --save-attention heatmap grids


GRID_MAX = 64  # images tiled into the grid: the first 64 (a run of 10,000 keeps memory flat)


def image_name(image: GeneratedImage, stem: str | None = None) -> str:
    """An image's file name, `<prompt slug>_<seed>.png`: what `generate` writes (with the stem
    `folder_stem` chose) and the server's sidecars name."""
    return f"{stem or slug(image.request.prompt)}_{image.seed}.png"


def folder_stem(out: Path, prompt: str) -> str:
    """The prompt's slug, unless files of another prompt in `out` already carry it ("a red star!"
    and "a red star?" slug alike): then the slug plus a hash of the prompt, so no run overwrites
    another prompt's images."""
    import hashlib
    import json

    stem = slug(prompt)
    # Files under one stem are one prompt's (a second prompt gets the suffix): one sidecar tells.
    sidecar = next(Path(out).glob(f"{stem}_*.json"), None)
    if sidecar is None:
        return stem
    try:
        other = json.loads(sidecar.read_text()).get("prompt")
    except (OSError, ValueError, AttributeError):
        other = None
    return stem if other == prompt else f"{stem}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


def generate_to_folder(session: GenerationSession, request: Request, out: Path,
                       on_step: StepCallback | None = None) -> GenerationResult:
    """Each batch is written as it finishes: memory depends on the batch size, not on n."""
    out = Path(out)
    stem = folder_stem(out, request.prompt)
    pngs: list[Path] = []
    sidecars: list[Path] = []
    heatmaps: list[Path] = []
    tiles: list = []  # PIL images of the grid
    written = None  # a PNG whose sidecar is not written yet
    try:
        for r in session.run(session.tasks(request), on_step):
            if len(tiles) < GRID_MAX:
                tiles.append(r.image)
            png = written = save_png(out / image_name(r, stem), r.image)
            extra: dict = {"index": r.index, "image": png.name}
            if r.attention is not None:
                grid_img, shares = _attention_outputs(session, r)
                heatmaps.append(save_png(out / f"{stem}_{r.seed}_attention.png", grid_img))
                extra["attention"] = {"heatmaps": heatmaps[-1].name, "share": shares}
            sidecars.append(atomic_write_json(png.with_suffix(".json"),
                                              session.sidecar(r, **extra)))
            pngs.append(png)
            written = None
        grid = save_png(out / f"{stem}_{request.seed}_grid.png", make_grid(tiles))
    except OSError as exc:  # disk full, permission denied: say what is kept
        from compinv_rt.core.outputs import disk_error

        if written is not None:
            written.unlink(missing_ok=True)
        raise disk_error(exc, f"kept {len(sidecars)} complete image(s) with sidecars in {out}/ "
                              "(no grid); no partial file is left") from None
    return GenerationResult(pngs, sidecars, grid, heatmaps)


def _attention_outputs(session: GenerationSession, r: GeneratedImage) -> tuple:
    """(heatmap grid image, [{position, token, share of the attention among the prompt's tokens}])."""
    from compinv_rt.spatial.heatmaps import attention_shares, heatmap_grid, prompt_token_labels

    labels = prompt_token_labels(session.model.tokenizer, r.text)
    positions = [p for p, _ in labels]
    boxes = {}
    if r.layout is not None:
        boxes = {p: c.boxes for c in r.layout.concepts for p in c.tokens}
    shares = attention_shares(r.attention, positions)
    named = [{"position": p, "token": t, "share": round(s, 4)} for (p, t), s in zip(labels, shares)]
    return heatmap_grid(r.image, r.attention, labels, boxes=boxes), named
