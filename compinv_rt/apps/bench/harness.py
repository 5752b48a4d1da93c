"""`compinv-rt bench`: UNet step latency, end-to-end throughput and peak memory across
backend x batch x bias, always against stock diffusers StableDiffusionPipeline in the same run.

Every cell runs one untimed warm-up generation first (compilation, engine loading, allocator
warm-up), then `repeats` timed generations with the same seeds. Step latency is the wall time
of each UNet call (CUDA-synchronized on GPU); end-to-end is prompt encoding + all steps + VAE
decode, which is what a user waits for.

Several sampler presets (`--quality reference,default,fast`) run on every backend in the same run
(stock diffusers once, at its reference DDIM). Every cell also gets its UNet FLOPs per image, the
UNet GFLOP/s it reached and that as a fraction of this machine's attainable matmul peak at the
model's own GEMM shapes (roofline.py; the peak is measured once per run, before any cell).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from compinv_rt.apps.bench.memory import PeakMemory
from compinv_rt.apps.bench.roofline import Roofline, fraction_of_peak

PROMPT = "a red star and a blue circle on grass"
STOCK = "diffusers"
REFERENCE = "reference"  # the --quality preset every other one's images/s is compared with


@dataclass(frozen=True)
class Sampler:
    """One sampler setting our backends run: a --quality preset by name (with --steps in its place)."""

    name: str
    steps: int
    scheduler: str = "ddim"
    guidance_interval: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class BenchConfig:
    backends: tuple[str, ...] = ("torch", "onnxruntime")
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    steps: int = 25
    bias: tuple[bool, ...] = (False, True)
    repeats: int = 2
    guidance: float = 7.5
    bias_strength: float = 2.0
    prompt: str = PROMPT
    engines_root: Path = Path("engines")
    # "eager": stock StableDiffusionPipeline as loaded; "compiled": the same with its UNet in
    # channels_last + torch.compile(mode="reduce-overhead"), the fastest stock PyTorch path on GPU.
    baseline: str = "eager"
    # Every backend and the stock baseline run at each precision; speedups are against stock at
    # the first one (the reference), and also against stock at the cell's own precision.
    precisions: tuple[str, ...] = ("auto",)
    # our backends' sampler (runtime.quality); the stock baseline runs its own DDIM for
    # `baseline_steps` (None: `steps`), so with a cheaper preset the end-to-end speed-up includes
    # the sampler's saving (the per-step latency does not)
    scheduler: str = "ddim"
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    baseline_steps: int | None = None
    # every sampler our backends run, in order (empty: the one given by steps, scheduler and
    # guidance_interval above, unnamed)
    samplers: tuple[Sampler, ...] = ()

    def sampler_list(self) -> tuple[Sampler, ...]:
        return self.samplers or (Sampler("", self.steps, self.scheduler, self.guidance_interval),)


@dataclass
class Cell:
    backend: str
    batch: int
    bias: bool
    steps: int
    step_ms_p50: float
    step_ms_p90: float
    e2e_s: float
    images_per_s: float
    peak_rss_mb: float
    peak_cuda_mb: float  # torch allocator peak, increase over the cell's start (CUDA only)
    step_speedup: float | None = None  # stock p50 / this p50
    e2e_speedup: float | None = None  # stock e2e / this e2e
    precision: str = "fp32"
    e2e_speedup_same_precision: float | None = None  # vs stock at this cell's precision
    # Device-wide (every allocator: torch, ONNX Runtime, TensorRT) peak increase over the cell's
    # start, and what was resident at its start (loaded models, engines). CUDA only.
    peak_device_mb: float = 0.0
    resident_device_mb: float = 0.0
    provider: str | None = None  # onnxruntime: the execution provider that actually ran
    quality: str = ""  # the --quality preset (stock diffusers: its reference DDIM)
    unet_s: float = 0.0  # UNet seconds per generation (the sum of its step times)
    # the roofline (roofline.py): UNet FLOPs per image for the sampler actually run (the UNet batch
    # of every call it made), the UNet GFLOP/s reached, and its fraction of the attainable peak
    gflops_per_image: float | None = None
    unet_gflops_per_s: float | None = None
    attainable_gflops_per_s: float | None = None
    fraction_of_peak: float | None = None
    # the same by CPU time (this thread's, UNet calls and peak alike; one thread on CPU only): what
    # the cell reached while it had a core, which a machine shared with other jobs leaves readable
    unet_cpu_s: float = 0.0
    fraction_of_peak_cpu: float | None = None
    images_per_s_vs_reference: float | None = None  # / the reference preset's, same backend and cell


@dataclass
class BenchResult:
    meta: dict
    cells: list[Cell] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "cells": [asdict(c) for c in self.cells]}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wraps a UNet callable and records the wall time of every call."""

    def __init__(self, fn, device):
        self.fn, self.device = fn, device
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # this thread's CPU time of every call
        self.batches: list[int] = []  # the UNet batch of every call
        self.name = getattr(fn, "name", "stock")

    def reset(self) -> None:
        self.times.clear()
        self.cpu_times.clear()
        self.batches.clear()

    def __call__(self, *args, **kwargs):
        sample = args[0] if args else kwargs["sample"]
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self.fn(*args, **kwargs)
        _sync(self.device)
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.thread_time() - c0)
        self.batches.append(int(sample.shape[0]))
        return out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def layout_options(prompt: str, strength: float, steps: int):
    """A realistic bias on every step: the prompt's first two objects get the left / right halves."""
    from compinv_rt.spatial.layouts import boxes_layout, concept_phrases
    from compinv_rt.spatial.plan import SpatialOptions

    phrases = concept_phrases(prompt)[:2]
    halves = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    return SpatialOptions("bias", boxes_layout(phrases, halves), strength, str(steps))


def _measure(run, device, repeats: int, timer: StepTimer, batch: int) -> tuple[dict, list[int]]:
    """(the Cell's timing and memory fields, the UNet batch of every call of one generation)."""
    e2e = []
    # The warm-up is inside the memory section: ONNX Runtime's arena, CUDA-graph pools and
    # compile workspaces are allocated there.
    with PeakMemory(device) as mem:
        run()  # warm-up: compilation, engine load, allocator
        timer.reset()
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            e2e.append(time.perf_counter() - t0)
    e2e_s = statistics.median(e2e)
    fields = dict(step_ms_p50=1000 * _percentile(timer.times, 0.5),
                  step_ms_p90=1000 * _percentile(timer.times, 0.9), e2e_s=e2e_s,
                  images_per_s=batch / e2e_s, peak_rss_mb=mem.rss_mb, peak_cuda_mb=mem.cuda_mb,
                  peak_device_mb=mem.device_mb, resident_device_mb=mem.resident_mb,
                  unet_s=sum(timer.times) / repeats, unet_cpu_s=sum(timer.cpu_times) / repeats)
    return fields, timer.batches[:len(timer.batches) // repeats]


def _stock_cells(run: _Run, model) -> dict[int, Cell]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    cfg = run.cfg
    pipe = StableDiffusionPipeline.from_pretrained(str(model.root), torch_dtype=model.dtype,
                                                   safety_checker=None, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(model.device)
    timer = StepTimer(pipe.unet.forward, model.device)
    pipe.unet.forward = timer  # instance attribute: times every UNet call of the stock loop
    if cfg.baseline == "compiled":
        # Like for like with our compile backend: the same compile_unet settings (mode, static
        # shapes but for a dynamic batch dimension), channels_last on CUDA.
        from compinv_rt.engines.compiled_backends import compile_unet, mark_batch_dynamic

        if model.device.type == "cuda":
            pipe.unet.to(memory_format=torch.channels_last)
        compiled = compile_unet(timer.fn, model.device)

        def stock_compiled(sample, timestep, encoder_hidden_states, *args, **kwargs):
            mark_batch_dynamic(sample, encoder_hidden_states)
            return compiled(sample, timestep, encoder_hidden_states, *args, **kwargs)

        timer.fn = stock_compiled
    cells = {}
    for batch in cfg.batch_sizes:
        run.on_status(f"{STOCK} {model.precision.value}: batch {batch}")

        def generate(pipe=pipe, batch=batch):
            pipe(cfg.prompt, num_images_per_prompt=batch, num_inference_steps=cfg.baseline_steps or cfg.steps,
                 guidance_scale=cfg.guidance,
                 generator=[torch.Generator().manual_seed(s) for s in range(batch)])

        fields, calls = _measure(generate, model.device, cfg.repeats, timer, batch)
        cells[batch] = Cell(STOCK, batch, False, cfg.baseline_steps or cfg.steps, **fields,
                            precision=model.precision.value, quality=REFERENCE)
        _add_roofline(run, cells[batch], calls)
    del pipe
    return cells


@dataclass
class _Run:
    """One bench run's shared state, handed to its steps."""

    cfg: BenchConfig
    result: BenchResult
    size: tuple[int, int]  # the image (height, width) every cell generates
    on_status: Callable[[str], None]
    on_cell: Callable[[BenchResult], None]
    roofline: Roofline
    stock: dict = field(default_factory=dict)  # precision -> batch -> the stock Cell

    @property
    def reference(self) -> dict:
        """batch -> stock Cell at the first precision: what every speed-up is measured against."""
        return next(iter(self.stock.values()))


def run_bench(model_spec: str | None, cfg: BenchConfig, device: str = "auto", label: str = "",
              on_status=lambda msg: None, on_cell=lambda result: None) -> BenchResult:
    """`on_cell(result)` after every measured cell (the CLI rewrites its report: a run stopped by
    a timeout keeps what it measured)."""
    from compinv_rt.models.loading import LoadedModel, load_model
    from compinv_rt.sampling.pipeline import SamplingConfig

    # resolved precision name ("auto" -> fp32 on CPU) -> model; the first is the reference
    models: dict[str, LoadedModel] = {}
    for requested in cfg.precisions:
        m = load_model(model_spec, device=device, dtype=requested)
        models.setdefault(m.precision.value, m)
    model = next(iter(models.values()))
    sampling = SamplingConfig(steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler,
                              guidance_interval=cfg.guidance_interval).resolved(model.files)
    run = _Run(cfg, BenchResult(meta=_meta(models, cfg, sampling, label)), sampling.size, on_status,
               on_cell, _roofline(models, cfg, sampling, on_status))
    run.result.meta["roofline"] = run.roofline.as_meta()
    _stock_baselines(run, models)
    unavailable: set = set()
    grid = ((p, m, b, n) for p, m in models.items() for b in cfg.backends for n in cfg.batch_sizes)
    for precision, model, backend, batch in grid:
        if (backend, precision) in unavailable:
            continue
        if not _backend_cells(run, model, backend, batch):
            unavailable.add((backend, precision))
            continue
        # this backend's session and timers are gone with _backend_cells' frame
        if model.device.type == "cuda":
            torch.cuda.empty_cache()  # free this backend's memory before the next one opens
    return run.result


def _meta(models: dict, cfg: BenchConfig, sampling, label: str) -> dict:
    from compinv_rt import __version__

    model = next(iter(models.values()))
    return {
        "model": str(model.root), "model_hash": model.hash, "label": label,
        "device": str(model.device), "device_name": _device_name(model.device),
        "dtype": model.precision.value, "precisions": list(models),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(), "compinv_rt": __version__,
        "image_size": [sampling.height, sampling.width], "steps": cfg.steps,
        "scheduler": str(sampling.as_dict()["scheduler"]), "guidance_interval": list(cfg.guidance_interval),
        "unet_evaluations_per_image": sampling.unet_evaluations(),
        "qualities": [_sampler_meta(s, cfg) for s in cfg.sampler_list()],
        "guidance": cfg.guidance, "repeats": cfg.repeats, "prompt": cfg.prompt,
        "baseline": f"stock diffusers StableDiffusionPipeline ({cfg.baseline})",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "skipped": [],
    }


def _sampling(sampler: Sampler, cfg: BenchConfig):
    from compinv_rt.sampling.pipeline import SamplingConfig

    return SamplingConfig(steps=sampler.steps, guidance=cfg.guidance, scheduler=sampler.scheduler,
                          guidance_interval=sampler.guidance_interval)


def _sampler_meta(sampler: Sampler, cfg: BenchConfig) -> dict:
    return {"name": sampler.name, "steps": sampler.steps, "scheduler": sampler.scheduler,
            "guidance_interval": list(sampler.guidance_interval),
            "unet_evaluations_per_image": _sampling(sampler, cfg).unet_evaluations()}


def _roofline(models: dict, cfg: BenchConfig, sampling, on_status) -> Roofline:
    """The run's roofline, measured up front at every precision for every UNet batch the run's
    samplers will call (the guided 2B, and B where guidance skips steps)."""
    model = next(iter(models.values()))
    factor = model.files.vae_scale_factor
    roofline = Roofline(model.unet, (sampling.height // factor, sampling.width // factor),
                        model.files.text_len, {p: m.dtype for p, m in models.items()}, model.device)
    guided = cfg.guidance > 1
    partial = any(not all(_sampling(s, cfg).guided_steps()) for s in cfg.sampler_list())
    unet_batches = sorted({n for b in cfg.batch_sizes
                           for n in ([2 * b] if guided else []) + ([b] if partial or not guided else [])})
    on_status(f"roofline: UNet FLOPs and attainable matmul peak at UNet batches {unet_batches}")
    for precision in models:
        for unet_batch in unet_batches:
            roofline.peak(precision, unet_batch)
    return roofline


def _add_roofline(run: _Run, cell: Cell, calls: list[int]) -> None:
    """The cell's UNet FLOPs per image (every UNet call of one generation, at its UNet batch), the
    GFLOP/s it reached and its fraction of the attainable peak for the same calls."""
    if not calls or cell.unet_s <= 0:
        return
    flops, ideal_s, ideal_cpu_s = run.roofline.calls(cell.precision, calls)
    cell.gflops_per_image = flops / cell.batch / 1e9
    cell.unet_gflops_per_s = flops / cell.unet_s / 1e9
    cell.attainable_gflops_per_s = flops / ideal_s / 1e9
    cell.fraction_of_peak = fraction_of_peak(flops, cell.unet_s, cell.attainable_gflops_per_s)
    if run.roofline.device.type == "cpu" and torch.get_num_threads() == 1 and cell.unet_cpu_s > 0:
        cell.fraction_of_peak_cpu = ideal_cpu_s / cell.unet_cpu_s
    run.result.meta["roofline"] = run.roofline.as_meta()  # a call at a new UNet batch adds a peak


def _link_reference(cells: list[Cell]) -> None:
    """Each of our cells' images/s over the `reference` preset's, same backend, precision, batch
    and bias (None while that is not measured, or not in the run)."""
    refs = {(c.backend, c.precision, c.batch, c.bias): c for c in cells
            if c.backend != STOCK and c.quality == REFERENCE}
    for c in cells:
        ref = refs.get((c.backend, c.precision, c.batch, c.bias))
        if c.backend != STOCK and ref is not None:
            c.images_per_s_vs_reference = c.images_per_s / ref.images_per_s


def _stock_baselines(run: _Run, models: dict) -> None:
    """Stock diffusers at every precision; those after the first get speed-ups against it."""
    for precision, m in models.items():
        run.stock[precision] = _stock_cells(run, m)
        run.result.cells.extend(run.stock[precision].values())
        run.on_cell(run.result)
    reference = run.reference
    for cells in list(run.stock.values())[1:]:
        for batch, cell in cells.items():
            cell.step_speedup = reference[batch].step_ms_p50 / cell.step_ms_p50
            cell.e2e_speedup = reference[batch].e2e_s / cell.e2e_s


def _backend_cells(run: _Run, model, backend: str, batch: int) -> bool:
    """Measure one backend at one precision and batch size, every sampler, bias off and on (False:
    the backend cannot run at this precision; noted in the result's skipped list)."""
    from compinv_rt.core.errors import BackendUnavailable
    from compinv_rt.generate.requests import build_request
    from compinv_rt.generate.session import GenerationSession

    cfg, precision = run.cfg, model.precision.value
    height, width = run.size
    run.on_status(f"{backend} {precision}: batch {batch} (opening)")
    session = GenerationSession(model, backend, engines_root=cfg.engines_root, max_batch=batch,
                                on_status=run.on_status)
    try:
        session.unet(height, width, cfg.guidance > 1)
    except BackendUnavailable as exc:  # e.g. onnxruntime has no bf16 kernels
        run.result.meta["skipped"].append(f"{backend} {precision}: {exc}")
        run.on_status(f"skipped: {exc}")
        return False
    provider = getattr(session.unet(height, width, cfg.guidance > 1), "provider", None)
    timer = session.wrap_unet(height, width, cfg.guidance > 1,
                              lambda unet: StepTimer(unet, model.device))
    for sampler in cfg.sampler_list():
        for with_bias in cfg.bias:
            run.on_status(f"{backend} {precision}: batch {batch}, bias {'on' if with_bias else 'off'}"
                          f"{', quality ' + sampler.name if sampler.name else ''}")
            tasks = session.tasks(build_request(_request_spec(cfg, sampler, batch, run.size, with_bias),
                                                backend))

            def generate(session=session, tasks=tasks):
                session.run_batch(tasks)

            fields, calls = _measure(generate, model.device, cfg.repeats, timer, batch)
            cell = Cell(backend, batch, with_bias, sampler.steps, **fields, precision=precision,
                        provider=provider, quality=sampler.name)
            _add_speedups(run, cell)
            _add_roofline(run, cell, calls)
            run.result.cells.append(cell)
            _link_reference(run.result.cells)
            run.on_cell(run.result)
    return True


def _add_speedups(run: _Run, cell: Cell) -> None:
    """Against stock diffusers at the reference precision, and at the cell's own."""
    base = run.reference[cell.batch]
    cell.step_speedup = base.step_ms_p50 / cell.step_ms_p50
    cell.e2e_speedup = base.e2e_s / cell.e2e_s
    cell.e2e_speedup_same_precision = run.stock[cell.precision][cell.batch].e2e_s / cell.e2e_s


def _request_spec(cfg: BenchConfig, sampler: Sampler, batch: int, size: tuple[int, int], with_bias: bool):
    """One generation of `batch` images of the bench prompt (seeds 0..batch-1), biased or not."""
    from compinv_rt.generate.requests import RequestSpec
    from compinv_rt.spatial.plan import SpatialOptions

    spatial = (layout_options(cfg.prompt, cfg.bias_strength, sampler.steps) if with_bias
               else SpatialOptions())
    return RequestSpec(cfg.prompt, 0, batch, steps=sampler.steps, guidance=cfg.guidance,
                       scheduler=sampler.scheduler, height=size[0], width=size[1],
                       guidance_interval=sampler.guidance_interval, spatial=spatial)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"
