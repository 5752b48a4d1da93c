"""UNet -> AOTInductor packages (.pt2): `torch.export` of the BiasedUNet wrapper, compiled ahead of
time for the device at hand (C++ on CPU, CUDA kernels on a GPU). One package per batch profile,
and with deep_cache one pair per profile (DeepCache's full and shallow graphs)."""

from __future__ import annotations

import copy
from pathlib import Path

from compinv_rt.core.errors import ExportError
from compinv_rt.unet.iospec import PLAIN_GRAPH, BatchProfile, GraphIO, UNetIOSpec


def package_name(profile: BatchProfile, graph: GraphIO = PLAIN_GRAPH) -> str:
    return f"{graph.stem}_b{profile.min}-{profile.max}.pt2"


def export_aoti(unet, spec: UNetIOSpec, profiles: list[BatchProfile], out_dir: Path,
                device: str, freezing: bool = False) -> list[str]:
    from compinv_rt.export.graphs import graph_modules

    unet = copy.deepcopy(unet).to(device=device, dtype=spec.precision.torch_dtype)
    names = []
    for graph, module in graph_modules(unet, spec):
        for profile in profiles:
            names.append(_export_package(module, graph, spec, profile, out_dir, device, freezing))
    return names


def _export_package(module, graph: GraphIO, spec: UNetIOSpec, profile: BatchProfile, out_dir: Path,
                    device: str, freezing: bool) -> str:
    import torch

    example = spec.example_inputs(profile.opt, device=device, graph=graph)
    dynamic = None
    if not profile.static:
        batch = torch.export.Dim("batch", min=max(profile.min, 2), max=profile.max)
        dynamic = {name: {0: batch} for name in graph.inputs}
    path = out_dir / package_name(profile, graph)
    try:
        with torch.no_grad():
            program = torch.export.export(module, example, dynamic_shapes=dynamic)
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs={"freezing": freezing})
    except Exception as exc:
        raise ExportError(f"AOTInductor export failed: {str(exc).splitlines()[0]}") from exc
    return path.name
