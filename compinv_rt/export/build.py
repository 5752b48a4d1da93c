"""`compinv-rt export`: build (or reuse) an engine folder `<out>/<format>-<key>/` for a model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compinv_rt.core.errors import BackendUnavailable, EngineMismatch
from compinv_rt.export.manifest import (
    EngineFormat,
    EngineRequest,
    device_tag,
    tool_versions,
    unet_files,
    verify_engine,
    write_manifest,
)
from compinv_rt.unet.iospec import BatchProfile, UNetIOSpec

log = logging.getLogger(__name__)


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
        opts: dict = {"exporter": self.exporter, "opset": self.opset}
        if fmt is EngineFormat.tensorrt:
            opts["optimization_level"] = self.optimization_level
        return opts


def require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except Exception:
        raise BackendUnavailable(
            "TensorRT is not installed (it needs an NVIDIA GPU and the tensorrt package); "
            "use --format onnx or aoti, or --backend onnxruntime/aoti/compile/torch"
        ) from None


def tensorrt_usable(device: str = "auto") -> bool:
    try:
        require_tensorrt()
    except BackendUnavailable:
        return False
    import torch

    return torch.cuda.is_available() and (device == "auto" or str(device).startswith("cuda"))


def engine_request(fmt: EngineFormat, model, spec: UNetIOSpec, profiles: list[BatchProfile],
                   options: dict) -> EngineRequest:
    from compinv_rt.models.loading import content_hash

    if fmt is EngineFormat.tensorrt:
        require_tensorrt()
        if model.device.type != "cuda":
            raise BackendUnavailable("TensorRT engines are built on a CUDA device; none is available")
    return EngineRequest(fmt, content_hash(unet_files(model.files)), spec, tuple(profiles),
                         tool_versions(fmt), device_tag(fmt, str(model.device)), dict(options))


def find_engine(fmt: EngineFormat, model, spec: UNetIOSpec, out_root: Path,
                batch: int) -> tuple[Path, dict] | None:
    """A verified engine in `out_root` that serves this model, IO spec (size, precision), device
    and tool versions, whatever batch profiles or export options it was built with (every backend
    splits and pads batches to its profiles): so `generate` uses what `export` built instead of
    building its own. Of those that take `batch` whole, the one that pads it least (then the newest);
    a static engine that would pad it more than 2x is passed over (a 1-image run on a batch-16
    engine did 8x the work: benchmarks/speed.md), so a tight one is built. Returns (folder,
    verified manifest).

    A deep-cache engine (spec.deep_cache) also serves a run that does not cache (its full graph
    gives noise_pred), after any plain engine that fits; a run that caches takes deep-cache
    engines only."""
    from compinv_rt.models.loading import content_hash

    if fmt is EngineFormat.tensorrt:
        require_tensorrt()  # its version is part of the match
    unet_hash = content_hash(unet_files(model.files))
    tag, versions = device_tag(fmt, str(model.device)), tool_versions(fmt)
    found = []
    for manifest in Path(out_root).glob(f"{fmt.value}-*/manifest.json"):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if (m.get("unet_hash"), m.get("device"), m.get("versions")) != (unet_hash, tag, versions):
            continue
        exact = serves(m.get("io"), spec)
        if exact is None:
            continue
        # ONNX Runtime takes any batch (the graph's batch axis is dynamic); compiled engines must
        # take this batch whole (splitting it is a slower engine than a build), padded at most 2x.
        padded = batch if fmt is EngineFormat.onnx else padded_batch(m.get("profiles", []), batch)
        if padded is None or padded > MAX_PADDING * batch:
            continue
        try:
            m = verify_engine(manifest.parent, unet_hash=unet_hash, fmt=fmt, device=str(model.device))
        except EngineMismatch as exc:
            log.warning("skipping engine %s: %s", manifest.parent, exc)
            continue
        found.append((exact, -padded, m.get("created", ""), str(manifest.parent), m))
    if not found:
        return None
    best = max(found, key=lambda f: f[:4])
    return Path(best[3]), best[4]


MAX_PADDING = 2  # a static engine is reused for batches it pads at most this many times over


def padded_batch(profiles: list[dict], batch: int) -> int | None:
    """The rows a static engine's profiles run `batch` at (the smallest profile that takes it whole,
    padded up to its min), None if none takes it whole."""
    fits = [max(batch, p.get("min", 0)) for p in profiles if p.get("max", 0) >= batch]
    return min(fits) if fits else None


def serves(io: object, spec: UNetIOSpec) -> bool | None:
    """Does an engine with manifest `io` serve `spec`: True (the same contract), False (a
    deep-cache engine for a plain spec: its full graph serves it), None (no)."""
    if not isinstance(io, dict):
        return None
    if io == spec.to_dict():
        return True
    if spec.deep_cache or not io.get("deep_cache"):
        return None
    plain = {k: v for k, v in io.items() if k not in ("deep_cache", "deep_channels")}
    return False if plain == spec.to_dict() else None


def export_engine(fmt: EngineFormat, model, spec: UNetIOSpec, profiles: list[BatchProfile],
                  out_root: Path, options: dict | None = None, force: bool = False,
                  on_status=None) -> tuple[Path, bool]:
    """Returns (engine folder, reused). A matching engine is reused after its files are verified;
    a corrupt one is refused unless `force` rebuilds it. Builds happen in a temp folder that is
    renamed into place, so an interrupted build never leaves a half engine behind."""
    request = engine_request(fmt, model, spec, profiles, options or {})
    target = Path(out_root) / request.dirname
    if target.exists() and not force:
        try:
            verify_engine(target, request, device=str(model.device))
            return target, True
        except EngineMismatch as exc:
            raise EngineMismatch(f"{exc} (delete {target} to rebuild it, or `compinv-rt "
                                 "export --force`)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{request.dirname}.{os.getpid()}."))
    try:
        if on_status:
            on_status(f"building {fmt.value} engine {request.dirname}")
        artifacts, extra = _build(fmt, model, spec, profiles, tmp, request.options)
        write_manifest(tmp, request, artifacts, {"model_path": str(model.root), **extra})
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, False


def remove_stale_builds(root: Path) -> list[Path]:
    """Temp folders of builds whose process is gone (killed mid-export): `.<dirname>.<pid>.XXXX`.
    A build still running in another process keeps its folder."""
    from compinv_rt.core.outputs import pid_alive

    removed = []
    for p in Path(root).glob(".*-*.*.*"):
        parts = p.name.split(".")
        if p.is_dir() and len(parts) >= 4 and parts[2].isdigit() and not pid_alive(int(parts[2])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _build(fmt, model, spec, profiles, out_dir: Path, options: dict) -> tuple[list[str], dict]:
    """The engine's files: every graph of `spec` (one, or DeepCache's full and shallow) in `fmt`."""
    from compinv_rt.export.onnx_export import OnnxExporter, export_onnx

    dynamic = BatchProfile(min(p.min for p in profiles), max(p.opt for p in profiles),
                           max(p.max for p in profiles))
    if fmt is EngineFormat.onnx:
        files = export_onnx(model.unet, spec, dynamic, out_dir, OnnxExporter(options["exporter"]),
                            options["opset"])
        return files, {}
    if fmt is EngineFormat.tensorrt:
        from compinv_rt.export.onnx_export import onnx_file
        from compinv_rt.export.tensorrt import build_tensorrt_engine, timing_cache_path, trt_build_settings

        onnx_files = export_onnx(model.unet, spec, dynamic, out_dir,
                                 OnnxExporter(options["exporter"]), options["opset"])
        cache = timing_cache_path(out_dir.parent, str(device_tag(fmt, str(model.device))),
                                  str(tool_versions(fmt)["tensorrt"]))
        plans = []
        for graph in spec.graphs():
            settings = trt_build_settings(spec, profiles, options["optimization_level"], cache, graph)
            plans.append(build_tensorrt_engine(out_dir / onnx_file(graph), settings, out_dir))
        return [*onnx_files, *plans], {}
    if fmt is EngineFormat.aoti:
        from compinv_rt.export.aoti import export_aoti

        return export_aoti(model.unet, spec, profiles, out_dir, str(model.device),
                           freezing=options.get("freezing", False)), {}
    raise AssertionError(fmt)
