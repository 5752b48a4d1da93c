"""UNet -> AOTInductor packages (.pt2): `torch.export` of the BiasedUNet wrapper, compiled ahead of
time for the device at hand (C++ on CPU, CUDA kernels on a GPU). One package per batch profile."""

from __future__ import annotations

import copy
from pathlib import Path

from compinv_rt.core.errors import ExportError
from compinv_rt.unet.iospec import INPUTS, BatchProfile, UNetIOSpec


def package_name(profile: BatchProfile) -> str:
    return f"unet_b{profile.min}-{profile.max}.pt2"


def export_aoti(unet, spec: UNetIOSpec, profiles: list[BatchProfile], out_dir: Path,
                device: str, freezing: bool = False) -> list[str]:
    import torch

    from compinv_rt.unet.attention import BiasedUNet

    module = BiasedUNet(copy.deepcopy(unet).to(device=device, dtype=spec.precision.torch_dtype)).eval()
    names = []
    for profile in profiles:
        example = spec.example_inputs(profile.opt, device=device)
        dynamic = None
        if not profile.static:
            batch = torch.export.Dim("batch", min=max(profile.min, 2), max=profile.max)
            dynamic = {name: {0: batch} for name in INPUTS}
        try:
            with torch.no_grad():
                program = torch.export.export(module, example, dynamic_shapes=dynamic)
                path = out_dir / package_name(profile)
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(path), inductor_configs={"freezing": freezing})
        except Exception as exc:
            raise ExportError(f"AOTInductor export failed: {str(exc).splitlines()[0]}") from exc
        names.append(path.name)
    return names
