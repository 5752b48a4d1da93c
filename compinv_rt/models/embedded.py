"""The embedded default model: a tiny Stable Diffusion trained on the shapes world (compinv_rt.apps.world),
shipped inside the package so every command works out of the box."""

from __future__ import annotations

from pathlib import Path

from compinv_rt.core.errors import ModelError

EMBEDDED_ROOT = Path(__file__).resolve().parent.parent / "embedded"
EMBEDDED_MODEL_DIR = EMBEDDED_ROOT / "shapes_sd"
EMBEDDED_JUDGE_DIR = EMBEDDED_ROOT / "judge"


def default_model_dir() -> Path:
    if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        raise ModelError(
            f"the embedded default model is missing from {EMBEDDED_MODEL_DIR}: "
            "pass --model DIR or rebuild it with `compinv-rt world train`"
        )
    return EMBEDDED_MODEL_DIR
