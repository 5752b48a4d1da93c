"""Picking and opening a UNet backend. Engine-based backends get their engine from `--engine DIR`
(verified against this model) or from the engine cache, where a missing one is exported once."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from compinv_rt.core.errors import EngineMismatch
from compinv_rt.export.manifest import EngineFormat, profiles_of, unet_files, verify_engine
from compinv_rt.unet.iospec import UNetIOSpec, batch_profiles

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


def open_backend(name: Backend | str, model: LoadedModel, shape: BatchShape, engine: Path | None = None,
                 engines_root: Path = DEFAULT_ENGINES, on_status=None):
    """The UNet backend `name` for `shape`: eager ones wrap the model; engine ones use `engine`
    (verified against the model) or find, else build, one under `engines_root`."""
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
    wanted = UNetIOSpec.for_model(model.files, height, width, model.precision)
    if engine is not None:
        from compinv_rt.models.loading import content_hash

        manifest = verify_engine(Path(engine), unet_hash=content_hash(unet_files(model.files)),
                                 fmt=fmt, device=str(model.device))
        spec, profiles, engine_dir = UNetIOSpec.from_dict(manifest["io"]), profiles_of(manifest), Path(engine)
        if spec.precision is not wanted.precision:  # else the sidecars would claim the wrong one
            raise EngineMismatch(f"engine {engine} runs {spec.precision.value}; this run asks for "
                                 f"{wanted.precision.value} (pass --precision {spec.precision.value}, or "
                                 "export an engine at this precision)")
        if (spec.latent_height, spec.latent_width) != (wanted.latent_height, wanted.latent_width):
            raise EngineMismatch(
                f"engine {engine} was built for {spec.latent_height}x{spec.latent_width} latents; "
                f"this run needs {wanted.latent_height}x{wanted.latent_width} ({height}x{width} images)")
    else:
        from compinv_rt.export.build import ExportOptions, export_engine, find_engine

        spec = wanted
        unet_batch = images_per_batch * (2 if guidance else 1)
        found = find_engine(fmt, model, spec, engines_root, unet_batch)  # e.g. from `export`
        if found is not None:
            engine_dir, profiles = found[0], profiles_of(found[1])
            if on_status:
                on_status(f"reusing engine {engine_dir}")
        else:
            # ONNX Runtime takes any batch; static engines get exactly the bucket this run needs.
            profiles = batch_profiles([1, 64] if fmt is EngineFormat.onnx
                                      else [images_per_batch], dynamic=fmt is EngineFormat.onnx,
                                      guidance=guidance)
            engine_dir, reused = export_engine(fmt, model, spec, profiles, engines_root,
                                               ExportOptions().for_format(fmt), on_status=on_status)
            if on_status:
                on_status(f"{'reusing' if reused else 'built'} engine {engine_dir}")

    if name is Backend.onnxruntime:
        from compinv_rt.engines.ort_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engine_dir, spec, model.device)
    if name is Backend.aoti:
        from compinv_rt.engines.compiled_backends import AOTIBackend

        return AOTIBackend(engine_dir, spec, profiles, model.device)
    from compinv_rt.engines.trt_backend import TensorRTBackend

    return TensorRTBackend(engine_dir, spec, profiles, model.device)
