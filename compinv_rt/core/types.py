"""Small value types every layer shares (no torch at import time)."""

from __future__ import annotations

from enum import Enum

from compinv_rt.core.errors import ConfigError


class Precision(str, Enum):
    """Weights and activations precision; `auto` is fp16 on CUDA, fp32 elsewhere (`resolve`)."""

    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"

    @classmethod
    def parse(cls, text: "str | Precision", option: str = "--precision") -> "Precision":
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(f"{option} must be one of {', '.join(p.value for p in cls)}, "
                              f"got {text!r}") from None

    def resolve(self, device) -> "Precision":
        if self is not Precision.auto:
            return self
        return Precision.fp16 if getattr(device, "type", str(device)).startswith("cuda") else Precision.fp32

    @property
    def torch_dtype(self):
        if self is Precision.auto:
            raise ConfigError("precision 'auto' has no dtype until it is resolved for a device")
        return _dtypes()[self]

    @classmethod
    def of(cls, dtype) -> "Precision":
        """The precision of a torch dtype (e.g. a loaded model's)."""
        return next(p for p, d in _dtypes().items() if d == dtype)


def _dtypes() -> dict:
    """The one precision -> torch dtype table (torch is imported only when it is needed)."""
    import torch

    return {Precision.fp32: torch.float32, Precision.fp16: torch.float16,
            Precision.bf16: torch.bfloat16}
