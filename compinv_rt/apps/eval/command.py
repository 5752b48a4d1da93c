"""The `compinv-rt eval` command body: validate cheaply, run with a progress bar, print the table."""

from __future__ import annotations

from pathlib import Path

import typer


def run_command(out: Path, quick: bool, model, concepts, prompts, clip, detector, seed, samples,
                steps, train_steps, cache, si_anchor_weight=None, si_anchors=None, random=0,
                random_seed=0, train_seeds=None, methods=None, objects=None,
                context_weight=None, norm=None, quality=None) -> None:
    from compinv_rt.apps.cli_support import progress
    from compinv_rt.apps.eval.protocol import EvalConfig, build_protocol, parse_methods
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import check_writable_dir
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir
    from compinv_rt.sampling.quality import Quality, sampler_settings

    # everything cheap first: options, files, model folder, output folder
    sampler = sampler_settings(quality or Quality.reference, steps, None, None)
    cfg = EvalConfig.preset(quick, seed=seed, samples=samples, steps=sampler.steps,
                             scheduler=sampler.scheduler.value, guidance_interval=sampler.guidance_interval,
                             train_steps=train_steps, si_anchor_weight=si_anchor_weight,
                             si_anchors=si_anchors, train_seeds=train_seeds,
                             context_weight=context_weight, norm=norm)
    files = inspect_model_dir(resolve_model_dir(model))
    from compinv_rt.apps.world.model import DOMAIN

    world = files.metadata.get("domain") == DOMAIN  # the judge and world templates apply
    if objects is not None and objects < 0:
        raise ConfigError(f"--objects must be >= 0, got {objects}")
    protocol = build_protocol(quick, concepts, prompts, world=world, random=random,
                              random_seed=random_seed, objects=objects,
                              methods=parse_methods(methods))
    for name, path in (("--clip", clip), ("--detector", detector)):
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"{name} {path} is not a folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file")
    check_writable_dir(out)
    if cache is not None:
        check_writable_dir(cache)

    from compinv_rt.apps.eval.runner import run_eval

    bar = None

    def on_progress(done, total, what):
        nonlocal bar
        if bar is None:
            bar = progress(total, "eval", unit="unit")
        bar.set_postfix_str(what[:70], refresh=False)
        bar.update(round(done - bar.n, 2))  # fractional within a cell; redraws at tqdm's pace

    try:
        results = run_eval(protocol, cfg, out, model=str(files.root), cache=cache, clip=clip,
                           detector=detector, on_status=lambda m: typer.echo(m, err=True),
                           on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    typer.echo(Path(results["report"]["markdown"]).read_text())
    typer.echo(f"results: {results['report']['json']}, {results['report']['markdown']}, "
               f"{results['report']['plot']}, {results['report']['grids']}/")
