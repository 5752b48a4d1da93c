"""UNet -> ONNX: the BiasedUNet wrapper (with deep_cache: DeepCache's full and shallow graphs),
exported once, folded, checked.

Legacy TorchScript exporter at opset 17 by default (what TensorRT's demoDiffusion uses); the
dynamo exporter at opset >= 18 as an option (dynamo at 17 writes an invalid graph).
"""

from __future__ import annotations

import logging
import warnings
from enum import Enum
from pathlib import Path

from compinv_rt.core.errors import ConfigError, ExportError
from compinv_rt.unet.iospec import PLAIN_GRAPH, BatchProfile, GraphIO, UNetIOSpec

log = logging.getLogger(__name__)

ONNX_FILE = "unet.onnx"  # onnx_file(PLAIN_GRAPH)
EXTERNAL_DATA_FILE = "unet.onnx.data"
_TWO_GB = 2**31 - 1


class OnnxExporter(str, Enum):
    legacy = "legacy"
    dynamo = "dynamo"


def check_opset(exporter: OnnxExporter, opset: int) -> None:
    if exporter is OnnxExporter.dynamo and opset < 18:
        raise ConfigError(f"the dynamo exporter needs --opset >= 18 (got {opset}); "
                          "use the legacy exporter for opset 17")
    if not 14 <= opset <= 23:
        raise ConfigError(f"--opset {opset} is outside the supported range 14-23")


def onnx_file(graph: GraphIO = PLAIN_GRAPH) -> str:
    """unet.onnx (the plain or the full graph), unet_shallow.onnx (DeepCache's shallow graph)."""
    return f"{graph.stem}.onnx"


def export_onnx(unet, spec: UNetIOSpec, profile: BatchProfile, out_dir: Path,
                exporter: OnnxExporter = OnnxExporter.legacy, opset: int = 17) -> list[str]:
    """Export `unet` (a diffusers UNet2DConditionModel) to out_dir/unet.onnx (with deep_cache, also
    out_dir/unet_shallow.onnx: compinv_rt.unet.iospec.SHALLOW_GRAPH). Returns file names."""
    from compinv_rt.export.graphs import graph_modules

    check_opset(exporter, opset)
    _require_folding_tools()  # before any work: a missing package is one error line, not a traceback
    dtype = spec.precision.torch_dtype
    if next(unet.parameters()).dtype != dtype:
        import copy

        unet = copy.deepcopy(unet).to(dtype)  # never change the caller's model in place
    files: list[str] = []
    for graph, module in graph_modules(unet, spec):
        files += _export_graph(module, graph, spec, profile, out_dir, exporter, opset)
    return files


def _export_graph(module, graph: GraphIO, spec: UNetIOSpec, profile: BatchProfile, out_dir: Path,
                  exporter: OnnxExporter, opset: int) -> list[str]:
    """One graph -> out_dir/<stem>.onnx (external data past 2 GB), folded and checked."""
    import onnx
    import torch

    example = spec.example_inputs(profile.opt, device=next(module.parameters()).device, graph=graph)
    raw = out_dir / "raw.onnx"
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # diffusers' shape-dependent branches warn under tracing; the batch axis stays dynamic
            # and every other shape is fixed by the IO spec, so the warnings do not apply.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if exporter is OnnxExporter.legacy:
                torch.onnx.export(module, example, str(raw), input_names=list(graph.inputs),
                                  output_names=list(graph.outputs), dynamic_axes=spec.dynamic_axes(graph),
                                  opset_version=opset, do_constant_folding=True, dynamo=False)
            else:
                batch = torch.export.Dim("batch", min=max(profile.min, 2), max=max(profile.max, 2) * 64)
                dyn = {name: {0: batch} for name in graph.inputs}
                program = torch.onnx.export(module, example, input_names=list(graph.inputs),
                                            output_names=list(graph.outputs), dynamic_shapes=dyn,
                                            opset_version=opset, dynamo=True, external_data=False)
                program.save(str(raw))
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {str(exc).splitlines()[0]}") from exc
    model = fold_constants(onnx.load(str(raw)))
    raw.unlink()
    name = onnx_file(graph)
    data = f"{name}.data"
    for stale in (name, data):
        (out_dir / stale).unlink(missing_ok=True)
    large = model.ByteSize() > _TWO_GB
    onnx.save_model(model, str(out_dir / name), save_as_external_data=large,
                    all_tensors_to_one_file=True, location=data)
    try:
        onnx.checker.check_model(str(out_dir / name))  # path form: works past 2 GB
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported ONNX graph is invalid: {str(exc).splitlines()[0]}") from exc
    return [name, data] if large else [name]


def _require_folding_tools() -> None:
    """polygraphy and onnx-graphsurgeon (constant folding) are not in every image (the GPU one)."""
    import importlib.util

    missing = [m for m in ("polygraphy", "onnx_graphsurgeon") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"the ONNX export needs {' and '.join(missing)} (constant folding): "
                          "pip install polygraphy onnx-graphsurgeon")


def fold_constants(model):
    """Constant folding with polygraphy (onnx-graphsurgeon + ONNX Runtime under the hood)."""
    import onnxruntime
    from polygraphy.backend.onnx import fold_constants as pg_fold

    onnxruntime.set_default_logger_severity(3)  # errors only: its graph warnings are noise
    from polygraphy.logger import G_LOGGER

    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            return pg_fold(model, num_passes=3, error_ok=False)
    except Exception as exc:  # folding is an optimization: keep the unfolded graph, say so
        log.warning("constant folding skipped: %s", str(exc).splitlines()[0])
        return model
