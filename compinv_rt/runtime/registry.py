"""Picking and opening a UNet backend. Engine-based backends get their engine from `--engine DIR`
(verified against this model) or from the engine cache, where a missing one is exported once."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from compinv_rt.errors import EngineMismatch
from compinv_rt.export.iospec import Precision, UNetIOSpec, batch_profiles
from compinv_rt.export.manifest import EngineFormat, profiles_of, unet_files, verify_engine


class BackendName(str, Enum):
    torch = "torch"
    compile = "compile"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    aoti = "aoti"


ENGINE_FORMAT = {
    BackendName.onnxruntime: EngineFormat.onnx,
    BackendName.tensorrt: EngineFormat.tensorrt,
    BackendName.aoti: EngineFormat.aoti,
}

DEFAULT_ENGINES = Path("engines")


@dataclass(frozen=True)
class ExportOptions:
    exporter: str = "legacy"
    opset: int = 17
    optimization_level: int = 3

    def for_format(self, fmt: EngineFormat) -> dict:
        if fmt is EngineFormat.aoti:
            # Freezing folds the weights into the package as constants and prepacks them for
            # oneDNN on CPU (2-3x per step at batch 16 in bf16 on AMX, benchmarks/backends.md).
            return {"freezing": True}
        opts = {"exporter": self.exporter, "opset": self.opset}
        if fmt is EngineFormat.tensorrt:
            opts["optimization_level"] = self.optimization_level
        return opts


def precision_of(model) -> Precision:
    import torch

    return {torch.float32: Precision.fp32, torch.float16: Precision.fp16,
            torch.bfloat16: Precision.bf16}[model.dtype]


def open_backend(name: BackendName | str, model, height: int, width: int, images_per_batch: int,
                 guidance: bool, engine: Path | None = None, engines_root: Path = DEFAULT_ENGINES,
                 on_status=None):
    name = BackendName(name)
    if name is BackendName.torch:
        from compinv_rt.runtime.backends import TorchBackend

        return TorchBackend(model.unet)
    if name is BackendName.compile:
        from compinv_rt.runtime.compiled_backends import CompileBackend

        return CompileBackend(model.unet, model.device)

    fmt = ENGINE_FORMAT[name]
    wanted = UNetIOSpec.for_model(model.files, height, width, precision_of(model))
    if engine is not None:
        from compinv_rt.models.loading import content_hash

        manifest = verify_engine(Path(engine), unet_hash=content_hash(unet_files(model.files)),
                                 fmt=fmt, device=str(model.device))
        spec, profiles, engine_dir = UNetIOSpec.from_dict(manifest["io"]), profiles_of(manifest), Path(engine)
        if (spec.latent_height, spec.latent_width) != (wanted.latent_height, wanted.latent_width):
            raise EngineMismatch(
                f"engine {engine} was built for {spec.latent_height}x{spec.latent_width} latents; "
                f"this run needs {wanted.latent_height}x{wanted.latent_width} ({height}x{width} images)")
    else:
        from compinv_rt.export.build import export_engine

        spec = wanted
        # ONNX Runtime takes any batch; static engines get exactly the bucket this run needs.
        profiles = batch_profiles([1, 64] if fmt is EngineFormat.onnx
                                  else [images_per_batch], dynamic=fmt is EngineFormat.onnx,
                                  guidance=guidance)
        engine_dir, reused = export_engine(fmt, model, spec, profiles, engines_root,
                                           ExportOptions().for_format(fmt), on_status=on_status)
        if on_status:
            on_status(f"{'reusing' if reused else 'built'} engine {engine_dir}")

    if name is BackendName.onnxruntime:
        from compinv_rt.runtime.ort_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engine_dir, spec, model.device)
    if name is BackendName.aoti:
        from compinv_rt.runtime.compiled_backends import AOTIBackend

        return AOTIBackend(engine_dir, spec, profiles, model.device)
    from compinv_rt.runtime.trt_backend import TensorRTBackend

    return TensorRTBackend(engine_dir, spec, profiles, model.device)
