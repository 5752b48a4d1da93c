"""Spatial settings of a generation request as one typed config, and turning them into
denoise-loop inputs.

`SpatialConfig.from_options()` validates everything that needs no model (so bad input costs
milliseconds); `LayoutResolver` needs the loaded model's tokenizer and text encoder and resolves a
prompt's layout (explicit boxes, the layout model's, or the fixed ones); `spatial_inputs()` turns
one batch's per-image layouts into what `Pipeline.generate` takes (the attention bias, the layout
guidance's step hook, an attention recorder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from compinv_rt.core.errors import ConfigError
from compinv_rt.spatial.layouts import Layout, LayoutSpec, SpatialMode, parse_layout

if TYPE_CHECKING:

    from compinv_rt.models.loading import LoadedModel
    from compinv_rt.sampling.denoise import AttentionBias
    from compinv_rt.spatial.guidance import GuidanceConfig, LayoutGuidance
    from compinv_rt.spatial.heatmaps import AttentionRecorder

DEFAULT_STRENGTH = 2.0
DEFAULT_STEPS = "0.2"  # the reference's 10 of 50 steps
# --spatial adaptive: s in units of each layer's logit spread, on the first 40 % of the steps with
# weight (t / t_first) ** 4; chosen on the tuning prompts of benchmarks/spatial/adaptive.py
# (benchmarks/spatial.md, section 5).
ADAPTIVE_STRENGTH = 3.0
ADAPTIVE_STEPS = "0.4"
ADAPTIVE_DECAY = 4.0
LAYOUT_MODEL_SUBDIR = "layout"  # <model>/layout/layout_model.safetensors: used by --layout auto
MAX_STRENGTH = 1000.0  # far inside fp16's range (65504) even after pooling and summing


def check_strength(strength: float) -> float:
    if not (strength == strength and 0.0 <= strength <= MAX_STRENGTH):
        raise ConfigError(f"--bias-strength must be in [0, {MAX_STRENGTH:g}], got {strength:g}")
    return float(strength)


def check_decay(decay: float) -> float:
    if not (decay == decay and 0.0 <= decay <= 100.0):
        raise ConfigError(f"--bias-decay must be in [0, 100], got {decay:g}")
    return float(decay)


def resolve_steps(value: str | float | int, total: int, option: str = "--bias-steps") -> int:
    """A fraction of the steps (`0.2`, `1.0`) or a count (`10`) -> a number of steps in [0, total].

    Text with a decimal point, or any value below 1, is a fraction; an integer is a count."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{option} takes a fraction (0.2) or a step count (10), got {text!r}") from None
    if not (number == number) or number < 0:
        raise ConfigError(f"{option} must be >= 0, got {text!r}")
    if "." in text or "e" in text.lower() or number < 1:
        if number > 1:
            raise ConfigError(f"{option} fraction must be in [0, 1], got {text!r} "
                              "(use an integer for a step count)")
        return int(round(number * total))
    return min(int(number), total)


@dataclass(frozen=True)
class SpatialOptions:
    """A request's spatial options as the user gave them (CLI flags, a job line, an API body);
    None means "the mode's default". `SpatialConfig.from_options` checks and resolves them."""

    mode: str | None = None  # none | bias | adaptive | guidance; None: bias if a layout is given
    layout: str | LayoutSpec | None = None
    strength: float | None = None
    steps: str | None = None
    layout_model: Path | None = None
    save_attention: bool = False
    decay: float | None = None


@dataclass(frozen=True)
class SpatialConfig:
    mode: SpatialMode = SpatialMode.none
    layout: LayoutSpec = field(default_factory=lambda: LayoutSpec("none"))
    strength: float = DEFAULT_STRENGTH
    steps: str = DEFAULT_STEPS  # fraction ("0.2") or count ("10") of the steps
    layout_model: Path | None = None
    save_attention: bool = False
    # Backward guidance's knobs (iterations, scale, layers); None: GuidanceConfig's defaults. Its
    # `steps` is always `steps` above.
    guidance: GuidanceConfig | None = None
    decay: float = ADAPTIVE_DECAY  # --spatial adaptive: gain (t / t_first) ** decay

    @staticmethod
    def from_options(options: SpatialOptions, backend: str = "torch",
                     total_steps: int = 50) -> "SpatialConfig":
        """User options -> a checked config. `--spatial` defaults to bias when a layout is given;
        `--layout` defaults to auto when a spatial mode is asked for. Strength, steps and decay
        default per mode (`bias` s = 2 logits on 20 % of the steps, `adaptive` the ADAPTIVE_*)."""
        from compinv_rt.engines.registry import Backend

        spatial, layout, strength, steps = options.mode, options.layout, options.strength, options.steps
        layout_model, save_attention, decay = options.layout_model, options.save_attention, options.decay
        spec = layout if isinstance(layout, LayoutSpec) else parse_layout(layout)
        if spatial is None:
            mode = SpatialMode.none if spec.kind == "none" else SpatialMode.bias
        else:
            mode = SpatialMode(spatial)
        if mode is SpatialMode.none and spec.kind != "none":
            raise ConfigError("--layout has no effect with --spatial none; use --spatial bias, "
                              "adaptive or guidance")
        if mode is not SpatialMode.none and spec.kind == "none":
            if layout is not None:
                raise ConfigError(f"--spatial {mode.value} needs a layout; --layout none gives none")
            spec = parse_layout("auto")
        adaptive = mode is SpatialMode.adaptive
        if strength is None:
            strength = ADAPTIVE_STRENGTH if adaptive else DEFAULT_STRENGTH
        if steps is None:
            steps = ADAPTIVE_STEPS if adaptive else DEFAULT_STEPS
        check_strength(strength)
        if decay is not None and not adaptive:
            raise ConfigError("--bias-decay applies to --spatial adaptive only")
        decay = check_decay(ADAPTIVE_DECAY if decay is None else decay)
        resolve_steps(steps, total_steps)
        backend = Backend(backend)
        if mode is SpatialMode.guidance and not backend.eager:
            raise ConfigError(f"--spatial guidance needs gradients through the UNet and runs only "
                              f"with --backend torch (got {backend.value}); --spatial bias and "
                              "adaptive work on every backend")
        if save_attention and not backend.eager:
            raise ConfigError(f"--save-attention reads the attention inside the UNet and runs only "
                              f"with --backend torch (got {backend.value})")
        if layout_model is not None and not Path(layout_model).exists():
            raise ConfigError(f"--layout-model {layout_model} does not exist")
        return SpatialConfig(mode, spec, float(strength), str(steps), layout_model, save_attention,
                             decay=decay)

    def as_dict(self) -> dict:
        d = {"mode": self.mode.value, "bias_strength": self.strength, "steps": self.steps,
             "layout_model": None if self.layout_model is None else str(self.layout_model)}
        if self.mode is SpatialMode.adaptive:
            d["bias_decay"] = self.decay
        return d


    def regularized_steps(self, total_steps: int) -> int:
        """Steps that get the bias or the guidance (0 without a spatial mode)."""
        return 0 if self.mode is SpatialMode.none else resolve_steps(self.steps, total_steps)

    def sidecar(self, total_steps: int, layout: Layout | None, guidance_history=None,
                index: int = 0) -> dict:
        """The `spatial` block of image `index`'s sidecar (guidance losses: that image's own)."""
        d = {**self.as_dict(), "regularized_steps": self.regularized_steps(total_steps),
             "layout": None if layout is None else layout.to_json()}
        if guidance_history is not None:
            d["guidance_iterations"] = len(guidance_history)
            if guidance_history:  # the layout loss L_CA at the first and the last inner iteration
                d["guidance_loss"] = {"first": guidance_history[0]["loss"][index],
                                      "last": guidance_history[-1]["loss"][index]}
        return d


def find_layout_model(config: SpatialConfig, model_root: Path) -> Path | None:
    if config.layout_model is not None:
        return Path(config.layout_model)
    default = Path(model_root) / LAYOUT_MODEL_SUBDIR
    return default if (default / "layout_model.safetensors").is_file() else None


class LayoutResolver:
    """Resolves a prompt's layout for one loaded model; layout models are loaded once per path."""

    def __init__(self, loaded: LoadedModel, on_status: Callable[[str], None] | None = None):
        self.loaded, self.on_status = loaded, on_status
        self._predictors: dict[Path, object] = {}

    def _predictor(self, path: Path):
        if path not in self._predictors:
            from compinv_rt.spatial import layout_model

            model, meta = layout_model.load(path)
            loaded = self.loaded
            fit_on = (meta.get("base_model") or {}).get("hash")
            if fit_on and fit_on != loaded.hash and self.on_status:
                self.on_status(f"note: layout model {path} was fit on another base model "
                               f"({meta['base_model'].get('path')}); its boxes may fit this one less well")
            self._predictors[path] = layout_model.LayoutPredictor(model, loaded.tokenizer,
                                                                  loaded.text_encoder)
        return self._predictors[path]

    def __call__(self, config: SpatialConfig, prompt: str,
                 expand: Callable[[str], str] | None = None) -> Layout | None:
        """`prompt` is already expanded; `expand` is the placeholder expansion that made it, applied
        to user-given phrases too."""
        from compinv_rt.spatial.layouts import format_layout, resolve_layout

        predictor = None
        if config.mode is not SpatialMode.none and config.layout.needs_boxes:
            path = find_layout_model(config, self.loaded.root)
            if path is not None:
                predictor = self._predictor(path)
            elif self.on_status:
                self.on_status("no layout model: using the reference's fixed boxes")
        layout = resolve_layout(config.layout, self.loaded.tokenizer, prompt, predictor, expand)
        if layout is not None and config.mode is not SpatialMode.none and self.on_status:
            self.on_status(f"layout ({layout.source.value}): {format_layout(layout.concepts)}")
        return layout


@dataclass
class SpatialInputs:
    """One batch's spatial inputs to `Pipeline.generate` (all per image, in batch order)."""

    bias: AttentionBias | None = None  # maps (B, T, h, w) for the conditional half, steps, gains
    guidance: LayoutGuidance | None = None  # a step hook of the denoise loop
    attention_recorder: AttentionRecorder | None = None


class SpatialBatch(Protocol):
    """What the images of one batch share about spatial regularization (session.BatchKey has it)."""

    @property
    def spatial(self) -> SpatialMode: ...
    @property
    def regularized_steps(self) -> int: ...
    @property
    def guidance_config(self) -> GuidanceConfig | None: ...
    @property
    def save_attention(self) -> bool: ...
    @property
    def bias_decay(self) -> float | None: ...


def spatial_inputs(key: SpatialBatch, layouts: list[Layout | None], strengths: list[float], module,
                   latent_hw: tuple[int, int], text_len: int) -> SpatialInputs:
    """Bias maps (zeros for images without a layout) and, for the adaptive bias, its gain
    schedule; or one guidance hook over the batch (`module`: the eager BiasedUNet); and an
    attention recorder when asked for."""
    h, w = latent_hw
    out = SpatialInputs()
    mode, steps = key.spatial, key.regularized_steps
    if mode in (SpatialMode.bias, SpatialMode.adaptive) and steps:
        from compinv_rt.sampling.denoise import AttentionBias
        from compinv_rt.spatial.bias_maps import BiasSchedule, bias_batch

        maps = bias_batch(layouts, strengths, h, w, text_len)
        if maps is not None:
            decay = ADAPTIVE_DECAY if key.bias_decay is None else key.bias_decay
            out.bias = AttentionBias(maps, steps, BiasSchedule(decay) if mode is SpatialMode.adaptive else None)
    elif mode is SpatialMode.guidance:
        from compinv_rt.spatial.guidance import GuidanceConfig, LayoutGuidance

        if module is None:
            raise ConfigError("--spatial guidance runs only with --backend torch")
        config = dataclasses.replace(key.guidance_config or GuidanceConfig(), steps=steps)
        out.guidance = LayoutGuidance(module, layouts, (h, w), config)
    if key.save_attention:
        from compinv_rt.spatial.heatmaps import AttentionRecorder

        out.attention_recorder = AttentionRecorder(len(layouts), h, w)
    return out
