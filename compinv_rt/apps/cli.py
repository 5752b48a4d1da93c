"""The `compinv-rt` command line. Parse, build a config, call the library, map errors to exit codes.

Only typer and the standard library are imported at module level so that `--help` stays fast;
torch, diffusers and friends are imported inside the commands that need them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from compinv_rt.apps.cli_support import progress, typer_app, user_errors
from compinv_rt.core.types import Precision
from compinv_rt.engines.registry import Backend
from compinv_rt.export.manifest import EngineFormat, ExportTarget
from compinv_rt.export.onnx_export import OnnxExporter
from compinv_rt.sampling.quality import Quality
from compinv_rt.sampling.schedulers import SchedulerName
from compinv_rt.spatial.layouts import SpatialMode

app = typer_app(
    "compinv-rt",
    "Compositional inversion for Stable Diffusion: train concepts, export engines, generate.")


@app.command()
@user_errors
def generate(
    prompt: Optional[str] = typer.Argument(None, help="What to draw (omit with --jobs)."),
    num_images: int = typer.Option(4, "-n", "--num-images", help="Images to generate."),
    quality: Optional[Quality] = typer.Option(
        None, help="Sampler preset from the judged quality-vs-cost curve (benchmarks/speed.md): default "
        "(when no sampler option is given), fast, or reference (25 DDIM steps, guidance on every step: "
        "the base for --steps/--scheduler/--guidance-interval given without --quality)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the --quality preset's)."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale (<= 1 disables it)."),
    guidance_interval: Optional[str] = typer.Option(
        None, help="LO,HI: guidance only on the steps in [LO, HI) of the run (fractions); the others "
        "skip the unconditional pass (default: the --quality preset's)."),
    seed: int = typer.Option(0, help="Seed of the first image; image i uses seed + i."),
    negative_prompt: str = typer.Option("", help="What to steer away from."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the model's native size)."),
    scheduler: Optional[SchedulerName] = typer.Option(None, help="Sampler (default: the --quality preset's)."),
    model: Optional[str] = typer.Option(None, help="Local diffusers SD 1.x/2.x folder (default: embedded)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option(
        "auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (about 2x faster on "
        "CPUs with AMX, with --backend aoti or compile)."),
    backend: Backend = typer.Option(Backend.torch, help="UNet backend."),
    engine: Optional[Path] = typer.Option(
        None, help="Engine folder from `compinv-rt export` (default: find or build one in engines/)."),
    out: Optional[str] = typer.Option(
        None, help="Output folder (default: outputs/<timestamp>); with --jobs also any pyarrow "
        "filesystem URI (s3://, gs://, file://)."),
    layout: Optional[str] = typer.Option(
        None, help="auto | none | 'phrase=x0,y0,x1,y1;phrase=...' (normalized boxes; a phrase named "
        "twice gets two boxes; 'phrase;phrase' = boxes from the layout model). Default: auto when "
        "--spatial is set."),
    spatial: Optional[SpatialMode] = typer.Option(
        None, help="Layout regularization: bias (attention-logit bias, every backend), adaptive "
        "(the bias in units of each layer's logit spread, every backend) or guidance (backward "
        "latent guidance, --backend torch only). Default: bias when --layout is given."),
    bias_strength: Optional[float] = typer.Option(
        None, help="Bias s: +s inside a concept's region, -s outside; in logits for bias (default "
        "2), in units of each layer's logit spread for adaptive (default 3)."),
    bias_decay: Optional[float] = typer.Option(
        None, help="--spatial adaptive: the bias weight falls as (t / t_first) ** decay with the "
        "noise level (default 4; 0 = constant over the biased steps)."),
    bias_steps: Optional[str] = typer.Option(
        None, help="Steps that get the bias or guidance: a fraction (0.2; 1.0 = all) or a "
        "count (10). Default 0.2 (adaptive: 0.4)."),
    layout_model: Optional[Path] = typer.Option(
        None, help="Layout model folder from `compinv-rt layout fit` for --layout auto "
        "(default: <model>/layout/ if present, else fixed boxes)."),
    save_attention: bool = typer.Option(
        False, "--save-attention", help="Also write per-token cross-attention heatmaps (PNG grid, "
        "averaged over steps and layers) and attention shares in the sidecars (--backend torch)."),
    concept: Optional[list[Path]] = typer.Option(
        None, "--concept", help="Trained concept folder from `compinv-rt train` (repeatable); "
        "use its token in the prompt."),
    jobs: Optional[Path] = typer.Option(
        None, "--jobs", help="JSONL file, one job per line (prompt, seed, n, steps, guidance, "
        "negative_prompt, height, width, concepts, layout, id): batch generation instead of PROMPT."),
    max_batch: int = typer.Option(8, help="Images per UNet batch (x2 with guidance): memory does not grow "
                                  "with -n."),
    resume: bool = typer.Option(False, "--resume", help="--jobs: finish an interrupted run in --out."),
    ray: bool = typer.Option(False, "--ray", help="--jobs: run on Ray (one actor per worker)."),
    ray_address: Optional[str] = typer.Option(None, help="--ray: cluster address (default: start a local Ray)."),
    workers: int = typer.Option(2, help="--ray: number of actors."),
    gpus_per_worker: Optional[float] = typer.Option(
        None, help="--ray: GPUs per actor (default: 1 with a CUDA device, 0 on CPU)."),
):
    """Generate images: one PNG and one JSON sidecar per image, plus a grid."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.schemas import check_generate
    from compinv_rt.sampling.quality import parse_interval, sampler_settings

    sampler = sampler_settings(quality, steps, scheduler, parse_interval(guidance_interval))
    steps, scheduler = sampler.steps, sampler.scheduler
    # Every option typed and bounded before anything heavy is imported (an error in < 1 s).
    check_generate(prompt=prompt, num_images=1 if jobs else num_images, steps=steps,
                   guidance=guidance, seed=seed, negative_prompt=negative_prompt, height=height,
                   width=width, device=device, precision=precision, max_batch=max_batch,
                   workers=workers,
                   gpus_per_worker=gpus_per_worker, bias_strength=bias_strength, out=out,
                   jobs=jobs is not None)
    if resume and jobs is None:
        raise ConfigError("--resume continues a --jobs run; a PROMPT run has nothing to resume")
    if engine is not None and backend in (Backend.torch, Backend.compile):
        raise ConfigError(f"--engine is for --backend onnxruntime, tensorrt or aoti, not "
                          f"{backend.value}")
    if backend is Backend.onnxruntime and precision == "bf16":
        raise ConfigError("--backend onnxruntime runs fp32 or fp16 engines, not --precision bf16")
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir
    from compinv_rt.sampling.pipeline import SamplingConfig

    if jobs is not None:
        if prompt is not None:
            raise ConfigError("pass either a PROMPT or --jobs FILE, not both")
        if (layout is not None or spatial is not None or save_attention or concept
                or bias_decay is not None):
            raise ConfigError("--layout, --spatial, --bias-decay, --concept and --save-attention "
                              "apply to one PROMPT; with --jobs give each line its own 'layout' "
                              "and 'concepts'")
        ray_opts = dict(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
        return _generate_jobs(jobs, out, model, device, backend, engine, sampler, max_batch,
                              resume, seed, steps, guidance, ray_opts if ray else None,
                              bias_strength=2.0 if bias_strength is None else bias_strength,
                              bias_steps="0.2" if bias_steps is None else bias_steps,
                              precision=precision)
    # Everything cheap is validated before any weights are loaded or files are written.
    if prompt is None:
        raise ConfigError("give a PROMPT to draw (or --jobs FILE)")
    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    if num_images < 1:
        raise ConfigError(f"-n/--num-images must be >= 1, got {num_images}")
    precision = Precision.parse(precision)
    files = inspect_model_dir(resolve_model_dir(model))
    config = SamplingConfig(steps, guidance, scheduler, height, width, sampler.guidance_interval).resolved(files)
    if concept:
        from compinv_rt.models.concepts import check_concepts

        arts = check_concepts(concept, files)  # complete, trained on this model, distinct tokens
    from compinv_rt.core.schemas import check_concept_tokens

    known = {a["token"].lower() for a in arts} if concept else set()
    check_concept_tokens(prompt, known)
    check_concept_tokens(negative_prompt, known, "the negative prompt")
    from compinv_rt.spatial.plan import SpatialConfig

    spatial_config = SpatialConfig.from_options(
        None if spatial is None else spatial.value, layout, bias_strength, bias_steps, layout_model,
        save_attention, backend.value, config.steps, decay=bias_decay)
    import time

    folder = Path(out) if out is not None else Path("outputs") / time.strftime("%Y%m%d-%H%M%S")
    from compinv_rt.core.outputs import check_writable_dir, remove_stale_temp_files

    check_writable_dir(folder)
    if folder.is_dir():
        remove_stale_temp_files(folder)  # left by a killed run

    from compinv_rt.generate.generation import generate_to_folder
    from compinv_rt.generate.session import GenerationSession, Request, SessionOptions

    session = GenerationSession.open(
        SessionOptions(str(files.root), device, precision, backend, engine,
                       max_batch=min(num_images, max_batch)),
        on_status=lambda msg: typer.echo(msg, err=True))
    request = Request(prompt, seed, num_images, negative_prompt, config,
                      tuple(str(c) for c in concept or ()), spatial_config)
    batches = -(-num_images // min(num_images, max_batch))
    bar = progress(config.steps * batches, "denoising")
    try:
        result = generate_to_folder(session, request, folder, on_step=lambda done, total: bar.update(1))
    finally:
        bar.close()
    typer.echo(f"wrote {len(result.images)} images + JSON sidecars to {folder}/")
    if result.attention:
        typer.echo(f"attention heatmaps: {result.attention[0]}" + (" ..." if len(result.attention) > 1 else ""))
    typer.echo(f"grid: {result.grid}")


def _generate_jobs(jobs_file, out, model, device, backend, engine, sampler, max_batch, resume,
                   seed, steps, guidance, ray=None, bias_strength=2.0, bias_steps="0.2",
                   precision="auto"):
    """`generate --jobs`: many jobs packed into UNet batches, streamed to disk, resumable."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.generate.jobs import JobsSummary, read_jobs
    from compinv_rt.generate.sinks import open_sink
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir

    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    precision = Precision.parse(precision)
    if out is None:
        raise ConfigError("--jobs needs --out DIR (the folder --resume continues)")
    jobs, problems = read_jobs(jobs_file, {"seed": seed, "steps": steps, "guidance": guidance})
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    files = inspect_model_dir(resolve_model_dir(model))
    from compinv_rt.core.outputs import FolderLock, remove_if_empty

    local = "://" not in str(out)
    created = local and not Path(out).exists()
    sink = open_sink(out).prepare()
    # One run per folder at a time: a second run (two --resume) is refused, not run twice.
    lock = FolderLock(out) if local else contextlib.nullcontext()
    summary = JobsSummary(problems=list(problems))
    try:
        with lock:
            _run_jobs(jobs, out, files, resume, summary, sink, device, precision, backend, engine,
                      max_batch, sampler, bias_strength, bias_steps, ray)
    finally:
        if created:
            remove_if_empty(out)  # a run that wrote nothing leaves nothing
    for line in summary.problems[len(problems):]:
        typer.echo(f"error: {line}", err=True)
    listed = ", listed in failures.jsonl" if summary.problems else ""
    typer.echo(f"wrote {summary.written} images to {out}/ ({summary.skipped} already done, "
               f"{len(summary.problems)} problem(s){listed})")
    if not summary.ok:
        raise typer.Exit(1)


def _run_jobs(jobs, out, files, resume, summary, sink, device, precision, backend, engine,
              max_batch, sampler, bias_strength, bias_steps, ray):
    from compinv_rt.generate.jobs import JobsConfig, concept_folders, pending_items, write_failures
    from compinv_rt.generate.session import SessionOptions

    items = pending_items(jobs, out, files, resume, summary, exists=sink.exists)
    config = JobsConfig(SessionOptions(str(files.root), device, precision, backend, engine,
                                       max_batch=max_batch),
                        sampler.scheduler.value, concept_folders(jobs), bias_strength, bias_steps,
                        sampler.guidance_interval)
    bar = progress(len(items), "images", unit="img")
    try:
        if ray is not None:
            from compinv_rt.generate.scaleout import run_on_ray

            run_on_ray(items, sink.uri, config, summary, on_image=lambda name: bar.update(1), **ray)
        else:
            from compinv_rt.generate.jobs import JobRunner

            JobRunner(sink, config).run(items, summary, on_image=lambda name: bar.update(1))
    finally:
        bar.close()
        write_failures(sink, summary)


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
def export(
    format: ExportTarget = typer.Option(
        ..., "--format", help="Artifact to build; triton = a Triton model repository around the "
        "TensorRT plan (on CUDA with TensorRT) or else the ONNX engine."),
    model: Optional[str] = typer.Option(None, help="Local diffusers SD 1.x/2.x folder (default: embedded)."),
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
):
    """Build the UNet engine (with its attention_bias input) into OUT/<format>-<key>/."""
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
    if fmt is not EngineFormat.aoti:
        check_opset(exporter, opset)
    files = inspect_model_dir(resolve_model_dir(model))
    from compinv_rt.models.loading import pick_device

    spec = UNetIOSpec.for_model(files, height or files.default_size, width or files.default_size,
                                precision.resolve(pick_device(device)))
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
def train(
    images: Path = typer.Option(..., help="Folder of the concept's photos (png/jpg/webp/bmp)."),
    token: str = typer.Option(..., help="New placeholder token, e.g. '<my-heart>'."),
    class_word: str = typer.Option(..., help="The concept's class, e.g. heart: prompts read '<tok> heart'."),
    out: Path = typer.Option(..., help="Output folder: embeddings, artifact.json, checkpoints, loss curve."),
    model: Optional[str] = typer.Option(None, help="Local diffusers SD 1.x/2.x folder (default: embedded)."),
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
    lr: float = typer.Option(5e-3, help="Base learning rate (scaled by batch x grad-accum unless --no-scale-lr)."),
    scale_lr: bool = typer.Option(True, "--scale-lr/--no-scale-lr", help="Scale --lr by batch x grad-accum."),
    resolution: Optional[int] = typer.Option(None, help="Training resolution (default: the model's native size)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="hflip + scale augmentation with a loss mask."),
    variants: int = typer.Option(8, help="Augmented variants per image (VAE-encoded once)."),
    templates: Optional[Path] = typer.Option(None, help="Prompt templates file: one per line, {} = the concept."),
    captions: str = typer.Option(
        "auto", help="What each photo shows besides the concept, named in its training prompts "
        "('<tok> heart on the sand'): auto (IMAGES/captions.json or <photo>.txt if present), "
        "none, or a JSON file {\"photo.png\": \"on the sand\"}."),
    masks: Optional[Path] = typer.Option(
        None, help="Folder of subject masks (<photo stem>.png, white = the concept): the loss "
        "counts the subject, with a soft border; or 'auto': from the base model's "
        "cross-attention to the class word."),
    context_token: bool = typer.Option(
        False, "--context-token/--no-context-token",
        help="Append an auxiliary token to every training prompt, trained jointly and never "
        "saved, to take up what the photos share besides the concept (photos without captions)."),
    norm: str = typer.Option(
        "auto", help="Fix each vector's norm: none, vocab (the vocabulary's median word norm), "
        "vocab:K (K times it) or a number; only the direction is learned. auto: vocab:2 for plain "
        "TI (--anchor-weight 0), none for semantic inversion."),
    context_weight: float = typer.Option(
        0.0, help="Context regularizer: keep the text encoder's outputs for the other words of "
        "composition prompts as with the class word in place of the token (0 = off)."),
    seed: int = typer.Option(0, help="Seed (a resumed run repeats the uninterrupted one)."),
    checkpoint_every: int = typer.Option(100, help="Checkpoint interval in steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    format: str = typer.Option(
        "diffusers", "--format", help="Portable embedding copies besides the folder's own "
        "embeddings.safetensors: diffusers (learned_embeds.safetensors), a1111 (<name>.pt + "
        "<name>.safetensors, AUTOMATIC1111's layout) or both."),
):
    """Learn a new token from a few photos: textual inversion + semantic inversion (anchor loss)."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.schemas import SEED_MAX, check_device, check_option

    for opt, v in (("--anchor-weight", anchor_weight), ("--recon-weight", recon_weight),
                   ("--anchor-l1", anchor_l1), ("--lr", lr)):
        check_option(opt, v)
    check_option("--steps", steps, limit="max_train_steps")
    check_option("--batch", batch, limit="max_batch")
    check_option("--vectors", vectors, limit="max_vectors")
    check_option("--resolution", resolution or 1, limit="max_size")
    check_option("--seed", seed, ge=0, le=SEED_MAX)
    try:
        check_device(device)
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}, got {device!r}") from None
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import check_out_dir, prepare, train_concept

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
    from compinv_rt.train.portable import EmbeddingFormat, write_portable

    if format not in {f.value for f in EmbeddingFormat}:
        raise ConfigError(f"--format must be diffusers, a1111 or both, got {format!r}")
    # Everything cheap is checked before weights load or anything is written.
    plan = prepare(cfg, images, model)
    check_out_dir(out, resume)

    bar = progress(steps, "training")

    def on_step(info):
        if bar.n == 0 and info.step > 1:
            bar.update(info.step - 1)
        bar.set_postfix(rec=f"{info.rec:.4f}", anchor=f"{info.anchor:.2e}",
                        dist=f"{info.anchor_distance:.3f}", refresh=False)
        bar.update(1)

    try:
        result = train_concept(plan, out, resume=resume, device=device, on_step=on_step,
                               on_status=lambda msg: typer.echo(msg, err=True))
    finally:
        bar.close()
    portable = write_portable(out, format)
    rec = result.record
    carrying = ", ".join(f"{a['word']} ({a['coefficient']:.3f})" for a in rec["anchors"]
                         if a["carries_weight"]) or "none"
    loss = rec["loss"]
    typer.echo(f"trained {rec['token']} ({rec['vectors']} vector(s), {rec['method']}) "
               f"in {rec['steps_done']} steps: {out}/")
    typer.echo(f"anchors carrying weight: {carrying}; distance to anchor target "
               f"{rec['anchor_target_distance']:.4f}")
    typer.echo(f"reconstruction loss {loss['first_10pct_mean'][0]:.4f} -> "
               f"{loss['last_10pct_mean'][0]:.4f} (first/last 10% of steps)")
    typer.echo(f"embedding copies ({format}): {', '.join(p.name for p in portable)}")


@app.command()
def doctor():
    """Show what is installed and usable: torch and its devices, ONNX Runtime, TensorRT, models."""
    from compinv_rt.apps.doctor import run_checks

    checks = run_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        typer.echo(f"{'ok ' if c.ok else '-- '} {c.name:<{width}}  {c.detail}")


@app.command()
@user_errors
def bench(
    model: Optional[str] = typer.Option(None, help="Local diffusers SD folder (default: embedded)."),
    arch: Optional[str] = typer.Option(
        None, help="sd15 or sd21: an architecture-true model with RANDOM weights (latency only); "
        "sd15-proxy: SD 1.5's topology, narrow (a CPU smoke test)."),
    backends: str = typer.Option("torch,onnxruntime", help="Comma-separated backends to compare."),
    batch_sizes: str = typer.Option("1,4,8", help="Images per batch."),
    quality: Quality = typer.Option(
        Quality.reference, help="Our backends' sampler preset (see generate); stock diffusers always runs "
        "the reference (25 DDIM steps, or --steps)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps per generation (default: the preset's)."),
    bias: str = typer.Option("off,on", help="Attention bias settings to measure: off, on or both."),
    repeats: int = typer.Option(2, help="Timed runs per cell (after one warm-up)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    engines: Path = typer.Option(Path("engines"), help="Engine cache folder."),
    out: Path = typer.Option(Path("benchmarks/results/latest"), help="Where results go."),
    baseline: str = typer.Option("eager", help="Stock diffusers baseline: eager, or compiled "
                                 "(channels_last + torch.compile reduce-overhead)."),
    precisions: str = typer.Option(
        "auto", help="Comma-separated: auto, fp32, fp16, bf16. Stock diffusers and every backend "
        "run at each; speedups are vs stock at the first (and vs stock at the same precision)."),
):
    """Latency/throughput/memory of each backend vs stock diffusers, as JSON + table + plot."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import check_writable_dir

    names = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in Backend.__members__]
    if unknown or not names:
        raise ConfigError(f"unknown backend(s) {unknown}: choose from {', '.join(Backend.__members__)}")
    flags = {"off": False, "on": True}
    if not set(bias.split(",")) <= set(flags):
        raise ConfigError(f"--bias takes off, on or off,on; got {bias!r}")
    from compinv_rt.sampling.quality import PRESETS, sampler_settings

    sampler = sampler_settings(quality, steps, None, None)
    if sampler.steps < 1 or repeats < 1:
        raise ConfigError("--steps and --repeats must be >= 1")
    if model and arch:
        raise ConfigError("pass --model or --arch, not both")
    if baseline not in ("eager", "compiled"):
        raise ConfigError(f"--baseline must be eager or compiled, got {baseline!r}")
    precision_list = tuple(Precision.parse(p.strip(), "--precisions")
                           for p in precisions.split(",") if p.strip())
    if not precision_list:
        raise ConfigError("--precisions needs at least one of auto, fp32, fp16, bf16")
    check_writable_dir(out)

    from compinv_rt.apps.bench.harness import BenchConfig, run_bench
    from compinv_rt.apps.bench.report import write_report

    label = ""
    if arch:
        import tempfile

        from compinv_rt.models.architectures import SD_ARCHS, save_model, sd_components

        if arch not in SD_ARCHS:
            raise ConfigError(f"--arch must be one of {', '.join(SD_ARCHS)}")
        typer.echo(f"building a random-weight {arch} model (latency only: images are noise)", err=True)
        model = str(save_model(sd_components(arch), Path(tempfile.mkdtemp(prefix=f"{arch}-"))))
        label = f"{arch} architecture, random weights"
    cfg = BenchConfig(tuple(names), tuple(_int_list(batch_sizes, "--batch-sizes")), sampler.steps,
                      tuple(flags[b] for b in bias.split(",")), repeats, engines_root=engines,
                      baseline=baseline, precisions=precision_list, scheduler=sampler.scheduler.value,
                      guidance_interval=sampler.guidance_interval,
                      baseline_steps=steps if steps is not None else PRESETS[Quality.reference].steps)
    result = run_bench(model, cfg, device=device, label=label,
                       on_status=lambda msg: typer.echo(msg, err=True),
                       on_cell=lambda partial: write_report(partial, out))
    paths = write_report(result, out)
    typer.echo(paths["markdown"].read_text())
    typer.echo(f"results: {paths['json']}, {paths['markdown']}, {paths['plot']}")


@app.command("eval")
@user_errors
def eval_(
    out: Path = typer.Option(..., help="Results folder (eval.json, eval.md, eval.png, grids/, cells/)."),
    quick: bool = typer.Option(False, "--quick", help="2 concepts, fewer prompts/images (<= 10 min on CPU)."),
    model: Optional[str] = typer.Option(None, help="Local diffusers SD folder (default: embedded)."),
    concepts: Optional[Path] = typer.Option(None, help="JSON/JSONL concepts file (see README)."),
    prompts: Optional[Path] = typer.Option(None, help="JSON/JSONL prompts file (see README)."),
    clip: Optional[Path] = typer.Option(None, help="open_clip checkpoint folder: CLIP text/image alignment."),
    detector: Optional[Path] = typer.Option(None, help="transformers DETR folder: detector CoI."),
    seed: Optional[int] = typer.Option(None, help="Seed of image 0 (default 8888); image i: seed + i."),
    samples: Optional[int] = typer.Option(None, help="Images per prompt and method (default 32, quick 8)."),
    quality: Quality = typer.Option(
        Quality.reference, help="Sampler preset (see generate; the protocol's numbers are at reference)."),
    steps: Optional[int] = typer.Option(None, help="Sampler steps (default: the preset's, 25 at reference)."),
    train_steps: Optional[int] = typer.Option(None, help="Training steps per concept (default 500, quick 250)."),
    cache: Optional[Path] = typer.Option(None, help="Trained-concept cache (default: OUT/cache)."),
    si_anchor_weight: Optional[float] = typer.Option(
        None, help="Semantic inversion's anchor weight (default 0.95, the reference)."),
    si_anchors: Optional[str] = typer.Option(
        None, help="Semantic inversion's anchors: class (default), attributes (class + colour + "
        "pattern words, a sparse combination), or a train --anchors spec."),
    context_weight: Optional[float] = typer.Option(
        None, help="The context regularizer's weight in its recipes (cap_ctxreg; default 0.05)."),
    norm: Optional[str] = typer.Option(
        None, help="The norm constraint in its recipes (cap_norm): vocab:2 (default, train's), "
        "vocab, vocab:K or a number."),
    random: int = typer.Option(0, help="Add N concepts drawn from the world's whole colour x "
                               "pattern x shape space (no filtering)."),
    random_seed: int = typer.Option(0, help="Seed of the --random draw."),
    train_seeds: Optional[int] = typer.Option(
        None, help="Trainings per concept and recipe (seeds 0..K-1; mean and range; default 1)."),
    methods: Optional[str] = typer.Option(
        None, help="Comma-separated methods: words, RECIPE, RECIPE+bias|adaptive|guidance (recipes: "
        "ti, si, cap, mask, automask, cap_mask, ctxtok, cap_si, cap_norm, cap_ctxreg, cap_sparse, cap_vec2) "
        "or ti_bias, ti_guidance, full. Default: words,ti,si,ti_bias,ti_guidance,full."),
    objects: Optional[int] = typer.Option(
        None, help="Pretrained objects composed with each concept (default 5, quick 2)."),
):
    """The paper's evaluation and ablation: 5 methods x prompts, judged; table + plot + grids."""
    from compinv_rt.apps.eval.command import run_command

    run_command(out, quick, model, concepts, prompts, clip, detector, seed, samples, steps,
                train_steps, cache, si_anchor_weight, si_anchors, random, random_seed, train_seeds,
                methods, objects, context_weight, norm, quality=quality)


# --- `compinv-rt layout ...`: the layout model --------------------------------------------

layout_app = typer_app(
    "layout", "The layout model behind `generate --layout auto`: build data, fit, evaluate.")


@layout_app.command("world-data")
@user_errors
def layout_world_data(
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
def layout_fit(
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
    model: Optional[str] = typer.Option(None, help="Base model folder (default: embedded)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
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
def layout_eval(
    layout_model_dir: Path = typer.Option(..., "--layout-model", help="Folder from `layout fit`."),
    data: Path = typer.Option(..., help="Ground-truth layouts (JSONL) to compare with."),
    model: Optional[str] = typer.Option(None, help="Base model folder (default: embedded)."),
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
