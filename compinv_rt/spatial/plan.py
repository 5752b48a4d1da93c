"""Spatial options of `generate` as one config, and turning them into denoise-loop inputs.

`SpatialConfig.checked()` validates everything that needs no model (so bad input costs
milliseconds); `plan_spatial(...)` needs the loaded model's tokenizer and text encoder and gives
the pipeline what it takes: an `attention_bias` batch, the number of regularized steps, or a
guidance latent hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compinv_rt.errors import ConfigError
from compinv_rt.spatial.layouts import Layout, LayoutSpec, SpatialMode, parse_layout

DEFAULT_STRENGTH = 2.0
DEFAULT_STEPS = "0.2"  # the reference's 10 of 50 steps
LAYOUT_MODEL_SUBDIR = "layout"  # <model>/layout/layout_model.safetensors: used by --layout auto


@dataclass(frozen=True)
class SpatialConfig:
    mode: SpatialMode = SpatialMode.none
    layout: LayoutSpec = field(default_factory=lambda: LayoutSpec("none"))
    strength: float = DEFAULT_STRENGTH
    steps: str = DEFAULT_STEPS  # fraction ("0.2") or count ("10") of the steps
    layout_model: Path | None = None
    save_attention: bool = False

    @staticmethod
    def from_options(spatial: str | None, layout: str | None, strength: float = DEFAULT_STRENGTH,
                     steps: str = DEFAULT_STEPS, layout_model: Path | None = None,
                     save_attention: bool = False, backend: str = "torch",
                     total_steps: int = 50) -> "SpatialConfig":
        """CLI options -> a checked config. `--spatial` defaults to bias when a layout is given;
        `--layout` defaults to auto when a spatial mode is asked for."""
        from compinv_rt.spatial.bias_maps import check_strength, resolve_steps

        spec = parse_layout(layout)
        if spatial is None:
            mode = SpatialMode.none if spec.kind == "none" else SpatialMode.bias
        else:
            mode = SpatialMode(spatial)
        if mode is SpatialMode.none and spec.kind != "none":
            raise ConfigError("--layout has no effect with --spatial none; use --spatial bias or "
                              "--spatial guidance")
        if mode is not SpatialMode.none and spec.kind == "none":
            if layout is not None:
                raise ConfigError(f"--spatial {mode.value} needs a layout; --layout none gives none")
            spec = parse_layout("auto")
        check_strength(strength)
        resolve_steps(steps, total_steps)
        backend = str(getattr(backend, "value", backend))
        if mode is SpatialMode.guidance and backend != "torch":
            raise ConfigError(f"--spatial guidance needs gradients through the UNet and runs only "
                              f"with --backend torch (got {backend}); --spatial bias works on "
                              "every backend")
        if save_attention and backend != "torch":
            raise ConfigError(f"--save-attention reads the attention inside the UNet and runs only "
                              f"with --backend torch (got {backend})")
        if layout_model is not None and not Path(layout_model).exists():
            raise ConfigError(f"--layout-model {layout_model} does not exist")
        return SpatialConfig(mode, spec, float(strength), str(steps), layout_model, save_attention)

    def as_dict(self) -> dict:
        return {"mode": self.mode.value, "bias_strength": self.strength, "steps": self.steps,
                "layout_model": None if self.layout_model is None else str(self.layout_model)}


@dataclass
class SpatialPlan:
    layout: Layout | None
    kwargs: dict  # for Pipeline.generate: attention_bias, bias_steps, latent_hook
    steps: int  # regularized steps
    recorder: object | None = None
    guidance: object | None = None

    def sidecar(self, config: SpatialConfig) -> dict:
        d = {**config.as_dict(), "regularized_steps": self.steps,
             "layout": None if self.layout is None else self.layout.to_json()}
        if self.guidance is not None:
            hist = self.guidance.history
            d["guidance_iterations"] = len(hist)
            if hist:  # the layout loss L_CA per image at the first and the last inner iteration
                d["guidance_loss"] = {"first": hist[0]["loss"], "last": hist[-1]["loss"]}
        return d


def find_layout_model(config: SpatialConfig, model_root: Path) -> Path | None:
    if config.layout_model is not None:
        return Path(config.layout_model)
    default = Path(model_root) / LAYOUT_MODEL_SUBDIR
    return default if (default / "layout_model.safetensors").is_file() else None


def plan_spatial(config: SpatialConfig, loaded, backend, prompt: str, batch: int, sampling,
                 on_status=None, expand=None) -> SpatialPlan:
    """Resolve the layout for `prompt` (already expanded: `expand` is the placeholder expansion
    that made it, applied to user-given phrases too) and build the pipeline inputs for `batch`
    images."""
    from compinv_rt.spatial.bias_maps import bias_batch, resolve_steps
    from compinv_rt.spatial.layouts import resolve_layout

    f = loaded.files.vae_scale_factor
    h, w = sampling.height // f, sampling.width // f
    steps = resolve_steps(config.steps, sampling.steps)
    predictor = None
    if config.mode is not SpatialMode.none and config.layout.needs_boxes:
        path = find_layout_model(config, loaded.root)
        if path is not None:
            from compinv_rt.spatial import layout_model

            model, meta = layout_model.load(path)
            predictor = layout_model.LayoutPredictor(model, loaded.tokenizer, loaded.text_encoder)
            fit_on = (meta.get("base_model") or {}).get("hash")
            if fit_on and fit_on != loaded.hash and on_status:
                on_status(f"note: layout model {path} was fit on another base model "
                          f"({meta['base_model'].get('path')}); its boxes may fit this one less well")
        elif on_status:
            on_status("no layout model: using the reference's fixed boxes")
    layout = resolve_layout(config.layout, loaded.tokenizer, prompt, predictor, expand)
    if config.mode is not SpatialMode.none and on_status:
        from compinv_rt.spatial.layouts import format_layout

        on_status(f"layout ({layout.source.value}): {format_layout(layout.concepts)}")
    plan = SpatialPlan(layout, {}, 0)
    if config.mode is SpatialMode.bias:
        plan.steps = steps
        plan.kwargs = {"attention_bias": bias_batch([layout] * batch, config.strength, h, w),
                       "bias_steps": steps}
    elif config.mode is SpatialMode.guidance:
        from compinv_rt.spatial.guidance import GuidanceConfig, LayoutGuidance

        if backend.name != "torch":
            raise ConfigError(f"--spatial guidance runs only with --backend torch (got {backend.name})")
        plan.steps = steps
        plan.guidance = LayoutGuidance(backend.module, [layout] * batch, (h, w),
                                       GuidanceConfig(steps=steps))
        plan.kwargs = {"latent_hook": plan.guidance}
    if config.save_attention:
        from compinv_rt.spatial.heatmaps import AttentionRecorder

        plan.recorder = AttentionRecorder(batch, h, w)
        plan.kwargs["attention_recorder"] = plan.recorder
    return plan
