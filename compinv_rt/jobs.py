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

from compinv_rt.errors import CompinvError, ConfigError
from compinv_rt.session import Request, SessionOptions

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
    jobs: list[Job] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
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


@dataclass(frozen=True)
class JobsConfig:
    """Everything a jobs run needs besides the jobs: plain values, so it travels to Ray workers."""

    options: SessionOptions
    scheduler: str = "ddim"
    concepts: tuple[str, ...] = ()  # every concept folder the jobs name (concept_folders)
    bias_strength: float = 2.0  # for jobs with a layout
    bias_steps: str = "0.2"


def job_request(job: Job, config: JobsConfig) -> Request:
    """A job as a generation request (its layout, if any, becomes a bias; ConfigError if bad)."""
    from compinv_rt.runtime.pipeline import SamplingConfig
    from compinv_rt.spatial.plan import SpatialConfig

    spatial = SpatialConfig()
    if job.layout:
        spatial = SpatialConfig.from_options("bias", job.layout, config.bias_strength,
                                             config.bias_steps, backend=config.options.backend,
                                             total_steps=job.steps)
    return Request(job.prompt, job.seed, job.n, job.negative_prompt,
                   SamplingConfig(job.steps, job.guidance, config.scheduler, job.height, job.width),
                   tuple(job.concepts), spatial)


class JobRunner:
    """Everything one process needs to generate items: a GenerationSession (the model, its
    concepts and backends, opened once). The same object runs the local path and each Ray actor
    (compinv_rt.scaleout)."""

    def __init__(self, sink, config: JobsConfig):
        from compinv_rt.session import GenerationSession

        self.sink, self.config = sink, config
        self.session = GenerationSession.open(config.options)
        # Every concept of the file joins the text encoder once; prompts without its token are
        # unaffected, so one model serves all jobs.
        self.session.load_concepts(config.concepts)

    def run(self, items: list[Item], summary: JobsSummary,
            on_image: Callable[[str], None] = lambda name: None) -> JobsSummary:
        """Generate `items` into the sink, packed into UNet batches. Each job's text, concepts and
        layout are prepared only when its batch runs, so memory stays flat however many jobs
        there are. A job that fails is reported once and its other items skipped."""
        from compinv_rt.session import Task

        requests: dict[str, Request] = {}
        jobs: dict[int, Job] = {}
        tasks = []
        for item in items:
            job = item.job
            if job.id not in requests:
                try:
                    requests[job.id] = job_request(job, self.config)
                except CompinvError as exc:
                    summary.problems.append(f"line {job.line} ({job.id}): {exc}")
                    requests[job.id] = None  # type: ignore[assignment]
                    continue
                jobs[id(requests[job.id])] = job
            if requests[job.id] is not None:
                tasks.append(Task(requests[job.id], item.index))

        def on_error(request: Request, exc: CompinvError) -> None:
            job = jobs[id(request)]
            summary.problems.append(f"line {job.line} ({job.id}): {exc}")

        for result in self.session.run(tasks, on_error=on_error):
            job = jobs[id(result.request)]
            item = Item(job, result.index)
            self.sink.write_png(f"{item.name}.png", result.image)
            meta = self.session.sidecar(result, job_id=job.id, index=item.index, line=job.line,
                                        image=f"{item.name}.png")
            self.sink.write_json(f"{item.name}.json", meta)  # written last: marks the item done
            summary.written += 1
            on_image(item.name)
        return summary


def concept_folders(jobs: list[Job]) -> tuple[str, ...]:
    """Every concept folder the jobs name, resolved, each once."""
    return tuple(sorted({str(Path(c).resolve()) for job in jobs for c in job.concepts}))
