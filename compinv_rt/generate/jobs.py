"""`compinv-rt generate --jobs FILE.jsonl`: many prompts, each with its own settings and seed,
packed into full UNet batches, streamed to disk as they finish, resumable after a crash.

An image is done when its JSON sidecar exists: the PNG is written (atomically) first, the sidecar
second, so after `kill -9` every image is either complete or absent, and `--resume` regenerates
exactly the missing ones. Names are deterministic (`<job id>_<index>.png`), so nothing is ever
duplicated.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from compinv_rt.core.errors import CompinvError, ConfigError

if TYPE_CHECKING:  # the session pulls in torch: reading and checking a jobs file must not
    from compinv_rt.generate.session import Request, SessionOptions


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


def parse_job(text: str, line: int, defaults: dict) -> Job:
    """One JSONL line -> Job; ValueError (one line naming the field) if it breaks the schema
    (compinv_rt.core.schemas.JobLine: types, bounds, finite numbers, safe ids)."""
    from compinv_rt.core.schemas import SEED_MAX, check_job_line, loads_strict

    try:
        obj = loads_strict(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    j = check_job_line(obj)
    seed = defaults["seed"] + line if j.seed is None else j.seed
    if seed + j.n - 1 > SEED_MAX:
        raise ValueError(f"seed: --seed + line number + n - 1 must be <= {SEED_MAX}, got {seed}")
    return Job(
        line=line, id=j.id or f"line{line:05d}", prompt=j.prompt, seed=seed, n=j.n,
        negative_prompt=j.negative_prompt,
        steps=defaults["steps"] if j.steps is None else j.steps,
        guidance=float(defaults["guidance"] if j.guidance is None else j.guidance),
        height=j.height, width=j.width,
        concepts=(j.concepts,) if isinstance(j.concepts, str) else tuple(j.concepts),
        layout=j.layout,
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
    from compinv_rt.core.schemas import limits

    total, top = sum(j.n for j in jobs), limits().max_jobs_images
    if total > top:
        raise ConfigError(f"jobs file {path} asks for {total} images; the limit max_jobs_images is "
                          f"{top} (split the file, or raise it with COMPINV_LIMITS)")
    return jobs, problems


def job_hash(job: Job, config: JobsConfig) -> str:
    """What decides a job's images (its line's settings and the run's sampler and bias options),
    hashed: --resume takes an image as done only if its sidecar holds the same hash."""
    import hashlib

    fields = {k: v for k, v in dataclasses.asdict(job).items() if k != "line"}
    fields.update(scheduler=config.scheduler, guidance_interval=list(config.guidance_interval),
                  bias_strength=config.bias_strength, bias_steps=config.bias_steps)
    if config.cache_interval != 1:  # hashes of uncached runs stay as they were
        fields.update(cache_interval=config.cache_interval)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def pending_items(jobs: list[Job], sink, model_files, resume: bool, summary: JobsSummary,
                  config: JobsConfig) -> list[Item]:
    """Items not yet done. Without `resume`, existing results are an error (never overwritten
    silently); jobs whose settings do not fit the model, or whose line changed since their images
    were made (same id, other settings), are reported and skipped."""
    from compinv_rt.sampling.pipeline import SamplingConfig

    items = []
    for job in jobs:
        try:
            SamplingConfig(job.steps, job.guidance, "ddim", job.height, job.width).resolved(model_files)
        except ConfigError as exc:
            summary.problems.append(f"line {job.line} ({job.id}): {exc}")
            continue
        done = [Item(job, i) for i in range(job.n) if sink.exists(f"{Item(job, i).name}.json")]
        if done and not resume:
            raise ConfigError(f"{sink.uri} already holds results of these jobs "
                              f"({done[0].name}.json): pass --resume to finish them, or a new --out")
        # A job's images all come from one version of its line (a changed one is refused), so
        # one sidecar tells.
        if done and _made_by_another_line(sink, done[0], job_hash(job, config)):
            summary.problems.append(
                f"line {job.line} ({job.id}): the line changed since its images in {sink.uri} were made "
                "(same id, other settings): give it a new id, or use another --out")
            continue
        summary.skipped += len(done)
        items += [Item(job, i) for i in range(job.n) if Item(job, i) not in done]
    return items


def _made_by_another_line(sink, item: Item, expected: str) -> bool:
    try:
        meta = json.loads(sink.read(f"{item.name}.json"))
    except (OSError, ValueError):
        return True  # unreadable: not proof of this line's image
    return not isinstance(meta, dict) or meta.get("job_hash") != expected


@dataclass(frozen=True)
class JobsConfig:
    """Everything a jobs run needs besides the jobs: plain values, so it travels to Ray workers."""

    options: SessionOptions
    scheduler: str = "ddim"
    concepts: tuple[str, ...] = ()  # every concept folder the jobs name (concept_folders)
    bias_strength: float = 2.0  # for jobs with a layout
    bias_steps: str = "0.2"
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # the --quality preset's (runtime.quality)
    cache_interval: int = 1  # the preset's DeepCache interval


def job_request(job: Job, config: JobsConfig) -> Request:
    """A job as a generation request (its layout, if any, becomes a bias; ConfigError if bad)."""
    from compinv_rt.generate.requests import RequestSpec, build_request
    from compinv_rt.spatial.plan import SpatialOptions

    spatial = SpatialOptions("bias", job.layout, config.bias_strength, config.bias_steps) if job.layout \
        else SpatialOptions()
    return build_request(RequestSpec(
        job.prompt, job.seed, job.n, job.negative_prompt, job.steps, job.guidance, config.scheduler,
        job.height, job.width, config.guidance_interval, tuple(job.concepts), spatial,
        config.cache_interval),
        backend=config.options.backend)


KILL_AFTER_ENV = "COMPINV_TEST_KILL_AFTER"  # "N:MARKER", for the kill tests only (kill_hook)


def kill_hook():
    """The kill tests' fault: with COMPINV_TEST_KILL_AFTER="N:MARKER" the process generating
    items kills itself (SIGKILL) after its N-th finished item, once per MARKER file; None when
    unset. A self-kill is deterministic and hits only this run (a local run, or one Ray worker)."""
    import os

    spec = os.environ.get(KILL_AFTER_ENV)
    if not spec:
        return None
    n, _, marker = spec.partition(":")
    count = [0]

    def hook():
        import signal

        count[0] += 1
        if count[0] >= int(n) and not (marker and os.path.exists(marker)):
            if marker:
                open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class JobRunner:
    """Everything one process needs to generate items: a GenerationSession (the model, its
    concepts and backends, opened once). The same object runs the local path and each Ray actor
    (compinv_rt.generate.scaleout)."""

    def __init__(self, sink, config: JobsConfig):
        from compinv_rt.generate.session import GenerationSession

        self.sink, self.config = sink, config
        # Concepts are per job: the session reads each folder once, when a job that names it
        # runs, and only that job's batch sees its token; a concept that cannot be read fails the
        # jobs that name it, alone (the session reports them).
        self.session = GenerationSession.open(config.options)
        self._after_item = kill_hook()  # counts this process's items over all run() calls

    def run(self, items: list[Item], summary: JobsSummary,
            on_image: Callable[[str], None] = lambda name: None) -> JobsSummary:
        """Generate `items` into the sink, packed into UNet batches. Each job's text, concepts and
        layout are prepared only when its batch runs, so memory stays flat however many jobs
        there are. A job that fails is reported once and its other items skipped."""
        from compinv_rt.generate.session import Task

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
            meta = self.session.sidecar(result, job_id=job.id, index=item.index, line=job.line,
                                        image=f"{item.name}.png", job_hash=job_hash(job, self.config))
            try:
                self.sink.write_png(f"{item.name}.png", result.image)
                self.sink.write_json(f"{item.name}.json", meta)  # written last: marks it done
            except OSError as exc:
                from compinv_rt.core.outputs import disk_error

                raise disk_error(exc, f"{summary.written} image(s) of this run are complete in "
                                      f"{self.sink.uri}; --resume finishes the rest") from None
            summary.written += 1
            on_image(item.name)
            if self._after_item is not None:
                self._after_item()
        return summary


FAILURES = "failures.jsonl"


def write_failures(sink, summary: JobsSummary) -> None:
    """One JSON line per failed job or bad line in `<out>/failures.jsonl` (the others ran); a
    run without failures removes the file of an earlier run."""
    if summary.problems:
        sink.write(FAILURES, "".join(json.dumps({"error": p}) + "\n" for p in summary.problems).encode())
    elif isinstance(getattr(sink, "root", None), Path) and sink.exists(FAILURES):
        (sink.root / FAILURES).unlink(missing_ok=True)


def concept_folders(jobs: list[Job]) -> tuple[str, ...]:
    """Every concept folder the jobs name, resolved, each once."""
    return tuple(sorted({str(Path(c).resolve()) for job in jobs for c in job.concepts}))
