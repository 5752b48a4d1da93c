"""`compinv-rt generate --jobs FILE.jsonl`: many prompts, each with its own settings and seed,
packed into full UNet batches, streamed to disk as they finish, resumable after a crash.

An image is done when its JSON sidecar exists: the PNG is written (atomically) first, the sidecar
second, so after `kill -9` every image is either complete or absent, and `--resume` regenerates
exactly the missing ones. Names are deterministic (`<job id>_<index>.png`), so nothing is ever
duplicated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compinv_rt.errors import ConfigError
from compinv_rt.runtime.batching import BatchKey, pack

FIELDS = {"prompt", "concepts", "layout", "seed", "n", "negative_prompt", "steps", "guidance",
          "height", "width", "id"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Job:
    line: int
    id: str
    prompt: str
    seed: int
    n: int = 1
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    concepts: tuple[str, ...] = ()
    layout: str | None = None


@dataclass(frozen=True)
class Item:
    job: Job
    index: int

    @property
    def seed(self) -> int:
        return self.job.seed + self.index

    @property
    def name(self) -> str:
        return f"{self.job.id}_{self.index:03d}"


@dataclass
class JobsSummary:
    written: int = 0
    skipped: int = 0  # already done (resume)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: message"

    @property
    def ok(self) -> bool:
        return not self.problems


def _typed(obj: dict, key: str, kind, default, check=None, what=""):
    if key not in obj:
        return default
    v = obj[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ValueError(f"'{key}' must be {what or kind.__name__}, got {v!r}")
    if check is not None and not check(v):
        raise ValueError(f"'{key}' must be {what}, got {v!r}")
    return v


def parse_job(text: str, line: int, defaults: dict) -> Job:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {sorted(FIELDS)}")
    prompt = _typed(obj, "prompt", str, None)
    if not prompt or not prompt.strip():
        raise ValueError("'prompt' is missing or empty")
    job_id = _typed(obj, "id", str, f"line{line:05d}", _ID.match, "letters, digits, _ . - (<= 100)")
    concepts = obj.get("concepts", [])
    if isinstance(concepts, str):
        concepts = [concepts]
    if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
        raise ValueError("'concepts' must be a list of concept folders")
    positive = lambda v: v >= 1  # noqa: E731
    return Job(
        line=line, id=job_id, prompt=prompt,
        seed=_typed(obj, "seed", int, defaults["seed"] + line, None, "an integer"),
        n=_typed(obj, "n", int, 1, positive, "an integer >= 1"),
        negative_prompt=_typed(obj, "negative_prompt", str, ""),
        steps=_typed(obj, "steps", int, defaults["steps"], positive, "an integer >= 1"),
        guidance=_typed(obj, "guidance", float, defaults["guidance"], lambda v: v >= 0, "a number >= 0"),
        height=_typed(obj, "height", int, None, positive, "a positive integer"),
        width=_typed(obj, "width", int, None, positive, "a positive integer"),
        concepts=tuple(concepts),
        layout=_typed(obj, "layout", str, None),
    )


def read_jobs(path: Path, defaults: dict) -> tuple[list[Job], list[str]]:
    """All valid jobs, and one message per malformed line (the others still run)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read jobs file {path}: {exc}") from None
    jobs, problems, seen = [], [], {}
    for no, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            job = parse_job(text, no, defaults)
            if job.id in seen:
                raise ValueError(f"duplicate id {job.id!r} (first on line {seen[job.id]})")
            seen[job.id] = no
            jobs.append(job)
        except ValueError as exc:
            problems.append(f"{path}:{no}: {exc}")
    if not jobs and not problems:
        raise ConfigError(f"jobs file {path} holds no jobs")
    return jobs, problems


def pending_items(jobs: list[Job], out: Path, model_files, resume: bool,
                  summary: JobsSummary, exists: Callable[[str], bool] | None = None) -> list[Item]:
    """Items not yet done. Without `resume`, existing results are an error (never overwritten
    silently); jobs whose settings do not fit the model are reported and skipped."""
    from compinv_rt.runtime.pipeline import SamplingConfig

    exists = exists or (lambda name: (Path(out) / name).exists())
    items = []
    for job in jobs:
        try:
            SamplingConfig(job.steps, job.guidance, "ddim", job.height, job.width).resolved(model_files)
        except ConfigError as exc:
            summary.problems.append(f"line {job.line} ({job.id}): {exc}")
            continue
        for i in range(job.n):
            item = Item(job, i)
            if exists(f"{item.name}.json"):
                if not resume:
                    raise ConfigError(f"{out} already holds results of these jobs "
                                      f"({item.name}.json): pass --resume to finish them, or a new --out")
                summary.skipped += 1
                continue
            items.append(item)
    return items


def generate_items(
    items: list[Item],
    sink,
    model,
    open_unet: Callable[[int, int], object],
    max_batch: int,
    scheduler: str,
    summary: JobsSummary,
    on_image: Callable[[str], None] = lambda name: None,
    prepare_item: Callable | None = None,
) -> JobsSummary:
    """Generate `items` into `sink` (an OutputSink), packed into UNet batches.

    `open_unet(height, width)` returns the backend for one image size (cached by the caller);
    `prepare_item(item, cfg) -> (bias_steps, make_bias)` gives an item's spatial settings, where
    `make_bias()` builds its (T, h, w) attention bias only when its batch runs (memory stays flat).
    """
    import torch

    from compinv_rt.outputs import image_metadata
    from compinv_rt.runtime.pipeline import Pipeline, SamplingConfig

    prepared: list[tuple[Item, SamplingConfig, int, Callable | None]] = []
    failed_jobs = set()
    for item in items:
        job = item.job
        if job.id in failed_jobs:
            continue
        cfg = SamplingConfig(job.steps, job.guidance, scheduler, job.height,
                             job.width).resolved(model.files)
        try:
            bias_steps, make_bias = prepare_item(item, cfg) if prepare_item else (0, None)
        except ConfigError as exc:
            summary.problems.append(f"line {job.line} ({job.id}): {exc}")
            failed_jobs.add(job.id)
            continue
        prepared.append((item, cfg, bias_steps, make_bias))

    def key(entry):
        item, cfg, bias_steps, _ = entry
        return (BatchKey(cfg.height, cfg.width, cfg.steps, cfg.scheduler.value, cfg.guidance),
                bias_steps)

    for (_, bias_steps), batch in pack(prepared, key, max_batch):
        cfg = batch[0][1]
        pipe = Pipeline(model, open_unet(cfg.height, cfg.width))
        bias = None
        if bias_steps:
            f = model.files.vae_scale_factor
            zeros = torch.zeros((77, cfg.height // f, cfg.width // f))
            bias = torch.stack([make() if make else zeros for _, _, _, make in batch])
        images = pipe.generate([e[0].job.prompt for e in batch], [e[0].seed for e in batch], cfg,
                               negative_prompts=[e[0].job.negative_prompt for e in batch],
                               attention_bias=bias, bias_steps=bias_steps)
        for (item, *_), image in zip(batch, images):
            sink.write_png(f"{item.name}.png", image)
            meta = image_metadata(item.job.prompt, item.job.negative_prompt, item.seed,
                                  cfg.as_dict(), model, getattr(pipe.backend, "name", "custom"),
                                  job_id=item.job.id, index=item.index, line=item.job.line,
                                  concepts=list(item.job.concepts), layout=item.job.layout,
                                  image=f"{item.name}.png")
            sink.write_json(f"{item.name}.json", meta)  # written last: marks the item done
            summary.written += 1
            on_image(item.name)
    return summary



class JobRunner:
    """Everything one process needs to generate items: the model and backends, opened once.
    The same object runs the local path and each Ray actor (compinv_rt.scaleout)."""

    def __init__(self, sink, model: str, device: str, backend: str, engine, max_batch: int,
                 scheduler: str):
        from compinv_rt.models.loading import load_model

        self.sink = sink
        self.model = load_model(model, device=device)
        self.backend, self.engine = backend, engine
        self.max_batch, self.scheduler = max_batch, scheduler
        self._unets = {}

    def open_unet(self, height: int, width: int):
        from compinv_rt.runtime.registry import open_backend

        if (height, width) not in self._unets:
            self._unets[(height, width)] = open_backend(
                self.backend, self.model, height, width, self.max_batch, guidance=True,
                engine=self.engine)
        return self._unets[(height, width)]

    def prepare_item(self, item: Item, cfg):
        if item.job.concepts or item.job.layout:
            raise ConfigError("per-job 'concepts' and 'layout' are not wired into --jobs yet")
        return 0, None

    def run(self, items: list[Item], summary: JobsSummary, on_image=lambda name: None) -> JobsSummary:
        return generate_items(items, self.sink, self.model, self.open_unet, self.max_batch,
                              self.scheduler, summary, on_image, self.prepare_item)
