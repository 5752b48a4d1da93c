"""The options every command that runs the UNet shares, declared once.

Each is an `Annotated` type a Typer command uses as `model: ModelOption = None`; the help text,
the type and the choices live here only. Past the command line they travel as one typed value,
`generate.session.SessionOptions` (precision parsed once into the `Precision` enum, which
becomes the dtype at the bottom).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compinv_rt.engines.registry import Backend

ModelOption = Annotated[Optional[str], typer.Option(
    help="Local diffusers SD 1.x/2.x folder (default: the embedded shapes-world model).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
# A string parsed by Precision.parse: a bad value is one `error:` line (exit 1), like every option.
PrecisionOption = Annotated[str, typer.Option(
    help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (about 2x faster on CPUs with AMX, "
    "with --backend aoti or compile).")]
BackendOption = Annotated[Backend, typer.Option(help="UNet backend.")]
EngineOption = Annotated[Optional[Path], typer.Option(
    help="Engine folder from `compinv-rt export` (default: find or build one in engines/).")]

GuidanceIntervalOption = Annotated[Optional[str], typer.Option(
    help="LO,HI: guidance only on the steps in [LO, HI) of the run (fractions); the others "
    "skip the unconditional pass (default: the --quality preset's).")]

CacheIntervalOption = Annotated[Optional[int], typer.Option(
    help="DeepCache: the whole UNet every N steps, only its shallow path (on the kept deep "
    "features) between; 1 = every step full (default: the --quality preset's).")]
