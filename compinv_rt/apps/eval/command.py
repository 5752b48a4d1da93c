"""`compinv-rt eval`: the Typer command (registered in compinv_rt.apps.cli) and its body: validate
cheaply, run with a progress bar, print the table. Standard library, typer and the CLI's option
types only at import time, so `compinv-rt --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from compinv_rt.apps.cli_support import user_errors
from compinv_rt.apps.options import CacheIntervalOption, GuidanceIntervalOption, ModelOption
from compinv_rt.sampling.quality import Quality
from compinv_rt.sampling.schedulers import SchedulerName


@dataclass(frozen=True)
class EvalOptions:
    """`compinv-rt eval`'s options as given (None: the protocol's default, `EvalConfig.preset`);
    their defaults and help live on `eval_command` only."""

    out: Path
    quick: bool
    model: str | None
    concepts: Path | None
    prompts: Path | None
    clip: Path | None
    detector: Path | None
    seed: int | None
    samples: int | None
    quality: Quality | None  # None: reference
    steps: int | None
    scheduler: SchedulerName | None  # None: the preset's, as are the two intervals
    guidance_interval: str | None
    cache_interval: int | None
    train_steps: int | None
    cache: Path | None
    si_anchor_weight: float | None
    si_anchors: str | None
    context_weight: float | None
    norm: str | None
    random: int
    random_seed: int
    train_seeds: int | None
    methods: str | None
    objects: int | None


@user_errors
def eval_command(  # noqa: PLR0913
    out: Path = typer.Option(..., help="Results folder (eval.json, eval.md, eval.png, grids/, cells/)."),
    quick: bool = typer.Option(False, "--quick", help="2 concepts, fewer prompts/images (<= 10 min on CPU)."),
    model: ModelOption = None,
    concepts: Optional[Path] = typer.Option(None, help="JSON/JSONL concepts file (see README)."),
    prompts: Optional[Path] = typer.Option(None, help="JSON/JSONL prompts file (see README)."),
    clip: Optional[Path] = typer.Option(None, help="open_clip checkpoint folder: CLIP text/image alignment."),
    detector: Optional[Path] = typer.Option(None, help="transformers DETR folder: detector CoI."),
    seed: Optional[int] = typer.Option(None, help="Seed of image 0 (default 8888); image i: seed + i."),
    samples: Optional[int] = typer.Option(None, help="Images per prompt and method (default 32, quick 8)."),
    quality: Quality = typer.Option(
        Quality.reference, help="Sampler preset (see generate; the protocol's numbers are at reference)."),
    steps: Optional[int] = typer.Option(None, help="Sampler steps (default: the preset's, 25 at reference)."),
    scheduler: Optional[SchedulerName] = typer.Option(None, help="Sampler (default: the preset's)."),
    guidance_interval: GuidanceIntervalOption = None,
    cache_interval: CacheIntervalOption = None,
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
    run_command(EvalOptions(
        out=out, quick=quick, model=model, concepts=concepts, prompts=prompts, clip=clip,
        detector=detector, seed=seed, samples=samples, quality=quality, steps=steps,
        scheduler=scheduler, guidance_interval=guidance_interval, cache_interval=cache_interval,
        train_steps=train_steps, cache=cache, si_anchor_weight=si_anchor_weight,
        si_anchors=si_anchors, context_weight=context_weight, norm=norm, random=random,
        random_seed=random_seed, train_seeds=train_seeds, methods=methods, objects=objects))


def run_command(opts: EvalOptions) -> None:
    """Check every option and file (no weights loaded), run the evaluation, print its table."""
    from compinv_rt.apps.cli_support import progress
    from compinv_rt.apps.eval.runner import RunOptions, run_eval

    protocol, cfg, model_root = _checked(opts)
    bar = None

    def on_progress(done, total, what):
        nonlocal bar
        if bar is None:
            bar = progress(total, "eval", unit="unit")
        bar.set_postfix_str(what[:70], refresh=False)
        bar.update(round(done - bar.n, 2))  # fractional within a cell; redraws at tqdm's pace

    try:
        results = run_eval(protocol, cfg, opts.out,
                           RunOptions(model=model_root, cache=opts.cache, clip=opts.clip,
                                      detector=opts.detector),
                           on_status=lambda m: typer.echo(m, err=True), on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    typer.echo(Path(results["report"]["markdown"]).read_text())
    typer.echo(f"results: {results['report']['json']}, {results['report']['markdown']}, "
               f"{results['report']['plot']}, {results['report']['grids']}/")


def _checked(opts: EvalOptions):
    """Everything cheap first: options, files, model folder, output folder -> (protocol, config,
    the model folder)."""
    from compinv_rt.apps.eval.protocol import EvalConfig, build_protocol, parse_methods
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import check_writable_dir
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir
    from compinv_rt.sampling.quality import parse_interval, sampler_settings

    sampler = sampler_settings(opts.quality or Quality.reference, opts.steps, opts.scheduler,
                               parse_interval(opts.guidance_interval), opts.cache_interval)
    cfg = EvalConfig.preset(opts.quick, seed=opts.seed, samples=opts.samples, steps=sampler.steps,
                            scheduler=sampler.scheduler.value, guidance_interval=sampler.guidance_interval,
                            cache_interval=sampler.cache_interval, train_steps=opts.train_steps,
                            si_anchor_weight=opts.si_anchor_weight,
                            si_anchors=opts.si_anchors, train_seeds=opts.train_seeds,
                            context_weight=opts.context_weight, norm=opts.norm)
    files = inspect_model_dir(resolve_model_dir(opts.model))
    from compinv_rt.apps.world.model import DOMAIN

    world = files.metadata.get("domain") == DOMAIN  # the judge and world templates apply
    if opts.objects is not None and opts.objects < 0:
        raise ConfigError(f"--objects must be >= 0, got {opts.objects}")
    protocol = build_protocol(opts.quick, opts.concepts, opts.prompts, world=world, random=opts.random,
                              random_seed=opts.random_seed, objects=opts.objects,
                              methods=parse_methods(opts.methods))
    for name, path in (("--clip", opts.clip), ("--detector", opts.detector)):
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"{name} {path} is not a folder")
    out = opts.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file")
    check_writable_dir(out)
    if opts.cache is not None:
        check_writable_dir(opts.cache)
    return protocol, cfg, str(files.root)
