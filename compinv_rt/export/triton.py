"""A Triton Inference Server model repository for the UNet engine.

The UNet is served as-is: an ONNX engine with `platform: "onnxruntime_onnx"`, a TensorRT plan with
`platform: "tensorrt_plan"` (per-GPU plans via `cc_model_filenames`, CUDA graphs on). The IO
section comes from the same IO spec as every other artifact. The denoising loop that calls it
(text encoder with concept tokens, scheduler, VAE) belongs in a Python/BLS model: see
docs/scale-out.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from compinv_rt.core.errors import ConfigError
from compinv_rt.export.manifest import compute_capability, profiles_of, read_manifest
from compinv_rt.export.onnx_export import EXTERNAL_DATA_FILE, ONNX_FILE
from compinv_rt.unet.iospec import INPUTS, OUTPUTS, BatchProfile, UNetIOSpec

_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


def config_pbtxt(name: str, platform: str, spec: UNetIOSpec, profiles: list[BatchProfile],
                 cc_files: dict[str, str] | None = None) -> str:
    """The model configuration. Batch is an explicit (-1) dimension, as in the engine. A TensorRT
    plan's instance group lists every optimization profile (Triton picks the one the request's
    shapes fit; without the list it uses profile 0 only, so only the first batch bucket works)."""

    def tensor(n):
        dims = ", ".join(str(d) for d in (-1, *spec.shapes(1)[n][1:]))
        dtype = _TYPES[str(spec.dtype(n)).removeprefix("torch.")]
        return f'  {{ name: "{n}" data_type: {dtype} dims: [ {dims} ] }}'

    lines = [f'name: "{name}"', f'platform: "{platform}"', "max_batch_size: 0",
             "input [", ",\n".join(tensor(n) for n in INPUTS), "]",
             "output [", ",\n".join(tensor(n) for n in OUTPUTS), "]"]
    if cc_files:
        entries = ",\n".join(f'  {{ key: "{k}" value: "{v}" }}' for k, v in sorted(cc_files.items()))
        lines += ["cc_model_filenames [", entries, "]"]
    if platform == "tensorrt_plan":
        listed = ", ".join(f'"{i}"' for i in range(len(profiles)))
        lines.append(f"instance_group [ {{ count: 1 kind: KIND_GPU profile: [ {listed} ] }} ]")
        lines.append("optimization { cuda { graphs: true } }")
    else:
        lines.append("instance_group [ { count: 1 kind: KIND_AUTO } ]")
    lines.append("# UNet batch = 2 x images with classifier-free guidance. Profiles (UNet batch min-max):")
    lines += [f"#   profile {i}: {p.min}-{p.max}" for i, p in enumerate(profiles)]
    return "\n".join(lines) + "\n"


def write_triton_repository(engine_dirs: list[Path], repo: Path, name: str = "unet") -> Path:
    """Place one or more engines of the same model into `repo/<name>/`: an ONNX engine, or
    TensorRT plans for different GPUs (one file per compute capability)."""
    from compinv_rt.core.outputs import atomic_write_text

    manifests = [(Path(d), read_manifest(d)) for d in engine_dirs]
    formats = {m["format"] for _, m in manifests}
    if len(formats) != 1 or formats & {"aoti"}:
        raise ConfigError("a Triton model takes engines of one format: onnx, or tensorrt plans")
    if len({m["unet_hash"] for _, m in manifests}) != 1:
        raise ConfigError("the engines were built from different models")
    fmt = formats.pop()
    spec = UNetIOSpec.from_dict(manifests[0][1]["io"])
    profiles = profiles_of(manifests[0][1])
    if any(profiles_of(m) != profiles for _, m in manifests):
        raise ConfigError("the engines have different batch profiles; export them with the same --batch-sizes")
    version = repo / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        if len(manifests) != 1:
            raise ConfigError("pass one ONNX engine (it runs on every GPU)")
        src = manifests[0][0]
        shutil.copy2(src / ONNX_FILE, version / "model.onnx")
        if (src / EXTERNAL_DATA_FILE).exists():  # the graph refers to its data by this name
            shutil.copy2(src / EXTERNAL_DATA_FILE, version / EXTERNAL_DATA_FILE)
        text = config_pbtxt(name, "onnxruntime_onnx", spec, profiles)
    else:
        cc_files = {}
        for src, m in manifests:
            sm = compute_capability(m["device"])  # e.g. "90" -> Triton's key "9.0"
            key = f"{sm[:-1]}.{sm[-1]}"
            if key in cc_files:  # Triton tells GPUs apart by compute capability only
                raise ConfigError(f"two plans for compute capability {key} (e.g. H100 and H200): "
                                  "a Triton model takes one plan per capability")
            cc_files[key] = f"model_sm{sm}.plan"
            shutil.copy2(src / "unet.plan", version / cc_files[key])
        text = config_pbtxt(name, "tensorrt_plan", spec, profiles, cc_files)
    atomic_write_text(repo / name / "config.pbtxt", text)
    return repo / name
