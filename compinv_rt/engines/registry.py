"""Picking and opening a UNet backend. Engine-based backends get their engine from `--engine DIR`
(verified against this model) or from the engine cache, where a missing one is exported once."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from compinv_rt.core.errors import EngineMismatch
from compinv_rt.export.manifest import EngineFormat, profiles_of, unet_files, verify_engine
from compinv_rt.unet.iospec import BatchProfile, UNetIOSpec, batch_profiles

if TYPE_CHECKING:
    from compinv_rt.models.loading import LoadedModel


class Backend(str, Enum):
    torch = "torch"  # eager PyTorch: the only one with gradients and the UNet's internals
    compile = "compile"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    aoti = "aoti"

    @property
    def needs_engine(self) -> bool:
        """Runs an engine built by `compinv-rt export` (found, built once, or given by --engine)."""
        return self in _ENGINE_FORMAT

    @property
    def engine_format(self) -> EngineFormat:
        return _ENGINE_FORMAT[self]

    @property
    def eager(self) -> bool:
        """Features that need gradients through the UNet or its attention (layout guidance,
        --save-attention) run only here."""
        return self is Backend.torch


_ENGINE_FORMAT = {
    Backend.onnxruntime: EngineFormat.onnx,
    Backend.tensorrt: EngineFormat.tensorrt,
    Backend.aoti: EngineFormat.aoti,
}

DEFAULT_ENGINES = Path("engines")


@dataclass(frozen=True)
class BatchShape:
    """What a backend is opened for: image size and images per batch (x2 UNet rows with guidance)."""

    height: int
    width: int
    images_per_batch: int
    guidance: bool = True
    # DeepCache (a run with cache_interval > 1): the engine found or built has the full and shallow
    # graphs, and the backend has `full`/`shallow` (compinv_rt.unet.deep_cache).
    deep_cache: bool = False


def open_backend(name: Backend | str, model: LoadedModel, shape: BatchShape, engine: Path | None = None,
                 engines_root: Path = DEFAULT_ENGINES, on_status=None):
    """The UNet backend `name` for `shape`: eager ones wrap the model; engine ones use `engine`
    (verified against the model) or find, else build, one under `engines_root`. An engine built
    with deep_cache gets the backend with `full`/`shallow`, whether or not `shape` asks for it."""
    name = Backend(name)
    height, width, images_per_batch, guidance = shape.height, shape.width, shape.images_per_batch, shape.guidance
    if name is Backend.torch:
        from compinv_rt.unet.backends import TorchBackend

        return TorchBackend(model.unet)
    if name is Backend.compile:
        from compinv_rt.engines.compiled_backends import CompileBackend

        return CompileBackend(model.unet, model.device)

    fmt = name.engine_format
    if name is Backend.onnxruntime:  # before any export: can onnxruntime serve this device?
        from compinv_rt.engines.ort_backend import check_device

        check_device(model.device)
    wanted = UNetIOSpec.for_model(model.files, height, width, model.precision, deep_cache=shape.deep_cache)
    if engine is not None:
        spec, profiles = _given_engine(Path(engine), fmt, model, wanted, height, width)
        engine_dir = Path(engine)
    else:
        from compinv_rt.export.build import ExportOptions, export_engine, find_engine

        unet_batch = images_per_batch * (2 if guidance else 1)
        found = find_engine(fmt, model, wanted, engines_root, unet_batch)  # e.g. from `export`
        if found is not None:
            engine_dir, profiles = found[0], profiles_of(found[1])
            spec = UNetIOSpec.from_dict(found[1]["io"])  # a deep-cache engine serves plain runs too
            if on_status:
                on_status(f"reusing engine {engine_dir}")
        else:
            spec = wanted
            profiles = build_profiles(fmt, images_per_batch, guidance)
            engine_dir, reused = export_engine(fmt, model, spec, profiles, engines_root,
                                               ExportOptions().for_format(fmt), on_status=on_status)
            if on_status:
                on_status(f"{'reusing' if reused else 'built'} engine {engine_dir}")
    return _engine_backend(name, engine_dir, spec, profiles, model.device)


def build_profiles(fmt: EngineFormat, images_per_batch: int, guidance: bool) -> list[BatchProfile]:
    """The batch profiles of an engine built for a run: ONNX Runtime takes any batch; compiled
    engines get this run's UNet batch, and with guidance one range from B to 2B rows, so the
    steps outside a guidance interval (B rows: the conditional pass alone) are not padded to 2B
    (aoti gained 1.88x instead of 2.5x in UNet work from the default preset, benchmarks/speed.md).
    B = 1 stays a static 2 (torch.export needs a dynamic batch of at least 2)."""
    if fmt is EngineFormat.onnx:
        return batch_profiles([1, 64], dynamic=True, guidance=guidance)
    b = images_per_batch
    if guidance and b > 1:
        return [BatchProfile(b, 2 * b, 2 * b)]
    return batch_profiles([b], dynamic=False, guidance=guidance)


def _given_engine(engine: Path, fmt: EngineFormat, model: LoadedModel, wanted: UNetIOSpec, height: int,
                  width: int) -> tuple[UNetIOSpec, list]:
    """--engine DIR: verified against the model, and checked to serve this run. (spec, profiles)."""
    from compinv_rt.models.loading import content_hash

    manifest = verify_engine(engine, unet_hash=content_hash(unet_files(model.files)),
                             fmt=fmt, device=str(model.device))
    spec, profiles = UNetIOSpec.from_dict(manifest["io"]), profiles_of(manifest)
    if spec.precision is not wanted.precision:  # else the sidecars would claim the wrong one
        raise EngineMismatch(f"engine {engine} runs {spec.precision.value}; this run asks for "
                             f"{wanted.precision.value} (pass --precision {spec.precision.value}, or "
                             "export an engine at this precision)")
    if (spec.latent_height, spec.latent_width) != (wanted.latent_height, wanted.latent_width):
        raise EngineMismatch(
            f"engine {engine} was built for {spec.latent_height}x{spec.latent_width} latents; "
            f"this run needs {wanted.latent_height}x{wanted.latent_width} ({height}x{width} images)")
    if wanted.deep_cache and not spec.deep_cache:
        raise EngineMismatch(f"engine {engine} has no deep-feature caching, which this run's "
                             "--cache-interval needs: export it with --deep-cache")
    return spec, profiles


def _engine_backend(name: Backend, engine_dir: Path, spec: UNetIOSpec, profiles: list, device):
    """The engine backend; on a deep-cache engine its caching variant (with `full`/`shallow`)."""
    if name is Backend.onnxruntime:
        from compinv_rt.engines.ort_backend import CachedOnnxRuntimeBackend, OnnxRuntimeBackend

        ort_cls = CachedOnnxRuntimeBackend if spec.deep_cache else OnnxRuntimeBackend
        return ort_cls(engine_dir, spec, device)
    if name is Backend.aoti:
        from compinv_rt.engines.compiled_backends import AOTIBackend, CachedAOTIBackend

        aoti_cls = CachedAOTIBackend if spec.deep_cache else AOTIBackend
        return aoti_cls(engine_dir, spec, profiles, device)
    from compinv_rt.engines.trt_backend import CachedTensorRTBackend, TensorRTBackend

    trt_cls = CachedTensorRTBackend if spec.deep_cache else TensorRTBackend
    return trt_cls(engine_dir, spec, profiles, device)
