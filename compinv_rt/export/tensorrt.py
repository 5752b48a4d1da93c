"""ONNX -> TensorRT plan through polygraphy's Python API (no shell commands).

Everything up to the TensorRT calls is plain data (`TrtBuildSettings`) so it is unit-tested on
machines without TensorRT; `build_tensorrt_engine` imports tensorrt lazily.

Precision: the network is *strongly typed*: the ONNX graph is already exported in the engine's
dtype (fp32, fp16 or bf16, export/onnx_export.py), and TensorRT keeps those types. The weak-typing
builder flags (`fp16=`, `bf16=` in CreateConfig) are deprecated since TensorRT 10.12 and gone in
11.x; strong typing works on 10.x and 11.x alike, so the `[tensorrt]` extra needs no upper pin.
TF32 (a math mode for fp32 MatMuls, not a type) stays allowed for fp32 engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compinv_rt.core.types import Precision
from compinv_rt.unet.iospec import PLAIN_GRAPH, BatchProfile, GraphIO, UNetIOSpec

PLAN_FILE = "unet.plan"  # plan_file(PLAIN_GRAPH)


def plan_file(graph: GraphIO = PLAIN_GRAPH) -> str:
    """unet.plan (the plain or the full graph), unet_shallow.plan (DeepCache's shallow graph)."""
    return f"{graph.stem}.plan"


@dataclass(frozen=True)
class TrtBuildSettings:
    precision: Precision
    # One optimization profile per batch bucket: input name -> (min, opt, max) shapes.
    profiles: tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], ...]
    optimization_level: int
    timing_cache: Path
    plan_file: str = PLAN_FILE  # the graph's plan (plan_file)

    def create_config_kwargs(self) -> dict:
        """Keyword arguments for polygraphy.backend.trt.CreateConfig, minus the Profile objects.
        No fp16/bf16 flags: the network is strongly typed (see the module's docstring)."""
        return {
            "tf32": self.precision is Precision.fp32,
            "builder_optimization_level": self.optimization_level,
            "load_timing_cache": str(self.timing_cache) if self.timing_cache.is_file() else None,
        }


def timing_cache_path(engines_root: Path, device_tag: str, trt_version: str) -> Path:
    """One timing cache per GPU model (the device tag names it, not just its compute capability)
    and TensorRT version, shared by every build on it; it lives beside the engines."""
    return Path(engines_root) / f".timing-cache-{device_tag}-trt{trt_version}.bin"


def trt_build_settings(spec: UNetIOSpec, profiles: list[BatchProfile], optimization_level: int,
                       timing_cache: Path, graph: GraphIO = PLAIN_GRAPH) -> TrtBuildSettings:
    """The build of one graph of the contract (with deep_cache, each of the two is built so)."""
    if not 0 <= optimization_level <= 5:
        from compinv_rt.core.errors import ConfigError

        raise ConfigError(f"--optimization-level must be 0-5, got {optimization_level}")
    shapes = []
    for p in profiles:
        lo, mid, hi = spec.shapes(p.min), spec.shapes(p.opt), spec.shapes(p.max)
        shapes.append({name: (lo[name], mid[name], hi[name]) for name in graph.inputs})
    return TrtBuildSettings(spec.precision, tuple(shapes), optimization_level, Path(timing_cache),
                            plan_file(graph))


def build_tensorrt_engine(onnx_path: Path, settings: TrtBuildSettings, out_dir: Path) -> str:
    """Parse the ONNX file, build one plan with one profile per bucket, save it as
    settings.plan_file. Needs TensorRT."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    from compinv_rt.core.errors import ExportError

    profiles = []
    for shapes in settings.profiles:
        prof = Profile()
        for name, (lo, opt, hi) in shapes.items():
            prof.add(name, min=lo, opt=opt, max=hi)
        profiles.append(prof)
    config = CreateConfig(profiles=profiles, **settings.create_config_kwargs())
    settings.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
        plan = engine_bytes_from_network(network, config=config,
                                         save_timing_cache=str(settings.timing_cache))
    except Exception as exc:
        raise ExportError(f"TensorRT build failed: {str(exc).splitlines()[0]}") from exc
    if plan is None:
        raise ExportError("TensorRT build failed (see the TensorRT log above)")
    from compinv_rt.core.outputs import atomic_write_bytes

    atomic_write_bytes(out_dir / settings.plan_file, bytes(plan))
    return settings.plan_file
