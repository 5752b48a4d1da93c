"""Engine identity: the cache key, the manifest written beside every artifact, and its checks.

The key hashes what determines the artifact's content: the UNet's weights and config (content,
never paths), the IO spec, precision, batch profiles, export options, the tool versions and, for
device-specific artifacts (TensorRT plans, AOTInductor .so), the device they were compiled for.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from compinv_rt.core.errors import EngineMismatch
from compinv_rt.core.outputs import atomic_write_json
from compinv_rt.unet.iospec import INPUTS, BatchProfile, UNetIOSpec

SCHEMA_VERSION = 2  # 2: a seal binds the engine files' hashes to the key
MANIFEST = "manifest.json"


class EngineFormat(str, Enum):
    onnx = "onnx"
    tensorrt = "tensorrt"
    aoti = "aoti"


class ExportTarget(str, Enum):
    """What `compinv-rt export --format` builds: an engine format, or a Triton repository."""

    onnx = "onnx"
    tensorrt = "tensorrt"
    aoti = "aoti"
    triton = "triton"


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_versions(fmt: EngineFormat) -> dict[str, str | None]:
    versions = {"torch": _version("torch")}
    if fmt in (EngineFormat.onnx, EngineFormat.tensorrt):
        versions["onnx"] = _version("onnx")
    if fmt is EngineFormat.tensorrt:
        import tensorrt  # only reached after the caller checked TensorRT is importable

        versions["tensorrt"] = tensorrt.__version__
    return versions


def cuda_device_tag(name: str, capability: tuple[int, int]) -> str:
    """"cuda-sm90-nvidia-h200": the compute capability alone would let an H100 and an H200 share
    a TensorRT plan and timing cache, though their tactics differ (memory bandwidth, SM count)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cuda-sm{capability[0]}{capability[1]}-{slug}"


def compute_capability(tag: str) -> str:
    """"cuda-sm90-..." -> "90"."""
    m = re.match(r"cuda-sm(\d+)", tag or "")
    if not m:
        raise EngineMismatch(f"{tag!r} is not a CUDA device tag")
    return m.group(1)


def device_tag(fmt: EngineFormat, device: str) -> str | None:
    """Where a device-specific artifact can run: the CUDA device model, or the CPU architecture.
    (The TensorRT version is in the key through `versions`.)"""
    if fmt is EngineFormat.onnx:
        return None  # an ONNX file is portable
    if str(device).startswith("cuda"):
        import torch

        dev = torch.device(device)
        return cuda_device_tag(torch.cuda.get_device_name(dev), torch.cuda.get_device_capability(dev))
    return f"cpu-{platform.machine()}"


def unet_files(model_files) -> list[Path]:
    return [model_files.root / "unet" / "config.json", *model_files.weights["unet"]]


def file_sha256(path: Path) -> str:
    """An engine file's integrity hash: always read in full (never the mtime-keyed cache)."""
    from compinv_rt.models.loading import content_hash

    return content_hash([path], cached=False)


@dataclass(frozen=True)
class EngineRequest:
    """Everything that determines an engine's content; its key is the hash of this."""

    format: EngineFormat
    unet_hash: str
    io: UNetIOSpec
    profiles: tuple[BatchProfile, ...]
    versions: dict
    device: str | None
    options: dict = field(default_factory=dict)  # exporter, opset, optimization level ...

    def identity(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "format": self.format.value,
            "unet_hash": self.unet_hash,
            "io": self.io.to_dict(),
            "profiles": [asdict(p) for p in self.profiles],
            "versions": self.versions,
            "device": self.device,
            "options": self.options,
        }

    @property
    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def dirname(self) -> str:
        return f"{self.format.value}-{self.key[:16]}"


def seal(key: str, artifacts: dict) -> str:
    """Binds the engine files' hashes to the key: the key is known before the build (it names the
    cache folder), the files only after; a swapped file fails this even with its hash updated."""
    blob = json.dumps({"key": key, "artifacts": artifacts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def write_manifest(engine_dir: Path, request: EngineRequest, artifacts: list[str], extra: dict) -> Path:
    hashes = {name: file_sha256(engine_dir / name) for name in artifacts}
    manifest = {
        "key": request.key,
        "seal": seal(request.key, hashes),
        **request.identity(),
        "artifacts": hashes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    return atomic_write_json(engine_dir / MANIFEST, manifest)


def read_manifest(engine_dir: Path) -> dict:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise EngineMismatch(f"{engine_dir} is not an engine folder: {MANIFEST} is missing")
    from compinv_rt.core.schemas import check_manifest, read_versioned_json

    manifest = read_versioned_json(path, "schema", SCHEMA_VERSION, EngineMismatch, ": re-export the engine")
    return check_manifest(manifest, path)


def profiles_of(manifest: dict) -> list[BatchProfile]:
    return [BatchProfile(**p) for p in manifest["profiles"]]


def verify_engine(engine_dir: Path, expected: EngineRequest | None = None, *,
                  unet_hash: str | None = None, fmt: EngineFormat | None = None,
                  device: str | None = None) -> dict:
    """Refuse an engine that is corrupt or not the one asked for. Returns its manifest.

    With `expected`, the whole key must match. Otherwise (a user-given --engine DIR whose
    profiles are its own) the model, format, tool versions and device are checked one by one so
    the message can say which differs.
    """
    engine_dir = Path(engine_dir)
    m = read_manifest(engine_dir)
    if m["io"].get("inputs") != list(INPUTS):
        raise EngineMismatch(f"engine {engine_dir} was exported for another UNet contract (inputs "
                             f"{', '.join(m['io'].get('inputs') or ['?'])}; this version needs "
                             f"{', '.join(INPUTS)}); re-export it")
    recomputed = EngineRequest(
        EngineFormat(m["format"]), m["unet_hash"], UNetIOSpec.from_dict(m["io"]),
        tuple(profiles_of(m)), m["versions"], m["device"], m.get("options", {}),
    ).key
    if recomputed != m["key"] or seal(m["key"], m["artifacts"]) != m["seal"]:
        raise EngineMismatch(f"{engine_dir}/{MANIFEST} was edited: its key does not match its content")
    if expected is not None and m["key"] != expected.key:
        raise EngineMismatch(f"engine {engine_dir} (key {m['key'][:16]}) does not match this model "
                             f"and settings (key {expected.key[:16]}); re-export it")
    fmt = fmt or EngineFormat(m["format"])
    if m["format"] != fmt.value:
        raise EngineMismatch(f"engine {engine_dir} is a {m['format']} artifact, not {fmt.value}")
    if unet_hash is not None and m["unet_hash"] != unet_hash:
        raise EngineMismatch(f"engine {engine_dir} was built from another model's UNet "
                             f"({m['unet_hash'][:12]} != {unet_hash[:12]}); re-export it for this model")
    now = tool_versions(fmt)
    if m["versions"] != now:
        raise EngineMismatch(f"engine {engine_dir} was built with {m['versions']}, this machine has {now}")
    if device is not None and m["device"] != device_tag(fmt, device):
        raise EngineMismatch(f"engine {engine_dir} was built for {m['device']}, this device is "
                             f"{device_tag(fmt, device)}")
    for name, digest in m["artifacts"].items():
        path = engine_dir / name
        if not path.is_file():
            raise EngineMismatch(f"engine file {path} is missing")
        if file_sha256(path) != digest:
            raise EngineMismatch(f"engine file {path} is corrupt (its sha256 differs from the manifest)")
    return m
