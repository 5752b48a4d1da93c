"""The HTTP API's request and response schemas (pydantic: they validate and document the API).

Requests are strict: unknown fields, wrong types and values over the server's limits are a 400
with one message. The request model is built per server so that its limits appear in
/openapi.json.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from compinv_rt.apps.serve.settings import Limits
from compinv_rt.core.schemas import SEED_MAX
from compinv_rt.core.schemas import limits as core_limits
from compinv_rt.sampling.schedulers import SchedulerName
from compinv_rt.spatial.layouts import SpatialMode

# A concept is named by a folder name under the server's concept folder, never a path.
CONCEPT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_CONCEPT_NAME = re.compile(CONCEPT_NAME[1:-1])


def check_concept_name(name: str) -> str:
    if not _CONCEPT_NAME.fullmatch(name):  # not re.match + $: `$` also matches before a final \n
        raise ValueError(f"invalid concept name {name[:80]!r}: a name of 1-64 letters, digits, "
                         "_ or - (not a path)")
    return name


ConceptName = Annotated[str, AfterValidator(check_concept_name), Field(
    json_schema_extra={"pattern": CONCEPT_NAME},
    description="A concept's name on this server (GET /v1/concepts): letters, digits, _ and -.")]


# Literals, not enums: strict validation of a parsed JSON body accepts their string values.
Scheduler = Literal[tuple(s.value for s in SchedulerName)]  # type: ignore[valid-type]
Spatial = Literal[tuple(m.value for m in SpatialMode)]  # type: ignore[valid-type]  # guidance: torch only
Quality = Literal["default", "fast", "reference"]
ResponseFormat = Literal["json", "png"]  # png: n = 1, the sidecar in the X-Compinv-Sidecar header


_STRICT = ConfigDict(extra="forbid", strict=True)


class _GenerateBase(BaseModel):
    model_config = _STRICT


def generate_request_model(limits: Limits) -> type[BaseModel]:
    """GenerateRequest with this server's limits in its schema. Bounds that are not the server's
    policy (seed, guidance) are core's, the same for every entry point (COMPINV_LIMITS)."""
    size = Annotated[int, Field(ge=8, le=limits.max_size, description=(
        "Pixels; a multiple of the model's factor. Default: the model's native size."))]
    fields: dict[str, Any] = {
        "prompt": (Annotated[str, Field(min_length=1, max_length=limits.max_prompt_chars,
                                        pattern=r"\S")], ...),
        "negative_prompt": (Annotated[str, Field(max_length=limits.max_prompt_chars)], ""),
        "n": (Annotated[int, Field(ge=1, le=limits.max_images,
                                   description="Images; image i uses seed + i.")], 1),
        "seed": (Annotated[int, Field(ge=0, lt=SEED_MAX + 1)], 0),  # lt: the schema says < 2**63
        "quality": (Quality | None, Field(None, description=(
            "Sampler preset as `generate --quality`: reference (25 DDIM steps), default (12 DDIM "
            "steps, guidance on the first 60 %), fast (10 DPM-Solver++ steps). Without quality, "
            "steps or scheduler: default; steps or scheduler alone: the reference for the rest."))),
        "steps": (Annotated[int | None, Field(ge=1, le=limits.max_steps)], None),
        "guidance": (Annotated[float, Field(ge=0, le=core_limits().max_guidance, allow_inf_nan=False, description=(
            "Classifier-free guidance scale (<= 1 disables it)."))], 7.5),
        "height": (size | None, None),
        "width": (size | None, None),
        "scheduler": (Scheduler | None, None),
        "concepts": (Annotated[list[ConceptName], Field(max_length=8, description=(
            "Concepts of this server whose tokens the prompt uses."))], []),
        "layout": (Annotated[str | None, Field(max_length=1000, description=(
            "'phrase=x0,y0,x1,y1;phrase=...' normalized boxes, or auto."))], None),
        "spatial": (Spatial | None, Field(None, description=(
            "Layout regularization: bias (default when a layout is given), adaptive, guidance or none."))),
        # None: the mode's own default (bias: 2 logits on 20 % of the steps; adaptive: its tuned values).
        "bias_strength": (Annotated[float | None, Field(gt=0, le=20, allow_inf_nan=False)], None),
        "bias_steps": (Annotated[str | None, Field(pattern=r"^\d+(\.\d+)?$", max_length=12, description=(
            "Steps that get the bias: a fraction (0.2) or a count (10)."))], None),
        "bias_decay": (Annotated[float | None, Field(ge=0, le=16, allow_inf_nan=False, description=(
            "adaptive only: the bias gain follows (t / t_first) ** decay."))], None),
        "response": (ResponseFormat, "json"),
        "attention": (bool, Field(False, description=(
            "Per-token cross-attention heatmaps with each image (torch backend only)."))),
        "stream": (bool, Field(False, description=(
            "Answer text/event-stream: `progress` events {step, total}, then `result` (the JSON "
            "response) or `error` {error}."))),
    }
    return create_model("GenerateRequest", __base__=_GenerateBase, **fields)


class Attention(BaseModel):
    tokens: list[str] = Field(description="The prompt's tokens, in the grid's order.")
    png_base64: str = Field(description="PNG grid: the image, then one heatmap per token.")


class GeneratedImage(BaseModel):
    png_base64: str
    sidecar: dict = Field(description="The same JSON sidecar `compinv-rt generate` writes.")
    attention: Attention | None = Field(None, description="With attention=true.")


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    batch_sizes: list[int] = Field(description="Size of the UNet batch each image was made in.")
    seconds: float


class ConceptInfo(BaseModel):
    name: str
    token: str
    vectors: int
    class_word: str = ""
    method: str | None = None


class ConceptList(BaseModel):
    concepts: list[ConceptInfo]


class Health(BaseModel):
    status: Literal["ok", "stopping"]
    model: dict
    backend: str
    queue_depth: int
    max_batch: int


class ErrorBody(BaseModel):
    error: str
