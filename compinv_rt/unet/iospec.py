"""The one export contract of the UNet: names, dtypes, shapes, dynamic axes and batch profiles.

ONNX export (input/output names, dynamic axes), TensorRT optimization profiles, AOTInductor
dynamic shapes and the runtime's buffers are all derived from this one description.

With `deep_cache` (DeepCache, compinv_rt.unet.deep_cache) an engine holds two graphs instead of
one: FULL_GRAPH (the plain inputs -> noise_pred and the deep features) and SHALLOW_GRAPH (the plain
inputs and the deep features -> noise_pred). The full graph's noise_pred serves uncached runs too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from compinv_rt.core.errors import ConfigError
from compinv_rt.core.types import Precision

# bias_gain (N, 2) = [fixed, adaptive] gains of attention_bias this step (spatial/attention.py);
# backends feed [1, 0] (the fixed bias) when the caller gives none.
INPUTS = ("sample", "timestep", "encoder_hidden_states", "attention_bias", "bias_gain")
OUTPUTS = ("noise_pred",)
BATCH_AXIS = "batch"  # the UNet batch: 2 x images with classifier-free guidance
# DeepCache: the last up block's input (N, block_out_channels[1], h, w), kept by a full step.
DEEP_FEATURES = "deep_features"


@dataclass(frozen=True)
class GraphIO:
    """One exported graph: the stem of its files (unet.onnx, unet.plan, unet_b2-2.pt2 ...) and
    its input and output names, in order. An ONNX graph (and so a TensorRT plan) lacks the inputs
    it never reads (the exporter drops them: a shallow path without cross-attention has no text,
    bias or gain input); the backends feed the inputs a graph has."""

    stem: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


PLAIN_GRAPH = GraphIO("unet", INPUTS, OUTPUTS)
FULL_GRAPH = GraphIO("unet", INPUTS, OUTPUTS + (DEEP_FEATURES,))
SHALLOW_GRAPH = GraphIO("unet_shallow", INPUTS + (DEEP_FEATURES,), OUTPUTS)


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
    deep_cache: bool = False  # two graphs, full and shallow (see the module doc)
    deep_channels: int = 0  # channels of DEEP_FEATURES (block_out_channels[1]); with deep_cache only

    def __post_init__(self):
        if self.deep_cache != (self.deep_channels > 0):
            raise ConfigError(f"an IO spec with deep_cache={self.deep_cache} has deep_channels="
                              f"{self.deep_channels}: both or neither")

    @classmethod
    def for_model(cls, files, height: int, width: int, precision: Precision | str,
                  deep_cache: bool = False) -> "UNetIOSpec":
        """From a validated model folder (compinv_rt.models.loading.ModelFiles) and an image size.
        `deep_cache`: the two DeepCache graphs (ConfigError for a UNet they cannot split)."""
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % files.spatial_factor:
                raise ConfigError(f"--{name} {v} is not a positive multiple of {files.spatial_factor}")
        if Precision(precision) is Precision.auto:
            raise ConfigError("an engine's precision is concrete: resolve 'auto' for the device first")
        u = files.unet_config
        dim = u["cross_attention_dim"]
        channels = deep_channels(u) if deep_cache else 0  # ConfigError: DeepCache cannot split it
        return cls(
            in_channels=u.get("in_channels", 4),
            out_channels=u.get("out_channels", 4),
            text_len=files.text_len,
            text_dim=dim[0] if isinstance(dim, (list, tuple)) else dim,
            latent_height=height // files.vae_scale_factor,
            latent_width=width // files.vae_scale_factor,
            precision=Precision(precision),
            deep_cache=deep_cache,
            deep_channels=channels,
        )

    def graphs(self) -> tuple[GraphIO, ...]:
        """The engine's graphs: the plain one, or DeepCache's full and shallow ones."""
        return (FULL_GRAPH, SHALLOW_GRAPH) if self.deep_cache else (PLAIN_GRAPH,)

    @property
    def main_graph(self) -> GraphIO:
        """The graph that serves a plain (uncached) UNet call."""
        return self.graphs()[0]

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        h, w = self.latent_height, self.latent_width
        shapes = {
            "sample": (batch, self.in_channels, h, w),
            "timestep": (batch,),
            "encoder_hidden_states": (batch, self.text_len, self.text_dim),
            "attention_bias": (batch, self.text_len, h, w),
            "bias_gain": (batch, 2),
            "noise_pred": (batch, self.out_channels, h, w),
        }
        if self.deep_cache:
            shapes[DEEP_FEATURES] = (batch, self.deep_channels, h, w)
        return shapes

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

    def dynamic_axes(self, graph: GraphIO = PLAIN_GRAPH) -> dict[str, dict[int, str]]:
        return {name: {0: BATCH_AXIS} for name in graph.inputs + graph.outputs}

    def example_inputs(self, batch: int, device="cpu", seed: int = 0, graph: GraphIO = PLAIN_GRAPH) -> tuple:
        import torch

        g = torch.Generator("cpu").manual_seed(seed)
        shapes = self.shapes(batch)
        out = []
        for name in graph.inputs:
            if name == "timestep":
                t = torch.full(shapes[name], 500.0)
            else:
                t = torch.randn(shapes[name], generator=g)
            out.append(t.to(device=device, dtype=self.dtype(name)))
        return tuple(out)

    def to_dict(self) -> dict:
        """The manifest's `io`. deep_cache and deep_channels appear only on a deep-cache spec, so a
        plain spec's dict (and so every plain engine's key) is what it was before DeepCache."""
        d = asdict(self)
        d["precision"] = self.precision.value
        d["inputs"], d["outputs"] = list(INPUTS), list(OUTPUTS)
        if not self.deep_cache:
            del d["deep_cache"], d["deep_channels"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetIOSpec":
        fields = {k: d[k] for k in ("in_channels", "out_channels", "text_len", "text_dim",
                                    "latent_height", "latent_width")}
        return cls(**fields, precision=Precision(d["precision"]), deep_cache=bool(d.get("deep_cache", False)),
                   deep_channels=int(d.get("deep_channels", 0)))

    def without_cache(self) -> "UNetIOSpec":
        """The plain spec this one also serves (a deep-cache engine's full graph gives noise_pred)."""
        return replace(self, deep_cache=False, deep_channels=0)


UNSUPPORTED = ("center_input_sample", "class_embed_type", "addition_embed_type", "time_embedding_act_fn",
               "encoder_hid_dim_type")  # config keys of UNet parts the split does not run


def deep_channels(unet_config) -> int:
    """Channels of the deep features (the last up block's input: the second up block from the end
    outputs block_out_channels[1], up-sampled to the latent resolution), after checking from the
    config alone (a dict, or a loaded UNet's config) that DeepCache can split this UNet: the SD
    1.x/2.x forward, at least two up blocks. ConfigError otherwise."""
    extra = [key for key in UNSUPPORTED if unet_config.get(key)]
    if extra or len(unet_config.get("up_block_types") or ()) < 2:
        raise ConfigError(f"deep-feature caching supports SD 1.x/2.x-style UNets; this one has "
                          f"{', '.join(extra) or 'fewer than two up blocks'}")
    return unet_config["block_out_channels"][1]
