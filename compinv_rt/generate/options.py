"""What opens a generation session, as one value with no torch behind it: the CLI builds and
checks it before any model code is imported (a bad combination is an error in milliseconds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compinv_rt.core.errors import ConfigError
from compinv_rt.core.types import Precision
from compinv_rt.engines.registry import DEFAULT_ENGINES, Backend


@dataclass(frozen=True)
class SessionOptions:
    """What opens a session; plain values, so it travels to Ray workers as is."""

    model: str | None = None  # diffusers folder (None: the embedded model)
    device: str = "auto"
    precision: Precision = Precision.auto
    backend: Backend = Backend.torch
    engine: Path | None = None  # an engine folder from `compinv-rt export` (engine backends)
    engines_root: Path = DEFAULT_ENGINES  # where a missing engine is built once
    max_batch: int = 8  # images per UNet batch (x2 with classifier-free guidance)

    def check(self) -> "SessionOptions":
        """The combinations no backend accepts (ConfigError; cheap, before any model import)."""
        if self.engine is not None and Backend(self.backend) in (Backend.torch, Backend.compile):
            raise ConfigError(f"--engine is for --backend onnxruntime, tensorrt or aoti, not "
                              f"{Backend(self.backend).value}")
        if Backend(self.backend) is Backend.onnxruntime and Precision(self.precision) is Precision.bf16:
            raise ConfigError("--backend onnxruntime runs fp32 or fp16 engines, not --precision bf16")
        return self
