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


def _install(extra: str) -> str:
    return f"pip install 'compinv-rt[{extra}]'"


def _plain(name: str, dist: str, missing: str, extra: str | None = None) -> Check:
    v = _version(dist)
    hint = f" ({_install(extra)})" if extra else ""
    return Check(name, v is not None, v or f"not installed: {missing}{hint}")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _onnxruntime() -> Check:
    gpu_build = _version("onnxruntime-gpu")
    v = gpu_build or _version("onnxruntime")
    if v is None:
        return Check("onnxruntime", False, "not installed: onnxruntime backend unavailable "
                     f"({_install('gpu')} on NVIDIA GPUs, else {_install('cpu')})")
    import onnxruntime as ort

    providers = ort.get_available_providers()
    detail = f"{v}; providers: {', '.join(providers)}"
    if _cuda_available() and "CUDAExecutionProvider" not in providers:
        # The CPU wheel on a GPU machine: the onnxruntime backend would refuse --device cuda.
        detail += (f"; no CUDA provider: pip uninstall onnxruntime && {_install('gpu')}")
        return Check("onnxruntime", False, detail)
    return Check("onnxruntime", True, detail)


def _tensorrt() -> Check:
    if importlib.util.find_spec("tensorrt") is None:
        return Check("tensorrt", False, "not installed: TensorRT export and backend unavailable "
                     f"(needs an NVIDIA GPU; {_install('tensorrt')})")
    try:
        import tensorrt as trt

        return Check("tensorrt", True, trt.__version__)
    except Exception as exc:  # a stub or broken install: report, never crash the doctor
        return Check("tensorrt", False, f"present but not importable: {exc}")


def _clip_vocab() -> Check:
    from compinv_rt.core.errors import CompinvError
    from compinv_rt.models.tokenizer import bpe_vocab_path

    try:
        return Check("clip vocabulary", True, str(bpe_vocab_path()))
    except CompinvError as exc:
        return Check("clip vocabulary", False, str(exc))


def _default_model() -> Check:
    from compinv_rt.core.errors import CompinvError
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
        _plain("onnx", "onnx", "ONNX export unavailable", "gpu" if _cuda_available() else "cpu"),
        _plain("polygraphy", "polygraphy", "graph folding and TensorRT builds unavailable",
               "gpu" if _cuda_available() else "cpu"),
        _tensorrt(),
        _plain("ray", "ray", "generate --jobs --ray unavailable", "scaleout"),
        _plain("matplotlib", "matplotlib", "train's loss curve and bench/eval plots unavailable"),
        _clip_vocab(),
        _default_model(),
    ]
