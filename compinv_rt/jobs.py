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


@dataclass(frozen=True)
class Prepared:
    """An item ready to batch: its text with concept tokens expanded, and its spatial bias."""

    prompt: str
    negative_prompt: str
    bias: object | None = None  # (T, h, w) attention bias for the conditional half, or None


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
    bias_steps_of: Callable[[Item, object], int] = lambda item, cfg: 0,
) -> JobsSummary:
    """Generate `items` into `sink` (an OutputSink), packed into UNet batches.

    `open_unet(height, width)` returns the backend for one image size (cached by the caller).
    `bias_steps_of(item, cfg)` is the cheap part of an item's spatial settings, needed to pack;
    `prepare_item(item, cfg) -> Prepared` (text with concept tokens expanded, attention bias) runs
    only when the item's batch runs, so memory stays flat however many jobs there are. A job that
    cannot be prepared is reported and its other items skipped; the rest still run.
    """
    import torch

    from compinv_rt.outputs import image_metadata
    from compinv_rt.runtime.pipeline import Pipeline, SamplingConfig

    failed_jobs = set()

    def fail(job, exc):
        if job.id not in failed_jobs:
            summary.problems.append(f"line {job.line} ({job.id}): {exc}")
        failed_jobs.add(job.id)

    keyed = []
    for item in items:
        job = item.job
        cfg = SamplingConfig(job.steps, job.guidance, scheduler, job.height,
                             job.width).resolved(model.files)
        try:
            keyed.append((item, cfg, bias_steps_of(item, cfg)))
        except CompinvError as exc:
            fail(job, exc)

    def key(entry):
        item, cfg, bias_steps = entry
        return (BatchKey(cfg.height, cfg.width, cfg.steps, cfg.scheduler.value, cfg.guidance),
                bias_steps)

    for (_, bias_steps), entries in pack(keyed, key, max_batch):
        cfg = entries[0][1]
        batch = []
        for item, _, _ in entries:
            if item.job.id in failed_jobs:
                continue
            try:
                prep = (prepare_item(item, cfg) if prepare_item
                        else Prepared(item.job.prompt, item.job.negative_prompt))
            except CompinvError as exc:
                fail(item.job, exc)
                continue
            batch.append((item, prep))
        if not batch:
            continue
        pipe = Pipeline(model, open_unet(cfg.height, cfg.width))
        bias = None
        if bias_steps:
            f = model.files.vae_scale_factor
            zeros = torch.zeros((77, cfg.height // f, cfg.width // f))
            bias = torch.stack([p.bias if p.bias is not None else zeros for _, p in batch])
        images = pipe.generate([p.prompt for _, p in batch], [it.seed for it, _ in batch], cfg,
                               negative_prompts=[p.negative_prompt for _, p in batch],
                               attention_bias=bias, bias_steps=bias_steps)
        for (item, _), image in zip(batch, images):
            sink.write_png(f"{item.name}.png", image)
            meta = image_metadata(item.job.prompt, item.job.negative_prompt, item.seed,
                                  cfg.as_dict(), model, getattr(pipe.backend, "name", "custom"),
                                  job_id=item.job.id, index=item.index, line=item.job.line,
                                  concepts=list(item.job.concepts), layout=item.job.layout,
                                  bias_steps=bias_steps, image=f"{item.name}.png")
            sink.write_json(f"{item.name}.json", meta)  # written last: marks the item done
            summary.written += 1
            on_image(item.name)
    return summary


class JobRunner:
    """Everything one process needs to generate items: the model, its concepts and backends,
    opened once. The same object runs the local path and each Ray actor (compinv_rt.scaleout)."""

    def __init__(self, sink, model: str, device: str, backend: str, engine, max_batch: int,
                 scheduler: str, concepts: tuple[str, ...] = (), bias_strength: float = 2.0,
                 bias_steps: str = "0.2", precision: str = "auto"):
        from compinv_rt.models.loading import load_model
        from compinv_rt.train.artifact import load_concepts

        self.sink = sink
        self.model = load_model(model, device=device, dtype=precision)
        self.backend, self.engine = backend, engine
        self.max_batch, self.scheduler = max_batch, scheduler
        self.bias_strength, self.bias_steps = bias_strength, bias_steps
        # Every concept of the file joins the text encoder once; prompts without its token are
        # unaffected, so one model serves all jobs.
        self.concepts = {str(c.folder): c for c in load_concepts(self.model, list(concepts))}
        self._unets = {}

    def open_unet(self, height: int, width: int):
        from compinv_rt.runtime.registry import open_backend

        if (height, width) not in self._unets:
            self._unets[(height, width)] = open_backend(
                self.backend, self.model, height, width, self.max_batch, guidance=True,
                engine=self.engine)
        return self._unets[(height, width)]

    def prepare_item(self, item: Item, cfg) -> Prepared:
        from compinv_rt.train.artifact import expand_prompt

        job = item.job
        concepts = [self.concepts[str(Path(c).resolve())] for c in job.concepts]
        prompt = expand_prompt(job.prompt, concepts)
        negative = expand_prompt(job.negative_prompt, concepts)
        if not job.layout:
            return Prepared(prompt, negative)
        from compinv_rt.spatial.plan import plan_spatial

        plan = plan_spatial(self._spatial(job, cfg), self.model,
                            self.open_unet(cfg.height, cfg.width), prompt, 1, cfg,
                            expand=lambda phrase: expand_prompt(phrase, concepts))
        return Prepared(prompt, negative, plan.kwargs["attention_bias"][0])  # (T, h, w)

    def _spatial(self, job: Job, cfg):
        from compinv_rt.spatial.plan import SpatialConfig

        return SpatialConfig.from_options("bias", job.layout, self.bias_strength, self.bias_steps,
                                          backend=self.backend, total_steps=cfg.steps)

    def bias_steps_of(self, item: Item, cfg) -> int:
        """Validates the job's layout text early (cheap) and says how many steps get its bias."""
        if not item.job.layout:
            return 0
        from compinv_rt.spatial.bias_maps import resolve_steps

        return resolve_steps(self._spatial(item.job, cfg).steps, cfg.steps)

    def run(self, items: list[Item], summary: JobsSummary, on_image=lambda name: None) -> JobsSummary:
        return generate_items(items, self.sink, self.model, self.open_unet, self.max_batch,
                              self.scheduler, summary, on_image, self.prepare_item,
                              self.bias_steps_of)


def concept_folders(jobs: list[Job]) -> tuple[str, ...]:
    """Every concept folder the jobs name, resolved, each once."""
    return tuple(sorted({str(Path(c).resolve()) for job in jobs for c in job.concepts}))
