"""`compinv-rt bench`: the Typer command (registered in compinv_rt.apps.cli) and its body. Standard
library, typer and the CLI's option types only at import time, so `compinv-rt --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from compinv_rt.apps.cli_support import user_errors
from compinv_rt.apps.options import DeviceOption, ModelOption
from compinv_rt.core.types import Precision
from compinv_rt.sampling.quality import Quality


@dataclass(frozen=True)
class BenchOptions:
    """`compinv-rt bench`'s options as given (lists still comma-separated text); their defaults
    and help live on `bench_command` only."""

    model: str | None
    arch: str | None
    backends: str
    batch_sizes: str
    quality: str  # one --quality preset, or several comma-separated
    steps: int | None
    bias: str
    repeats: int
    device: str
    engines: Path
    out: Path
    baseline: str
    precisions: str


@user_errors
def bench_command(  # noqa: PLR0913
    model: ModelOption = None,
    arch: Optional[str] = typer.Option(
        None, help="sd15 or sd21: an architecture-true model with RANDOM weights (latency only); "
        "sd15-proxy: SD 1.5's topology, narrow (a CPU smoke test)."),
    backends: str = typer.Option("torch,onnxruntime", help="Comma-separated backends to compare."),
    batch_sizes: str = typer.Option("1,4,8", help="Images per batch."),
    quality: str = typer.Option(
        Quality.reference.value, help="Our backends' sampler preset (see generate), or several "
        "comma-separated (reference,default,fast: every backend runs each, and the table gives each "
        "preset's images/s over the reference's); stock diffusers always runs the reference once "
        "(25 DDIM steps, or --steps)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps per generation (default: the preset's)."),
    bias: str = typer.Option("off,on", help="Attention bias settings to measure: off, on or both."),
    repeats: int = typer.Option(2, help="Timed runs per cell (after one warm-up)."),
    device: DeviceOption = "auto",
    engines: Path = typer.Option(Path("engines"), help="Engine cache folder."),
    out: Path = typer.Option(Path("benchmarks/results/latest"), help="Where results go."),
    baseline: str = typer.Option("eager", help="Stock diffusers baseline: eager, or compiled "
                                 "(channels_last + torch.compile reduce-overhead)."),
    precisions: str = typer.Option(
        "auto", help="Comma-separated: auto, fp32, fp16, bf16. Stock diffusers and every backend "
        "run at each; speedups are vs stock at the first (and vs stock at the same precision)."),
):
    """Latency/throughput/memory of each backend vs stock diffusers, as JSON + table + plot."""
    run_command(BenchOptions(model=model, arch=arch, backends=backends, batch_sizes=batch_sizes,
                             quality=quality, steps=steps, bias=bias, repeats=repeats, device=device,
                             engines=engines, out=out, baseline=baseline, precisions=precisions))


def run_command(opts: BenchOptions) -> None:
    """Check the options (no weights loaded), measure, write and print the report."""
    from compinv_rt.apps.bench.harness import run_bench
    from compinv_rt.apps.bench.report import write_report

    checked = _checked(opts)
    model, label = opts.model, ""
    if opts.arch:
        model, label = _random_model(opts.arch)
    result = run_bench(model, checked.config(opts), device=opts.device, label=label,
                       on_status=lambda msg: typer.echo(msg, err=True),
                       on_cell=lambda partial: write_report(partial, opts.out))
    paths = write_report(result, opts.out)
    typer.echo(paths["markdown"].read_text())
    typer.echo(f"results: {paths['json']}, {paths['markdown']}, {paths['plot']}")


@dataclass(frozen=True)
class _Checked:
    """The options parsed and checked; `config` makes the harness's BenchConfig of them."""

    backends: tuple[str, ...]
    bias: tuple[bool, ...]
    samplers: tuple  # harness.Sampler per --quality preset, with --steps in its place
    precisions: tuple[Precision, ...]

    def config(self, opts: BenchOptions):
        from compinv_rt.apps.bench.harness import BenchConfig
        from compinv_rt.core.schemas import check_int_list
        from compinv_rt.sampling.quality import PRESETS

        first = self.samplers[0]
        return BenchConfig(self.backends, tuple(check_int_list(opts.batch_sizes, "--batch-sizes")),
                           first.steps, self.bias, opts.repeats, engines_root=opts.engines,
                           baseline=opts.baseline, precisions=self.precisions,
                           scheduler=first.scheduler, guidance_interval=first.guidance_interval,
                           baseline_steps=(opts.steps if opts.steps is not None
                                           else PRESETS[Quality.reference].steps),
                           samplers=self.samplers)


def _checked(opts: BenchOptions) -> _Checked:
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.outputs import check_writable_dir
    from compinv_rt.engines.registry import Backend

    names = [b.strip() for b in opts.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in Backend.__members__]
    if unknown or not names:
        raise ConfigError(f"unknown backend(s) {unknown}: choose from {', '.join(Backend.__members__)}")
    flags = {"off": False, "on": True}
    if not set(opts.bias.split(",")) <= set(flags):
        raise ConfigError(f"--bias takes off, on or off,on; got {opts.bias!r}")
    samplers = _samplers(opts.quality, opts.steps)
    if min(s.steps for s in samplers) < 1 or opts.repeats < 1:
        raise ConfigError("--steps and --repeats must be >= 1")
    if opts.model and opts.arch:
        raise ConfigError("pass --model or --arch, not both")
    if opts.baseline not in ("eager", "compiled"):
        raise ConfigError(f"--baseline must be eager or compiled, got {opts.baseline!r}")
    precision_list = tuple(Precision.parse(p.strip(), "--precisions")
                           for p in opts.precisions.split(",") if p.strip())
    if not precision_list:
        raise ConfigError("--precisions needs at least one of auto, fp32, fp16, bf16")
    check_writable_dir(opts.out)
    return _Checked(tuple(names), tuple(flags[b] for b in opts.bias.split(",")), samplers,
                    precision_list)


def _samplers(quality: str, steps: int | None) -> tuple:
    """--quality (one preset or several, comma-separated; each once, in the order given) -> the
    harness's Samplers, with --steps in each one's place."""
    from compinv_rt.apps.bench.harness import Sampler
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.sampling.quality import sampler_settings

    names = list(dict.fromkeys(q.strip() for q in quality.split(",") if q.strip()))
    unknown = [q for q in names if q not in Quality.__members__]
    if unknown or not names:
        raise ConfigError(f"--quality takes one or more of {', '.join(Quality.__members__)} "
                          f"(comma-separated); got {quality!r}")
    presets = [(q, sampler_settings(q, steps, None, None)) for q in names]
    return tuple(Sampler(q, p.steps, p.scheduler.value, p.guidance_interval) for q, p in presets)


def _random_model(arch: str) -> tuple[str, str]:
    """--arch: a random-weight model of that architecture in a temp folder -> (folder, label)."""
    import tempfile

    from compinv_rt.core.errors import ConfigError
    from compinv_rt.models.architectures import SD_ARCHS, save_model, sd_components

    if arch not in SD_ARCHS:
        raise ConfigError(f"--arch must be one of {', '.join(SD_ARCHS)}")
    typer.echo(f"building a random-weight {arch} model (latency only: images are noise)", err=True)
    model = str(save_model(sd_components(arch), Path(tempfile.mkdtemp(prefix=f"{arch}-"))))
    return model, f"{arch} architecture, random weights"
