"""`compinv-rt doctor`: what is installed and usable here, one line each."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch() -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("torch", False, f"not importable ({exc})")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cc = ".".join(map(str, torch.cuda.get_device_capability(i)))
            devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm {cc})")
        cuda = f"CUDA {torch.version.cuda}"
    else:
        cuda = "no CUDA device"
    return Check("torch", True, f"{torch.__version__}; {cuda}; devices: {', '.join(devices)}")


def _plain(name: str, dist: str, missing: str) -> Check:
    v = _version(dist)
    return Check(name, v is not None, v or f"not installed: {missing}")


def _onnxruntime() -> Check:
    v = _version("onnxruntime") or _version("onnxruntime-gpu")
    if v is None:
        return Check("onnxruntime", False, "not installed: onnxruntime backend unavailable")
    import onnxruntime as ort

    return Check("onnxruntime", True, f"{v}; providers: {', '.join(ort.get_available_providers())}")


def _tensorrt() -> Check:
    if importlib.util.find_spec("tensorrt") is None:
        return Check("tensorrt", False,
                     "not installed: TensorRT export and backend unavailable (needs NVIDIA GPU + TensorRT)")
    try:
        import tensorrt as trt

        return Check("tensorrt", True, trt.__version__)
    except Exception as exc:  # a stub or broken install: report, never crash the doctor
        return Check("tensorrt", False, f"present but not importable: {exc}")


def _clip_vocab() -> Check:
    from compinv_rt.errors import CompinvError
    from compinv_rt.models.tokenizer import bpe_vocab_path

    try:
        return Check("clip vocabulary", True, str(bpe_vocab_path()))
    except CompinvError as exc:
        return Check("clip vocabulary", False, str(exc))


def _default_model() -> Check:
    from compinv_rt.errors import CompinvError
    from compinv_rt.models.embedded import default_model_dir
    from compinv_rt.models.loading import inspect_model_dir

    try:
        files = inspect_model_dir(default_model_dir())
        return Check("default model", True, f"{files.root} ({files.default_size}px, "
                                            f"{files.prediction_type})")
    except CompinvError as exc:
        return Check("default model", False, str(exc))


def run_checks() -> list[Check]:
    from compinv_rt import __version__

    return [
        Check("compinv-rt", True, __version__),
        Check("python", True, platform.python_version()),
        _torch(),
        _plain("diffusers", "diffusers", "generation unavailable"),
        _plain("transformers", "transformers", "generation unavailable"),
        _onnxruntime(),
        _plain("onnx", "onnx", "ONNX export unavailable"),
        _plain("polygraphy", "polygraphy", "graph folding and TensorRT builds unavailable"),
        _tensorrt(),
        _plain("ray", "ray", "generate --jobs --ray unavailable"),
        _clip_vocab(),
        _default_model(),
    ]
