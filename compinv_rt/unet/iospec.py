"""The one export contract of the UNet: names, dtypes, shapes, dynamic axes and batch profiles.

ONNX export (input/output names, dynamic axes), TensorRT optimization profiles, AOTInductor
dynamic shapes and the runtime's buffers are all derived from this one description.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from compinv_rt.core.errors import ConfigError
from compinv_rt.core.types import Precision

# bias_gain (N, 2) = [fixed, adaptive] gains of attention_bias this step (spatial/attention.py);
# backends feed [1, 0] (the fixed bias) when the caller gives none.
INPUTS = ("sample", "timestep", "encoder_hidden_states", "attention_bias", "bias_gain")
OUTPUTS = ("noise_pred",)
BATCH_AXIS = "batch"  # the UNet batch: 2 x images with classifier-free guidance


@dataclass(frozen=True)
class BatchProfile:
    """UNet batch sizes one engine (or one TensorRT optimization profile) accepts."""

    min: int
    opt: int
    max: int

    @property
    def static(self) -> bool:
        return self.min == self.max

    def accepts(self, batch: int) -> bool:
        return self.min <= batch <= self.max


def batch_profiles(image_batch_sizes: list[int], dynamic: bool, guidance: bool = True) -> list[BatchProfile]:
    """Static buckets (one profile per image batch size) or one dynamic range over all of them.
    With classifier-free guidance the UNet batch is twice the image batch."""
    sizes = sorted(set(image_batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"--batch-sizes must be positive integers, got {image_batch_sizes}")
    mult = 2 if guidance else 1
    if dynamic:
        return [BatchProfile(mult * sizes[0], mult * sizes[len(sizes) // 2], mult * sizes[-1])]
    return [BatchProfile(mult * b, mult * b, mult * b) for b in sizes]


@dataclass(frozen=True)
class UNetIOSpec:
    in_channels: int
    out_channels: int
    text_len: int  # tokens per prompt (77 for CLIP)
    text_dim: int  # cross_attention_dim
    latent_height: int
    latent_width: int
    precision: Precision

    @classmethod
    def for_model(cls, files, height: int, width: int, precision: Precision | str) -> "UNetIOSpec":
        """From a validated model folder (compinv_rt.models.loading.ModelFiles) and an image size."""
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % files.spatial_factor:
                raise ConfigError(f"--{name} {v} is not a positive multiple of {files.spatial_factor}")
        if Precision(precision) is Precision.auto:
            raise ConfigError("an engine's precision is concrete: resolve 'auto' for the device first")
        u = files.unet_config
        dim = u["cross_attention_dim"]
        return cls(
            in_channels=u.get("in_channels", 4),
            out_channels=u.get("out_channels", 4),
            text_len=files.text_len,
            text_dim=dim[0] if isinstance(dim, (list, tuple)) else dim,
            latent_height=height // files.vae_scale_factor,
            latent_width=width // files.vae_scale_factor,
            precision=Precision(precision),
        )

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        h, w = self.latent_height, self.latent_width
        return {
            "sample": (batch, self.in_channels, h, w),
            "timestep": (batch,),
            "encoder_hidden_states": (batch, self.text_len, self.text_dim),
            "attention_bias": (batch, self.text_len, h, w),
            "bias_gain": (batch, 2),
            "noise_pred": (batch, self.out_channels, h, w),
        }

    def dtype(self, name: str):
        """Timesteps stay fp32 (exact integers up to 1000); every other tensor uses the precision."""
        import torch

        return torch.float32 if name == "timestep" else self.precision.torch_dtype

    def default_input(self, name: str, batch: int, device="cpu"):
        """What a backend feeds for an optional input the caller left out: a zero bias, and the
        fixed-bias gain [1, 0]."""
        import torch

        t = torch.zeros(self.shapes(batch)[name], dtype=self.dtype(name), device=device)
        if name == "bias_gain":
            t[:, 0] = 1
        return t

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: BATCH_AXIS} for name in INPUTS + OUTPUTS}

    def example_inputs(self, batch: int, device="cpu", seed: int = 0) -> tuple:
        import torch

        g = torch.Generator("cpu").manual_seed(seed)
        shapes = self.shapes(batch)
        out = []
        for name in INPUTS:
            if name == "timestep":
                t = torch.full(shapes[name], 500.0)
            else:
                t = torch.randn(shapes[name], generator=g)
            out.append(t.to(device=device, dtype=self.dtype(name)))
        return tuple(out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["precision"] = self.precision.value
        d["inputs"], d["outputs"] = list(INPUTS), list(OUTPUTS)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetIOSpec":
        fields = {k: d[k] for k in ("in_channels", "out_channels", "text_len", "text_dim",
                                    "latent_height", "latent_width")}
        return cls(**fields, precision=Precision(d["precision"]))
