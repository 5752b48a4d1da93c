"""`compinv-rt generate`: one PROMPT into a folder, or a JSONL file of jobs (`--jobs`, local or on Ray).

The command checks every option before anything heavy is imported, turns them into the typed
values the library takes (`SessionOptions`, `RequestSpec`, `JobsConfig`) and calls it. Only typer
and the standard library at module level: `compinv-rt --help` stays fast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from compinv_rt.apps.cli_support import progress, user_errors
from compinv_rt.apps.options import (
    BackendOption,
    CacheIntervalOption,
    DeviceOption,
    EngineOption,
    GuidanceIntervalOption,
    ModelOption,
    PrecisionOption,
)
from compinv_rt.engines.registry import Backend
from compinv_rt.sampling.quality import Quality
from compinv_rt.sampling.schedulers import SchedulerName
from compinv_rt.spatial.layouts import SpatialMode

# generate's options that need more than a line, declared as types (the signature stays a table).
QualityOption = Annotated[Optional[Quality], typer.Option(
    help="Sampler preset from the judged quality-vs-cost curve (benchmarks/speed.md): default "
    "(when no sampler option is given), fast, or reference (25 DDIM steps, guidance on every step: "
    "the base for --steps/--scheduler/--guidance-interval given without --quality).")]

OutOption = Annotated[Optional[str], typer.Option(
    help="Output folder (default: outputs/<timestamp>); with --jobs also any pyarrow "
    "filesystem URI (s3://, gs://, file://).")]

LayoutOption = Annotated[Optional[str], typer.Option(
    help="auto | none | 'phrase=x0,y0,x1,y1;phrase=...' (normalized boxes; a phrase named "
    "twice gets two boxes; 'phrase;phrase' = boxes from the layout model). Default: auto when "
    "--spatial is set.")]

SpatialOption = Annotated[Optional[SpatialMode], typer.Option(
    help="Layout regularization: bias (attention-logit bias, every backend), adaptive "
    "(the bias in units of each layer's logit spread, every backend) or guidance (backward "
    "latent guidance, --backend torch only). Default: bias when --layout is given.")]

BiasStrengthOption = Annotated[Optional[float], typer.Option(
    help="Bias s: +s inside a concept's region, -s outside; in logits for bias (default "
    "2), in units of each layer's logit spread for adaptive (default 3).")]

BiasDecayOption = Annotated[Optional[float], typer.Option(
    help="--spatial adaptive: the bias weight falls as (t / t_first) ** decay with the "
    "noise level (default 4; 0 = constant over the biased steps).")]

BiasStepsOption = Annotated[Optional[str], typer.Option(
    help="Steps that get the bias or guidance: a fraction (0.2; 1.0 = all) or a "
    "count (10). Default 0.2 (adaptive: 0.4).")]

LayoutModelOption = Annotated[Optional[Path], typer.Option(
    help="Layout model folder from `compinv-rt layout fit` for --layout auto "
    "(default: <model>/layout/ if present, else fixed boxes).")]

SaveAttentionOption = Annotated[bool, typer.Option(
    "--save-attention",
    help="Also write per-token cross-attention heatmaps (PNG grid, "
    "averaged over steps and layers) and attention shares in the sidecars (--backend torch).")]

ConceptOption = Annotated[Optional[list[Path]], typer.Option(
    "--concept",
    help="Trained concept folder from `compinv-rt train` (repeatable); "
    "use its token in the prompt.")]

JobsOption = Annotated[Optional[Path], typer.Option(
    "--jobs",
    help="JSONL file, one job per line (prompt, seed, n, steps, guidance, "
    "negative_prompt, height, width, concepts, layout, id): batch generation instead of PROMPT.")]

MaxBatchOption = Annotated[int, typer.Option(
    help="Images per UNet batch (x2 with guidance): memory does not grow with -n.")]

GpusPerWorkerOption = Annotated[Optional[float], typer.Option(
    help="--ray: GPUs per actor (default: 1 with a CUDA device, 0 on CPU).")]


@user_errors
def generate_command(  # noqa: PLR0913 (a Typer command: one parameter per option)
    prompt: Optional[str] = typer.Argument(None, help="What to draw (omit with --jobs)."),
    num_images: Optional[int] = typer.Option(
        None, "-n", "--num-images", help="Images to generate (default 4; with --jobs each line's 'n')."),
    quality: QualityOption = None,
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the --quality preset's)."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale (<= 1 disables it)."),
    guidance_interval: GuidanceIntervalOption = None,
    cache_interval: CacheIntervalOption = None,
    seed: int = typer.Option(0, help="Seed of the first image; image i uses seed + i."),
    negative_prompt: str = typer.Option("", help="What to steer away from."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the model's native size)."),
    scheduler: Optional[SchedulerName] = typer.Option(None, help="Sampler (default: the --quality preset's)."),
    model: ModelOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    backend: BackendOption = Backend.torch,
    engine: EngineOption = None,
    out: OutOption = None,
    layout: LayoutOption = None,
    spatial: SpatialOption = None,
    bias_strength: BiasStrengthOption = None,
    bias_decay: BiasDecayOption = None,
    bias_steps: BiasStepsOption = None,
    layout_model: LayoutModelOption = None,
    save_attention: SaveAttentionOption = False,
    concept: ConceptOption = None,
    jobs: JobsOption = None,
    max_batch: MaxBatchOption = 8,
    resume: bool = typer.Option(False, "--resume", help="--jobs: finish an interrupted run in --out."),
    ray: bool = typer.Option(False, "--ray", help="--jobs: run on Ray (one actor per worker)."),
    ray_address: Optional[str] = typer.Option(None, help="--ray: cluster address (default: start a local Ray)."),
    workers: int = typer.Option(2, help="--ray: number of actors."),
    gpus_per_worker: GpusPerWorkerOption = None,
):
    """Generate images: one PNG and one JSON sidecar per image, plus a grid."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.schemas import check_generate
    from compinv_rt.core.types import Precision
    from compinv_rt.generate.options import SessionOptions
    from compinv_rt.sampling.quality import parse_interval, sampler_settings
    from compinv_rt.spatial.plan import SpatialOptions

    _check_prompt_or_jobs(prompt, jobs, resume, {"n": num_images, "height": height, "width": width,
                                                 "negative_prompt": negative_prompt or None})
    num_images = 4 if num_images is None else num_images
    sampler = sampler_settings(quality, steps, scheduler, parse_interval(guidance_interval), cache_interval)
    # Every option typed and bounded before anything heavy is imported (an error in < 1 s).
    check_generate(prompt=prompt, num_images=1 if jobs else num_images, steps=sampler.steps,
                   guidance=guidance, seed=seed, negative_prompt=negative_prompt, height=height,
                   width=width, device=device, precision=precision, max_batch=max_batch,
                   workers=workers,
                   gpus_per_worker=gpus_per_worker, bias_strength=bias_strength, out=out,
                   jobs=jobs is not None)
    options = SessionOptions(model, device, Precision.parse(precision), backend, engine,
                             max_batch=max_batch).check()
    spatial_options = SpatialOptions(None if spatial is None else spatial.value, layout, bias_strength,
                                     bias_steps, layout_model, save_attention, bias_decay)
    if jobs is not None:
        if spatial_options != SpatialOptions(None, None, bias_strength, bias_steps) or concept:
            raise ConfigError("--layout, --spatial, --bias-decay, --layout-model, --concept and --save-attention "
                              "apply to one PROMPT; with --jobs give each line its own 'layout' "
                              "and 'concepts'")
        from compinv_rt.generate.jobs import JobsConfig

        config = JobsConfig(options, sampler.scheduler.value, (),
                            2.0 if bias_strength is None else bias_strength,
                            "0.2" if bias_steps is None else bias_steps, sampler.guidance_interval,
                            sampler.cache_interval)
        ray_options = dict(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
        return generate_jobs(JobsRun(jobs, out, resume, ray_options if ray else None), config,
                             {"seed": seed, "steps": sampler.steps, "guidance": guidance})
    from compinv_rt.generate.requests import RequestSpec

    assert prompt is not None  # _check_prompt_or_jobs: a PROMPT run without one was refused
    generate_prompt(RequestSpec(prompt, seed, num_images, negative_prompt, sampler.steps, guidance,
                                sampler.scheduler.value, height, width, sampler.guidance_interval,
                                tuple(str(c) for c in concept or ()), spatial_options,
                                sampler.cache_interval), options, out)


PER_PROMPT_FLAGS = {"n": "-n/--num-images", "height": "--height", "width": "--width",
                    "negative_prompt": "--negative-prompt"}  # a jobs line has its own field for each


def _check_prompt_or_jobs(prompt: str | None, jobs, resume: bool, per_prompt: dict) -> None:
    """A PROMPT or --jobs FILE, and only the options of the one given (else they would be ignored
    without a word). `per_prompt`: jobs-line field -> the value of its flag (None: not given)."""
    from compinv_rt.core.errors import ConfigError

    if jobs is None:
        if prompt is None:
            raise ConfigError("give a PROMPT to draw (or --jobs FILE)")
        if resume:
            raise ConfigError("--resume continues a --jobs run; a PROMPT run has nothing to resume")
    elif prompt is not None:
        raise ConfigError("pass either a PROMPT or --jobs FILE, not both")
    elif given := [field for field, value in per_prompt.items() if value is not None]:
        flags = ", ".join(PER_PROMPT_FLAGS[f] for f in given)
        fields = ", ".join(f"'{f}'" for f in given)
        raise ConfigError(f"{flags} {'applies' if len(given) == 1 else 'apply'} to one PROMPT; with --jobs "
                          f"give each line its own {fields}")


def generate_prompt(spec, options, out: str | None) -> None:
    """One PROMPT: checks that need the model folder (not its weights), then the run."""
    from dataclasses import replace

    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import FolderLock, check_writable_dir, remove_if_empty, remove_stale_temp_files
    from compinv_rt.core.schemas import check_concept_tokens
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir
    from compinv_rt.spatial.plan import SpatialConfig

    if not spec.prompt.strip():
        raise ConfigError("the prompt is empty")
    if spec.n < 1:
        raise ConfigError(f"-n/--num-images must be >= 1, got {spec.n}")
    # The layout text and spatial options first: no torch is imported yet (an error in < 1 s).
    SpatialConfig.from_options(spec.spatial, backend=options.backend.value, total_steps=spec.steps)
    files = inspect_model_dir(resolve_model_dir(options.model))
    from compinv_rt.generate.requests import build_request

    request = build_request(spec, backend=options.backend.value)
    request = replace(request, sampling=request.sampling.resolved(files))
    known: set[str] = set()
    if spec.concepts:
        from compinv_rt.models.concepts import check_concepts

        # complete, trained on this model, distinct tokens
        known = {a["token"].lower() for a in check_concepts([Path(c) for c in spec.concepts], files)}
    check_concept_tokens(spec.prompt, known)
    check_concept_tokens(spec.negative_prompt, known, "the negative prompt")
    import time

    folder = Path(out) if out is not None else Path("outputs") / time.strftime("%Y%m%d-%H%M%S")
    check_writable_dir(folder)
    if folder.is_dir():
        remove_stale_temp_files(folder)  # left by a killed run
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with FolderLock(folder):  # two runs into one folder: the second is refused, not interleaved
            _run_prompt(request, options, folder, files)
    finally:
        if created:
            remove_if_empty(folder)  # a run that failed before its first image leaves nothing


def _run_prompt(request, options, folder: Path, files) -> None:
    from dataclasses import replace

    from compinv_rt.generate.generation import generate_to_folder
    from compinv_rt.generate.session import GenerationSession

    max_batch = min(request.n, options.max_batch)
    session = GenerationSession.open(replace(options, model=str(files.root), max_batch=max_batch),
                                     on_status=lambda msg: typer.echo(msg, err=True))
    bar = progress(request.sampling.steps * -(-request.n // max_batch), "denoising")
    try:
        result = generate_to_folder(session, request, folder, on_step=lambda done, total: bar.update(1))
    finally:
        bar.close()
    typer.echo(f"wrote {len(result.images)} images + JSON sidecars to {folder}/")
    if result.attention:
        typer.echo(f"attention heatmaps: {result.attention[0]}" + (" ..." if len(result.attention) > 1 else ""))
    typer.echo(f"grid: {result.grid}")


@dataclass(frozen=True)
class JobsRun:
    """Where a --jobs run reads and writes, and how it runs."""

    jobs_file: Path
    out: str | None
    resume: bool = False
    ray: dict | None = None  # run_on_ray's options; None: in this process


def generate_jobs(run: JobsRun, config, defaults: dict) -> None:
    """`generate --jobs`: many jobs packed into UNet batches, streamed to disk, resumable.
    `defaults`: the seed, steps and guidance of lines that give none."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import FolderLock, remove_if_empty
    from compinv_rt.generate.jobs import JobsSummary, read_jobs
    from compinv_rt.generate.sinks import open_sink
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir

    if run.out is None:
        raise ConfigError("--jobs needs --out DIR (the folder --resume continues)")
    jobs, problems = read_jobs(run.jobs_file, defaults)
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    if not jobs:  # nothing to run: stop before the model loads or --out is created
        why = f"all {len(problems)} line(s) failed (above)" if problems else "it holds no job line"
        typer.echo(f"error: no job to run in {run.jobs_file}: {why}", err=True)
        raise typer.Exit(1)
    files = inspect_model_dir(resolve_model_dir(config.options.model))
    out = run.out
    local = "://" not in str(out)
    created = local and not Path(out).exists()
    sink = open_sink(out).prepare()
    # One run per folder at a time: a second run (two --resume) is refused, not run twice.
    lock = FolderLock(out) if local else contextlib.nullcontext()
    summary = JobsSummary(problems=list(problems))
    try:
        with lock:
            _run_jobs(jobs, run, files, summary, sink, config)
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


def _run_jobs(jobs, run: JobsRun, files, summary, sink, config) -> None:
    from dataclasses import replace

    from compinv_rt.generate.jobs import concept_folders, pending_items, write_failures

    config = replace(config, options=replace(config.options, model=str(files.root)),
                     concepts=concept_folders(jobs))
    items = pending_items(jobs, sink, files, run.resume, summary, config)
    bar = progress(len(items), "images", unit="img")
    try:
        if run.ray is not None:
            from compinv_rt.generate.scaleout import run_on_ray

            run_on_ray(items, sink.uri, config, summary, on_image=lambda name: bar.update(1), **run.ray)
        else:
            from compinv_rt.generate.jobs import JobRunner

            JobRunner(sink, config).run(items, summary, on_image=lambda name: bar.update(1))
    finally:
        bar.close()
        write_failures(sink, summary)
