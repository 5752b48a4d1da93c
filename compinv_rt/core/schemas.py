"""Input schemas: every CLI option, JSONL job line, artifact.json and manifest.json field typed and
bounded, checked once where the input enters (the CLI, `read_jobs`, `read_artifact`,
`read_manifest`). pydantic only, no torch: a bad option costs milliseconds, not model imports.

A failed check becomes one `ConfigError`/`ArtifactError`/`EngineMismatch` line naming the field.
Upper bounds keep work bounded (a job with n = 10**12 is refused, not run until memory runs out);
they are configurable with COMPINV_LIMITS, a JSON object of `Limits` fields, e.g.
`COMPINV_LIMITS='{"max_images": 100000}'`.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes int64; image i uses seed + i
DEVICE = re.compile(r"\A(auto|cpu|mps|cuda(:[0-9]{1,2})?)\Z")
JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"  # pydantic patterns: `$` is the end of the text
SHA256 = r"^[0-9a-f]{64}$"


class Limits(BaseModel):
    """Upper bounds on requested work (COMPINV_LIMITS overrides any of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_images: int = Field(10_000, ge=1)  # per PROMPT run and per job line
    max_jobs_images: int = Field(1_000_000, ge=1)  # all lines of a jobs file together
    max_steps: int = Field(1_000, ge=1)  # denoising steps
    max_size: int = Field(4_096, ge=8)  # image height/width in pixels
    max_batch: int = Field(256, ge=1)  # images per UNet batch, export batch sizes
    max_guidance: float = Field(100.0, gt=0)
    max_train_steps: int = Field(1_000_000, ge=1)
    max_vectors: int = Field(64, ge=1)
    max_workers: int = Field(256, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)  # training photos (w * h)
    max_variants: int = Field(256, ge=1)  # train --variants: augmented variants per photo
    max_grad_accum: int = Field(1024, ge=1)  # train --grad-accum: micro-batches per step


@lru_cache(maxsize=1)
def _limits_from(text: str) -> Limits:
    from compinv_rt.core.errors import ConfigError

    try:
        return Limits.model_validate_json(text or "{}")
    except ValidationError as exc:
        raise ConfigError(f"COMPINV_LIMITS: {_first(exc, {})}") from None


def limits() -> Limits:
    return _limits_from(os.environ.get("COMPINV_LIMITS", ""))


def _first(exc: ValidationError, names: dict[str, str]) -> str:
    """The first problem of a ValidationError as '<field>: <message>, got <value>'."""
    err = exc.errors(include_url=False)[0]
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a rule across fields (model validator): its message names them
        return msg
    loc = [str(p) for p in err["loc"]]
    if len(loc) > 1 and loc[1] in UNION_TAGS:  # "guidance.int": a union member's name
        loc, msg = [loc[0]], f"must be {EXPECTED.get(loc[0], 'of another type')}"
    field = names.get(loc[0], loc[0])
    where = ".".join([field, *loc[1:]])
    shown = repr(err.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if err["type"] == "extra_forbidden":
        line = f"unknown field {where!r}"
    elif err["type"] == "missing":
        line = f"{where}: missing"
    else:
        line = f"{where}: {msg}, got {shown}"
    return line.replace("\n", " ")  # one line whatever the input held


UNION_TAGS = {"int", "float", "str", "list[str]", "bool", "none"}
EXPECTED = {"guidance": "a number", "concepts": "a concept folder or a list of them",
            "options": "a string, integer or boolean"}


def _check(model: type[BaseModel], data: dict, names: dict[str, str], error, context: dict):
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise error(_first(exc, names)) from None


def _bound(info, name: str, value):
    lim = (info.context or {}).get("limits") or limits()
    top = getattr(lim, name)
    if value is not None and value > top:
        raise ValueError(f"must be <= {top} (limit {name}; raise it with COMPINV_LIMITS)")
    return value


# --- generate options -----------------------------------------------------------------------


GENERATE_NAMES = {
    "prompt": "PROMPT", "num_images": "-n/--num-images", "steps": "--steps",
    "guidance": "--guidance", "seed": "--seed", "negative_prompt": "--negative-prompt",
    "height": "--height", "width": "--width", "device": "--device", "precision": "--precision",
    "max_batch": "--max-batch", "workers": "--workers", "gpus_per_worker": "--gpus-per-worker",
    "bias_strength": "--bias-strength", "out": "--out",
}

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _SamplingBounds(BaseModel):
    """The limits shared by `generate`'s options and a JSONL job line (steps, guidance, size)."""

    @field_validator("steps", check_fields=False)
    @classmethod
    def _steps(cls, v, info):
        return _bound(info, "max_steps", v)

    @field_validator("guidance", check_fields=False)
    @classmethod
    def _guidance(cls, v, info):
        return _bound(info, "max_guidance", v)

    @field_validator("height", "width", check_fields=False)
    @classmethod
    def _size(cls, v, info):
        return _bound(info, "max_size", v)


class GenerateOptions(_SamplingBounds):
    """`generate`'s options; cross-option rules (PROMPT vs --jobs ...) stay in the command."""

    model_config = ConfigDict(extra="forbid")

    prompt: Optional[str] = None
    num_images: int = Field(4, ge=1)
    steps: int = Field(25, ge=1)
    guidance: FiniteFloat = Field(7.5, ge=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    negative_prompt: str = ""
    height: Optional[int] = Field(None, ge=1)
    width: Optional[int] = Field(None, ge=1)
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    max_batch: int = Field(8, ge=1)
    workers: int = Field(2, ge=1)
    gpus_per_worker: Optional[FiniteFloat] = Field(None, ge=0)  # None: the default
    bias_strength: Optional[FiniteFloat] = None  # None: the spatial mode's default
    out: Optional[str] = None
    jobs: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if v is not None and not v.strip():
            raise ValueError("the prompt is empty")
        return v

    @field_validator("num_images")
    @classmethod
    def _n(cls, v, info):
        return _bound(info, "max_images", v)

    @field_validator("max_batch")
    @classmethod
    def _batch(cls, v, info):
        return _bound(info, "max_batch", v)

    @field_validator("workers")
    @classmethod
    def _workers(cls, v, info):
        return _bound(info, "max_workers", v)

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        return check_device(v)

    @model_validator(mode="after")
    def _last_seed(self):
        if not self.jobs and self.seed + self.num_images - 1 > SEED_MAX:
            raise ValueError(f"--seed + n - 1 must be <= {SEED_MAX} (image i uses seed + i)")
        if not self.jobs and self.out is not None and "://" in self.out:
            raise ValueError(f"--out {self.out!r}: a URI works only with --jobs; give a folder")
        return self


def check_device(v: str) -> str:
    if not DEVICE.match(v):
        raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
    return v


def check_generate(**options) -> GenerateOptions:
    from compinv_rt.core.errors import ConfigError

    return _check(GenerateOptions, options, GENERATE_NAMES, ConfigError, {})


def check_int_list(text: str, option: str, limit: str = "max_batch") -> list[int]:
    """'1,2,4' -> [1, 2, 4], each a positive integer within the limit."""
    from compinv_rt.core.errors import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} takes positive integers, got {text!r}")
    top = getattr(limits(), limit)
    if max(values) > top:
        raise ConfigError(f"{option}: {max(values)} is above the limit {limit} = {top} "
                          "(raise it with COMPINV_LIMITS)")
    return values


def check_option(option: str, value, *, ge=None, gt=None, le=None, limit: str | None = None,
                 finite: bool = True):
    """One numeric option of any command: finite, within [ge|gt, le] and the configured limit."""
    import math

    from compinv_rt.core.errors import ConfigError

    if isinstance(value, float) and finite and not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number, got {value}")
    if ge is not None and value < ge:
        raise ConfigError(f"{option} must be >= {ge}, got {value}")
    if gt is not None and value <= gt:
        raise ConfigError(f"{option} must be > {gt}, got {value}")
    if le is not None and value > le:
        raise ConfigError(f"{option} must be <= {le}, got {value}")
    if limit is not None and value > getattr(limits(), limit):
        raise ConfigError(f"{option} must be <= {getattr(limits(), limit)} (limit {limit}; raise "
                          f"it with COMPINV_LIMITS), got {value}")
    return value


# --- JSONL job lines ----------------------------------------------------------------------------


StrictFinite = Annotated[Union[StrictInt, StrictFloat], Field(allow_inf_nan=False)]


class JobLine(_SamplingBounds):
    """One line of `generate --jobs FILE`. Strict: "5" is not a number, true is not 1."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: StrictStr
    id: Optional[Annotated[StrictStr, Field(pattern=JOB_ID)]] = None
    seed: Optional[Annotated[StrictInt, Field(ge=0, le=SEED_MAX)]] = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    negative_prompt: StrictStr = ""
    steps: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    guidance: Optional[Annotated[StrictFinite, Field(ge=0)]] = None
    height: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    width: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    concepts: Union[StrictStr, list[StrictStr]] = []
    layout: Optional[StrictStr] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if not v.strip():
            raise ValueError("the prompt is empty")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v, info):
        return _bound(info, "max_images", v)

    @model_validator(mode="after")
    def _last_seed(self):
        if self.seed is not None and self.seed + self.n - 1 > SEED_MAX:
            raise ValueError(f"seed + n - 1 must be <= {SEED_MAX} (item i uses seed + i)")
        return self


def check_job_line(obj: Any) -> JobLine:
    """A parsed JSON value -> JobLine, or ValueError with one line naming the field."""
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    try:
        return JobLine.model_validate(obj)
    except ValidationError as exc:
        raise ValueError(_first(exc, {})) from None


def loads_strict(text: str):
    """json.loads that refuses NaN/Infinity (not JSON; Python's json accepts them)."""
    def refuse(name):
        raise ValueError(f"{name} is not a JSON number")

    return json.loads(text, parse_constant=refuse)


def read_versioned_json(path, version_key: str, version, error: type[Exception], advice: str = ""):
    """A JSON file we wrote (artifact.json, manifest.json): parsed strictly, its schema version
    checked. Either problem is one `error` naming the file; the fields are the caller's check."""
    try:
        data = loads_strict(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})") from None
    if isinstance(data, dict) and data.get(version_key) != version:
        raise error(f"{path}: {version_key} {data.get(version_key)!r}, this compinv-rt reads "
                    f"{version_key} {version}{advice}")
    return data


# --- artifact.json (trained concepts) ------------------------------------------------------------


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    hash: StrictStr


class ArtifactRecord(BaseModel):
    """The fields of artifact.json that loading a concept relies on (others are informational)."""

    model_config = ConfigDict(extra="allow", strict=True)

    schema_version: Literal[1]
    token: Annotated[StrictStr, Field(min_length=1, max_length=100)]
    vectors: Annotated[StrictInt, Field(ge=1)]
    tokens: Optional[list[StrictStr]] = None
    class_word: StrictStr = ""
    base_model: BaseModelRef
    files: dict[StrictStr, Annotated[StrictStr, Field(pattern=SHA256)]]

    @field_validator("token")
    @classmethod
    def _token(cls, v):
        if v != v.strip() or not v or any(c.isspace() for c in v):
            raise ValueError("must be one word without spaces")
        return v

    @field_validator("vectors")
    @classmethod
    def _vectors(cls, v, info):
        return _bound(info, "max_vectors", v)

    @model_validator(mode="after")
    def _consistent(self):
        if "embeddings.safetensors" not in self.files:
            raise ValueError("files must list embeddings.safetensors with its sha256")
        if self.tokens is not None and len(self.tokens) != self.vectors:
            raise ValueError(f"tokens lists {len(self.tokens)} names for {self.vectors} vectors")
        return self


def _check_record(record: type[BaseModel], obj: Any, error: type[Exception], prefix: str) -> dict:
    """Validate a parsed JSON file against its record; one `error` line starting with `prefix`."""
    if not isinstance(obj, dict):
        raise error(f"{prefix}expected a JSON object, got {type(obj).__name__}")
    try:
        record.model_validate(obj)
    except ValidationError as exc:
        raise error(f"{prefix}{_first(exc, {})}") from None
    return obj


def check_artifact(obj: Any, path) -> dict:
    from compinv_rt.core.errors import ArtifactError

    return _check_record(ArtifactRecord, obj, ArtifactError, f"{path}: ")


# --- manifest.json (engines) -----------------------------------------------------------------------


class ProfileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    min: Annotated[StrictInt, Field(ge=1)]
    opt: Annotated[StrictInt, Field(ge=1)]
    max: Annotated[StrictInt, Field(ge=1)]

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min <= self.opt <= self.max:
            raise ValueError("needs min <= opt <= max")
        return self


class IORecord(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    in_channels: Annotated[StrictInt, Field(ge=1, le=64)]
    out_channels: Annotated[StrictInt, Field(ge=1, le=64)]
    text_len: Annotated[StrictInt, Field(ge=1, le=1024)]
    text_dim: Annotated[StrictInt, Field(ge=1, le=16384)]
    latent_height: Annotated[StrictInt, Field(ge=1, le=4096)]
    latent_width: Annotated[StrictInt, Field(ge=1, le=4096)]
    precision: Literal["fp32", "fp16", "bf16"]


class ManifestRecord(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    key: Annotated[StrictStr, Field(pattern=SHA256)]
    seal: Annotated[StrictStr, Field(pattern=SHA256)]
    schema_: Literal[2] = Field(alias="schema")
    format: Literal["onnx", "tensorrt", "aoti"]
    unet_hash: StrictStr
    io: IORecord
    profiles: Annotated[list[ProfileRecord], Field(min_length=1)]
    versions: dict[StrictStr, Optional[StrictStr]]
    device: Optional[StrictStr]
    options: dict[StrictStr, Union[StrictStr, StrictInt, StrictBool, None]] = {}
    artifacts: Annotated[dict[StrictStr, Annotated[StrictStr, Field(pattern=SHA256)]],
                         Field(min_length=1)]

    @field_validator("artifacts")
    @classmethod
    def _names(cls, v):
        for name in v:
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"artifact name {name!r} is not a plain file name")
        return v


def check_manifest(obj: Any, path) -> dict:
    from compinv_rt.core.errors import EngineMismatch

    return _check_record(ManifestRecord, obj, EngineMismatch, f"{path} is corrupt: ")


# --- prompts (need the tokenizer, which the caller has loaded) ----------------------------------

CONCEPT_TOKEN = re.compile(r"<[^<>\s]+>")


def check_concept_tokens(prompt: str, known: set[str], where: str = "the prompt") -> None:
    """A `<token>` that is no loaded concept would be read as plain text: refuse it."""
    from compinv_rt.core.errors import ConfigError

    unknown = [t for t in CONCEPT_TOKEN.findall(prompt) if t.lower() not in known]
    if unknown:
        raise ConfigError(f"{where} names {unknown[0]}, which is no loaded concept: pass its "
                          "folder with --concept (jobs: 'concepts')")


def check_prompt_length(tokenizer, prompt: str, where: str = "the prompt") -> None:
    """CLIP reads 77 tokens (with start and end): a longer prompt would be cut without a word."""
    from compinv_rt.core.errors import ConfigError

    n = len(tokenizer(prompt, truncation=False).input_ids)
    if n > tokenizer.model_max_length:
        raise ConfigError(f"{where} is {n} tokens (concept tokens expanded); the text encoder "
                          f"reads {tokenizer.model_max_length}: shorten it")
