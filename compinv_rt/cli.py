"""The `compinv-rt` command line. Parse, build a config, call the library, map errors to exit codes.

Only typer and the standard library are imported at module level so that `--help` stays fast;
torch, diffusers and friends are imported inside the commands that need them.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from compinv_rt.export.iospec import Precision
from compinv_rt.export.manifest import EngineFormat
from compinv_rt.export.onnx_export import OnnxExporter
from compinv_rt.runtime.registry import BackendName
from compinv_rt.runtime.schedulers import SchedulerName

app = typer.Typer(
    name="compinv-rt",
    help="Compositional inversion for Stable Diffusion: train concepts, export engines, generate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(fn):
    """Turn a CompinvError into one clear line on stderr and exit code 1. Bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from compinv_rt.errors import CompinvError

        try:
            return fn(*args, **kwargs)
        except CompinvError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _progress(total: int, desc: str, unit: str = "step"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None)  # disable=None: hidden when stderr is not a terminal


@app.command()
@user_errors
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    num_images: int = typer.Option(4, "-n", "--num-images", help="Images to generate."),
    steps: int = typer.Option(25, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale (<= 1 disables it)."),
    seed: int = typer.Option(0, help="Seed of the first image; image i uses seed + i."),
    negative_prompt: str = typer.Option("", help="What to steer away from."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the model's native size)."),
    scheduler: SchedulerName = typer.Option(SchedulerName.ddim, help="Sampler."),
    model: Optional[str] = typer.Option(None, help="Local diffusers SD 1.x/2.x folder (default: embedded)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    backend: BackendName = typer.Option(BackendName.torch, help="UNet backend."),
    engine: Optional[Path] = typer.Option(
        None, help="Engine folder from `compinv-rt export` (default: find or build one in engines/)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: outputs/<timestamp>)."),
):
    """Generate images: one PNG and one JSON sidecar per image, plus a grid."""
    from compinv_rt.errors import ConfigError
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir
    from compinv_rt.runtime.pipeline import SamplingConfig

    # Everything cheap is validated before any weights are loaded or files are written.
    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    if num_images < 1:
        raise ConfigError(f"-n/--num-images must be >= 1, got {num_images}")
    files = inspect_model_dir(resolve_model_dir(model))
    config = SamplingConfig(steps, guidance, scheduler, height, width).resolved(files)
    if out is None:
        import time

        out = Path("outputs") / time.strftime("%Y%m%d-%H%M%S")
    from compinv_rt.outputs import check_writable_dir

    check_writable_dir(out)

    from compinv_rt.generation import generate_to_folder

    bar = _progress(config.steps, "denoising")
    try:
        result = generate_to_folder(
            prompt, negative_prompt, seeds=[seed + i for i in range(num_images)], config=config,
            model=str(files.root), device=device, out=out, backend=backend, engine=engine,
            on_step=lambda done, total: bar.update(done - bar.n),
            on_status=lambda msg: typer.echo(msg, err=True),
        )
    finally:
        bar.close()
    typer.echo(f"wrote {len(result.images)} images + JSON sidecars to {out}/")
    typer.echo(f"grid: {result.grid}")


def _int_list(text: str, option: str) -> list[int]:
    from compinv_rt.errors import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} takes positive integers, got {text!r}")
    return values


@app.command()
@user_errors
def export(
    format: EngineFormat = typer.Option(..., "--format", help="Artifact to build."),
    model: Optional[str] = typer.Option(None, help="Local diffusers SD 1.x/2.x folder (default: embedded)."),
    precision: Precision = typer.Option(Precision.fp32, help="Weights and activations precision."),
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
    from compinv_rt.export.build import export_engine
    from compinv_rt.export.iospec import UNetIOSpec, batch_profiles
    from compinv_rt.export.onnx_export import check_opset
    from compinv_rt.models.loading import inspect_model_dir, load_model, resolve_model_dir
    from compinv_rt.outputs import check_writable_dir
    from compinv_rt.runtime.registry import ExportOptions

    profiles = batch_profiles(_int_list(batch_sizes, "--batch-sizes"), dynamic)
    if format is not EngineFormat.aoti:
        check_opset(exporter, opset)
    files = inspect_model_dir(resolve_model_dir(model))
    spec = UNetIOSpec.for_model(files, height or files.default_size, width or files.default_size,
                                precision)
    if format is EngineFormat.tensorrt:
        from compinv_rt.export.build import require_tensorrt

        require_tensorrt()
    check_writable_dir(out)
    loaded = load_model(str(files.root), device=device)
    options = ExportOptions(exporter.value, opset, optimization_level).for_format(format)
    engine_dir, reused = export_engine(format, loaded, spec, profiles, out, options, force=force,
                                       on_status=lambda msg: typer.echo(msg, err=True))
    typer.echo(f"{'reused' if reused else 'built'} {format.value} engine: {engine_dir}")


@app.command()
def doctor():
    """Show what is installed and usable: torch and its devices, ONNX Runtime, TensorRT, models."""
    from compinv_rt.doctor import run_checks

    checks = run_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        typer.echo(f"{'ok ' if c.ok else '-- '} {c.name:<{width}}  {c.detail}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
