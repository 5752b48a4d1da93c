"""The `compinv-rt` command line. Parse, build a config, call the library, map errors to exit codes.

Only typer and the standard library are imported at module level so that `--help` stays fast;
torch, diffusers and friends are imported inside the commands that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from compinv_rt.apps.cli_support import progress, typer_app, user_errors
from compinv_rt.apps.generate_command import generate_command
from compinv_rt.apps.options import DeviceOption, ModelOption
from compinv_rt.core.types import Precision
from compinv_rt.export.manifest import EngineFormat, ExportTarget
from compinv_rt.export.onnx_export import OnnxExporter

app = typer_app(
    "compinv-rt",
    "Compositional inversion for Stable Diffusion: train concepts, export engines, generate.")
app.command("generate")(generate_command)


def _int_list(text: str, option: str) -> list[int]:
    from compinv_rt.core.schemas import check_int_list

    return check_int_list(text, option)


def _check_size_and_device(height, width, device) -> None:
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.schemas import check_device, check_option

    for opt, v in (("--height", height), ("--width", width)):
        if v is not None:
            check_option(opt, v, ge=1, limit="max_size")
    try:
        check_device(device)
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}, got {device!r}") from None


@app.command()
@user_errors
def export(  # noqa: PLR0913 (a Typer command: one parameter per option)
    format: ExportTarget = typer.Option(
        ..., "--format", help="Artifact to build; triton = a Triton model repository around the "
        "TensorRT plan (on CUDA with TensorRT) or else the ONNX engine."),
    model: ModelOption = None,
    precision: Precision = typer.Option(
        Precision.auto, help="Weights and activations precision: auto (fp16 on CUDA, fp32 on CPU, "
        "as generate), fp32, fp16 or bf16. The model is loaded at this precision."),
    batch_sizes: str = typer.Option("1,2,4,8", help="Image batch sizes: one static bucket each."),
    dynamic: bool = typer.Option(False, "--dynamic", help="One dynamic batch range instead of buckets."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the model's native size)."),
    opset: int = typer.Option(17, help="ONNX opset (legacy exporter: 17; dynamo: >= 18)."),
    exporter: OnnxExporter = typer.Option(OnnxExporter.legacy, help="ONNX exporter."),
    optimization_level: int = typer.Option(3, help="TensorRT builder optimization level (0-5)."),
    device: str = typer.Option("auto", help="Device the artifact is compiled for (tensorrt, aoti)."),
    out: Path = typer.Option(Path("engines"), help="Engine cache folder."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a matching engine exists."),
    deep_cache: bool = typer.Option(
        False, "--deep-cache", help="Also export DeepCache's graphs (full + shallow UNet) so that "
        "generate --cache-interval runs on this engine; it serves uncached runs too."),
):
    """Build the UNet engine (with its attention_bias input) into OUT/<format>-<key>/."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import check_writable_dir
    from compinv_rt.export.build import ExportOptions, export_engine
    from compinv_rt.export.onnx_export import check_opset
    from compinv_rt.models.loading import inspect_model_dir, load_model, resolve_model_dir
    from compinv_rt.unet.iospec import UNetIOSpec, batch_profiles

    _check_size_and_device(height, width, device)
    profiles = batch_profiles(_int_list(batch_sizes, "--batch-sizes"), dynamic)
    target = format
    if target is ExportTarget.triton:
        from compinv_rt.export.build import tensorrt_usable

        fmt = EngineFormat.tensorrt if tensorrt_usable(device) else EngineFormat.onnx
    else:
        fmt = EngineFormat(target.value)
    if fmt is EngineFormat.onnx and precision is Precision.bf16:  # it would build, then not run
        raise ConfigError("ONNX Runtime runs fp32 or fp16 engines, not bf16: use --precision fp32/fp16, "
                          "or --format aoti for bf16")
    if fmt is not EngineFormat.aoti:
        check_opset(exporter, opset)
    files = inspect_model_dir(resolve_model_dir(model))
    from compinv_rt.models.loading import pick_device

    spec = UNetIOSpec.for_model(files, height or files.default_size, width or files.default_size,
                                precision.resolve(pick_device(device)), deep_cache=deep_cache)
    if fmt is EngineFormat.tensorrt:
        from compinv_rt.export.build import require_tensorrt

        require_tensorrt()
    check_writable_dir(out)
    # Loaded at the export's precision: an fp32 engine from fp16-rounded weights is not fp32.
    loaded = load_model(str(files.root), device=device, dtype=precision)
    options = ExportOptions(exporter.value, opset, optimization_level).for_format(fmt)
    engine_dir, reused = export_engine(fmt, loaded, spec, profiles, out, options, force=force,
                                       on_status=lambda msg: typer.echo(msg, err=True))
    typer.echo(f"{'reused' if reused else 'built'} {fmt.value} engine: {engine_dir}")
    if target is ExportTarget.triton:
        from compinv_rt.export.triton import write_triton_repository

        model_dir = write_triton_repository([engine_dir], out / "triton")
        typer.echo(f"Triton model repository: {model_dir.parent} (model '{model_dir.name}', "
                   f"{fmt.value}); the denoising-loop model is described in docs/scale-out.md")


@app.command()
@user_errors
def train(  # noqa: PLR0913 (a Typer command: one parameter per option)
    images: Path = typer.Option(..., help="Folder of the concept's photos (png/jpg/webp/bmp)."),
    token: str = typer.Option(..., help="New placeholder token, e.g. '<my-heart>'."),
    class_word: str = typer.Option(..., help="The concept's class, e.g. heart: prompts read '<tok> heart'."),
    out: Path = typer.Option(..., help="Output folder: embeddings, artifact.json, checkpoints, loss curve."),
    model: ModelOption = None,
    init_word: Optional[str] = typer.Option(
        None, help="Single-token word the vectors start from (default: the class word)."),
    anchors: Optional[str] = typer.Option(
        None, help="WORD[,WORD...] or auto:K (the K nearest real words of the init word). Default: the class word."),
    anchor_weight: float = typer.Option(0.95, help="Anchor-loss weight (0 = plain textual inversion)."),
    recon_weight: float = typer.Option(0.05, help="Reconstruction-loss weight."),
    anchor_l1: float = typer.Option(0.05, help="L1 sparsity of the coefficients with K >= 2 anchors."),
    vectors: int = typer.Option(1, help="Vectors per token (all are trained, all appear in every prompt)."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    batch: int = typer.Option(4, help="Images per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(
        5e-3, help="Base learning rate, in (0, 10] (scaled by batch x grad-accum unless --no-scale-lr)."),
    scale_lr: bool = typer.Option(True, "--scale-lr/--no-scale-lr", help="Scale --lr by batch x grad-accum."),
    resolution: Optional[int] = typer.Option(None, help="Training resolution (default: the model's native size)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="hflip + scale augmentation with a loss mask."),
    variants: int = typer.Option(8, help="Augmented variants per image (VAE-encoded once)."),
    templates: Optional[Path] = typer.Option(None, help="Prompt templates file: one per line, {} = the concept."),
    captions: str = typer.Option(
        "auto", help="What each photo shows besides the concept, named in its training prompts "
        "('<tok> heart on the sand'): auto (IMAGES/captions.json or <photo>.txt if present), "
        "none, or a JSON file {\"photo.png\": \"on the sand\"}. Every photo or none, UTF-8 text."),
    masks: Optional[Path] = typer.Option(
        None, help="Folder of subject masks (<photo stem>.png, white = the concept; the photo's "
        "size or aspect ratio): the loss counts the subject, with a soft border; or 'auto': from "
        "the base model's "
        "cross-attention to the class word."),
    context_token: bool = typer.Option(
        False, "--context-token/--no-context-token",
        help="Append an auxiliary token to every training prompt, trained jointly and never "
        "saved, to take up what the photos share besides the concept (photos without captions)."),
    norm: str = typer.Option(
        "auto", help="Fix each vector's norm: none, vocab (the vocabulary's median word norm), "
        "vocab:K (K times it) or a number (K and the number in [0.001, 100]); only the direction is "
        "learned. auto: vocab:2 for plain "
        "TI (--anchor-weight 0), none for semantic inversion."),
    context_weight: float = typer.Option(
        0.0, help="Context regularizer: keep the text encoder's outputs for the other words of "
        "composition prompts as with the class word in place of the token (0 = off)."),
    seed: int = typer.Option(0, help="Seed (a resumed run repeats the uninterrupted one)."),
    checkpoint_every: int = typer.Option(100, help="Checkpoint interval in steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    device: DeviceOption = "auto",
    format: str = typer.Option(
        "diffusers", "--format", help="Portable embedding copies besides the folder's own "
        "embeddings.safetensors: diffusers (learned_embeds.safetensors), a1111 (<name>.pt + "
        "<name>.safetensors, AUTOMATIC1111's layout) or both."),
):
    """Learn a new token from a few photos: textual inversion + semantic inversion (anchor loss)."""
    from compinv_rt.core.errors import ConfigError

    _check_train_options(lr, device, token, format)
    from compinv_rt.train.config import TrainConfig

    tpl = None
    if templates is not None:
        if not templates.is_file():
            raise ConfigError(f"templates file not found: {templates}")
        tpl = tuple(line.strip() for line in templates.read_text().splitlines() if line.strip())
    cfg = TrainConfig(token=token, class_word=class_word, init_word=init_word, anchors=anchors,
                      anchor_weight=anchor_weight, recon_weight=recon_weight, anchor_l1=anchor_l1,
                      vectors=vectors, steps=steps, batch=batch, grad_accum=grad_accum, lr=lr,
                      scale_lr=scale_lr, resolution=resolution, augment=augment, variants=variants,
                      seed=seed, checkpoint_every=checkpoint_every, templates=tpl,
                      captions=captions, masks=None if masks is None else str(masks),
                      context_token=context_token, norm=norm, context_weight=context_weight)
    _run_training(cfg, TrainRun(images, out, model, resume, device, format))


def _check_train_options(lr: float, device: str, token: str, fmt: str) -> None:
    """What the shared bounds (apps/option_bounds.py, checked before any command) do not cover:
    --lr > 0, the device's form, and a token whose portable copies (`fmt`) would overwrite the
    concept folder's own files. One `error:` line, before anything heavy is imported."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.schemas import check_device, check_option
    from compinv_rt.train.config import LR_MAX
    from compinv_rt.train.portable import check_portable_names

    check_option("--lr", lr, gt=0, le=LR_MAX)
    try:
        check_device(device)
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}, got {device!r}") from None
    check_portable_names(token, fmt)


@dataclass(frozen=True)
class TrainRun:
    """Where a training run reads and writes, besides its TrainConfig."""

    images: Path
    out: Path
    model: str | None
    resume: bool
    device: str
    format: str  # portable copies: diffusers, a1111 or both


def _run_training(cfg, run: TrainRun) -> None:
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import FolderLock, remove_if_empty
    from compinv_rt.train.loop import check_out_dir, prepare, train_concept
    from compinv_rt.train.portable import EmbeddingFormat, write_portable

    if run.format not in {f.value for f in EmbeddingFormat}:
        raise ConfigError(f"--format must be diffusers, a1111 or both, got {run.format!r}")
    # Everything cheap is checked before weights load or anything is written.
    plan = prepare(cfg, run.images, run.model)
    check_out_dir(run.out, run.resume)
    bar = progress(cfg.steps, "training")

    def on_step(info):
        if bar.n == 0 and info.step > 1:
            bar.update(info.step - 1)
        bar.set_postfix(rec=f"{info.rec:.4f}", anchor=f"{info.anchor:.2e}",
                        dist=f"{info.anchor_distance:.3f}", refresh=False)
        bar.update(1)

    created = not run.out.exists()
    run.out.mkdir(parents=True, exist_ok=True)
    try:  # one run per folder: two `--resume`s of one training are refused, not interleaved
        with FolderLock(run.out):
            result = train_concept(plan, run.out, resume=run.resume, device=run.device, on_step=on_step,
                                   on_status=lambda msg: typer.echo(msg, err=True))
            portable = write_portable(run.out, run.format)
    finally:
        bar.close()
        if created:
            remove_if_empty(run.out)
    rec = result.record
    carrying = ", ".join(f"{a['word']} ({a['coefficient']:.3f})" for a in rec["anchors"]
                         if a["carries_weight"]) or "none"
    loss = rec["loss"]
    typer.echo(f"trained {rec['token']} ({rec['vectors']} vector(s), {rec['method']}) "
               f"in {rec['steps_done']} steps: {run.out}/")
    typer.echo(f"anchors carrying weight: {carrying}; distance to anchor target "
               f"{rec['anchor_target_distance']:.4f}")
    typer.echo(f"reconstruction loss {loss['first_10pct_mean'][0]:.4f} -> "
               f"{loss['last_10pct_mean'][0]:.4f} (first/last 10% of steps)")
    typer.echo(f"embedding copies ({run.format}): {', '.join(p.name for p in portable)}")


@app.command()
def doctor():
    """Show what is installed and usable: torch and its devices, ONNX Runtime, TensorRT, models."""
    from compinv_rt.apps.doctor import run_checks

    checks = run_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        typer.echo(f"{'ok ' if c.ok else '-- '} {c.name:<{width}}  {c.detail}")


from compinv_rt.apps.bench.command import bench_command  # noqa: E402  (typer-only module)
from compinv_rt.apps.eval.command import eval_command  # noqa: E402  (typer-only module)

app.command("bench")(bench_command)
app.command("eval")(eval_command)


# --- `compinv-rt layout ...`: the layout model --------------------------------------------

layout_app = typer_app(
    "layout", "The layout model behind `generate --layout auto`: build data, fit, evaluate.")


@layout_app.command("world-data")
@user_errors
def layout_world_data(  # noqa: PLR0913 (a Typer command: one parameter per option)
    out: Path = typer.Option(..., help="JSONL file to write: one {prompt, phrases, boxes} per line."),
    n: int = typer.Option(16000, "-n", help="Scenes (the layout MLP overfits a few thousand)."),
    split: str = typer.Option("train", help="train (scenes the world trains on) or heldout."),
    seed: int = typer.Option(0, help="First scene seed."),
    places: str = typer.Option(
        "any", help="any: the world's captions as it makes them (about 40 % state every object's "
        "place and size); stated / unstated: only scenes whose caption does / does not."),
):
    """Ground-truth layouts from the shapes world (its captions + object boxes)."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import check_writable_dir

    if n < 1:
        raise ConfigError(f"-n must be >= 1, got {n}")
    check_writable_dir(out.parent)
    from compinv_rt.apps.world.layouts import world_examples
    from compinv_rt.spatial.layout_model import write_jsonl

    write_jsonl(out, world_examples(n, split, seed, places))
    typer.echo(f"wrote {n} {split} layouts ({places} places) to {out}")


@layout_app.command("fit")
@user_errors
def layout_fit(  # noqa: PLR0913 (a Typer command: one parameter per option)
    out: Path = typer.Option(..., help="Folder for layout_model.safetensors + layout_model.json."),
    data: Optional[Path] = typer.Option(None, help="Ground-truth layouts (JSONL of prompt, phrases, boxes)."),
    from_attention: bool = typer.Option(
        False, "--from-attention", help="Learn from boxes recovered from the base model's own "
        "cross-attention on generated '{a} and {b}' images (no data needed)."),
    words: Optional[str] = typer.Option(None, help="--from-attention: comma-separated concepts."),
    template: list[str] = typer.Option(
        ["a {a} and a {b}"], help="--from-attention: prompt template(s) with {a} and {b} (a pair "
        "of concepts) or {a} alone (one concept)."),
    images_per_prompt: int = typer.Option(2, help="--from-attention: images per prompt."),
    steps: int = typer.Option(20, help="--from-attention: denoising steps."),
    guidance: float = typer.Option(7.5, help="--from-attention: classifier-free guidance."),
    threshold: float = typer.Option(0.5, help="--from-attention: map level (of its range) kept as the box."),
    model: ModelOption = None,
    device: DeviceOption = "auto",
    epochs: int = typer.Option(10, help="Training epochs (more overfits a few thousand layouts)."),
    seed: int = typer.Option(0, help="Seed."),
    fp16: bool = typer.Option(False, "--fp16", help="Store float16 weights (half the size)."),
):
    """Fit the layout MLP (prompt states, concept tokens and the words after each concept -> one
    box per concept)."""
    import json

    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import check_writable_dir

    if (data is None) == (not from_attention):
        raise ConfigError("give exactly one of --data FILE or --from-attention")
    if from_attention and not words:
        raise ConfigError("--from-attention needs --words 'a,b,...'")
    if epochs < 1 or images_per_prompt < 1:
        raise ConfigError("--epochs and --images-per-prompt must be >= 1")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {threshold}")
    from compinv_rt.models.loading import inspect_model_dir, load_model, resolve_model_dir
    from compinv_rt.spatial import layout_data, layout_model

    files = inspect_model_dir(resolve_model_dir(model))
    prompts = None
    if data is not None:
        examples = layout_model.read_jsonl(data)
    else:
        phrases = [w.strip() for w in (words or "").split(",") if w.strip()]
        prompts = layout_data.pair_prompts(phrases, template)
    check_writable_dir(out)
    loaded = load_model(str(files.root), device=device)
    if prompts is not None:
        from compinv_rt.sampling.pipeline import SamplingConfig

        bar = progress(len(prompts) * images_per_prompt, "generating", unit="image")
        try:
            examples = layout_data.attention_examples(
                loaded, prompts, images_per_prompt, SamplingConfig(steps, guidance), seed,
                threshold=threshold, on_progress=lambda done, total: bar.update(done - bar.n))
        finally:
            bar.close()
    bar = progress(epochs, "fitting", unit="epoch")
    try:
        net = layout_model.fit(examples, loaded.tokenizer, loaded.text_encoder,
                               layout_model.FitConfig(epochs=epochs, seed=seed),
                               on_epoch=lambda e, total, loss: bar.update(e - bar.n))
    finally:
        bar.close()
    fit_iou = layout_model.evaluate(net, examples, loaded.tokenizer, loaded.text_encoder)
    info = {"source": "attention" if from_attention else "ground-truth",
            "data": None if data is None else str(data), "examples": len(examples),
            "base_model": {"path": str(loaded.root), "hash": loaded.hash}, "fit_iou": fit_iou,
            "epochs": epochs, "seed": seed, "dtype": "float16" if fp16 else "float32"}
    layout_model.save(net, out, info, half=fp16)
    if from_attention:
        layout_model.write_jsonl(out / "recovered_layouts.jsonl", examples)
    typer.echo(json.dumps(fit_iou))
    typer.echo(f"layout model: {out}")


@layout_app.command("eval")
@user_errors
def layout_eval(  # noqa: PLR0913 (a Typer command: one parameter per option)
    layout_model_dir: Path = typer.Option(..., "--layout-model", help="Folder from `layout fit`."),
    data: Path = typer.Option(..., help="Ground-truth layouts (JSONL) to compare with."),
    model: ModelOption = None,
):
    """Mean IoU of predicted vs ground-truth boxes (and of the fixed reference boxes)."""
    import json

    from compinv_rt.models.loading import load_model
    from compinv_rt.spatial import layout_model

    examples = layout_model.read_jsonl(data)
    net, _ = layout_model.load(layout_model_dir)
    loaded = load_model(model, device="cpu")
    layout_model.LayoutPredictor(net, loaded.tokenizer, loaded.text_encoder)  # checks the width
    typer.echo(json.dumps(layout_model.evaluate(net, examples, loaded.tokenizer, loaded.text_encoder)))


app.add_typer(layout_app, name="layout")

from compinv_rt.apps.world.cli import world_app  # noqa: E402  (typer-only module: --help stays fast)

app.add_typer(world_app, name="world")

from compinv_rt.apps.serve.command import serve as _serve  # noqa: E402  (typer-only module)

app.command("serve")(_serve)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
