"""The one orchestration above the denoise loop: requests in, images and sidecars out.

Every caller generates through a `GenerationSession`: `generate` (one prompt), `generate --jobs`
(compinv_rt.generate.jobs), the Ray workers (compinv_rt.generate.scaleout), `eval` (compinv_rt.apps.eval.runner) and
`bench`; an online server uses it the same way.

API
---
    options = SessionOptions(model=None, device="auto", precision=Precision.auto,
                             backend=Backend.torch, engine=None, max_batch=8)
    session = GenerationSession.open(options, on_status=print)   # loads the model once

    request = build_request(RequestSpec(   # compinv_rt.generate.requests: the one builder
        prompt="a <my-heart> heart and a blue circle", seed=3, n=4, steps=25, guidance=7.5,
        concepts=("concepts/heart",),
        spatial=SpatialOptions("bias", "<my-heart> heart=0.1,0.2,0.5,0.8")))
    session.check(request)            # cheap validation (no weights): raises CompinvError
    for image in session.run(session.tasks(request)):   # GeneratedImage, in batch order
        image.image.save(...); json.dump(session.sidecar(image, index=image.index), ...)

* A `Request` is typed and immutable (hashable): prompt, negative prompt, first seed and count
  (image i uses seed + i), sampling (steps, guidance, sampler, size), concept folders, and the
  spatial settings (`SpatialConfig`: mode none/bias/guidance, a `LayoutSpec` of explicit boxes
  (`layouts.boxes_layout`), `auto` or phrases for the layout model, bias strength and steps,
  guidance knobs, --save-attention).
* A `Task` is one image of a request: `(request, index)`; its seed is `request.seed + index`. Jobs
  that resume pass only the missing tasks; a server passes tasks of many clients' requests.
* `session.batch_key(task)` says which tasks may share one UNet batch: same size, steps, sampler,
  guidance scale and the same kind of spatial regularization (mode and number of regularized
  steps; --save-attention). Prompts, negative prompts, seeds, concepts, layouts and bias strengths
  are per image, so tasks of different requests with equal keys can be packed together, and each
  image depends only on its own request (its own seed's noise, its own text, its own bias map or
  guidance loss), whatever else is in the batch.
* `session.run(tasks, on_error=...)` packs tasks into batches of at most `max_batch` (equal keys,
  input order kept: `runtime.batching.pack`) and yields `GeneratedImage`s as each batch finishes;
  `session.run_batch(tasks)` runs one batch of equal keys (a server that does its own packing
  calls this). A request that fails (bad concept folder, bad layout phrase) is reported once to
  `on_error(request, exc)` and its other tasks are skipped; without `on_error` the error is raised.
* Concepts are per request: a concept folder is read and checked once per session
  (`read_concepts`, cached), and its token is known to the tokenizer and text encoder only while
  a batch with a request that names it runs (`concepts.ConceptVocabulary.scope`). A prompt may
  write a `<token>` only of its own concepts, so whatever else is served, a request's image
  depends only on its own concepts. `load_concepts` and `run` also keep them known to
  `model.tokenizer` between batches, for callers that tokenize prompts themselves (eval,
  `generate`'s attention labels); no batch depends on that.
* UNet backends are opened once per (height, width, classifier-free guidance) and kept.
* Step-level batching (compinv_rt.generate.stepper.StepLoop, the server's loop): `start(task,
  unet)` makes one task's per-sample state alone (its concepts, text, layout, bias, noise,
  scheduler), `finish(started, unet)` decodes it; `steppable(key)` says which keys can join such
  a loop (not backward guidance or attention capture, which read whole batches).
* `session.sidecar(image, **extra)` is the JSON sidecar of one image (enough to regenerate it);
  callers add their own fields (job id, file name, attention heatmap).
* A session is not thread-safe (a batch's concepts are written into the text encoder's table):
  run its batches from one thread; scale out with one session per process (the Ray workers do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from compinv_rt.core.errors import CompinvError, ConfigError, NonFiniteError, NonFiniteOutput
from compinv_rt.engines.registry import DEFAULT_ENGINES, Backend
from compinv_rt.generate.options import SessionOptions
from compinv_rt.sampling.pipeline import SamplingConfig
from compinv_rt.sampling.schedulers import SchedulerName
from compinv_rt.spatial.layouts import SpatialMode
from compinv_rt.spatial.plan import SpatialConfig

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from compinv_rt.models.concepts import Concept
    from compinv_rt.models.loading import LoadedModel
    from compinv_rt.sampling.denoise import StepCallback
    from compinv_rt.sampling.rows import RowSample
    from compinv_rt.spatial.guidance import GuidanceConfig
    from compinv_rt.spatial.layouts import Layout

StatusCallback = Callable[[str], None]
ErrorCallback = Callable[["Request", CompinvError], None]


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int = 0
    n: int = 1
    negative_prompt: str = ""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    concepts: tuple[str, ...] = ()  # trained concept folders (`compinv-rt train --out`)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)


@dataclass(frozen=True)
class Task:
    """One image of a request."""

    request: Request
    index: int

    @property
    def seed(self) -> int:
        return self.request.seed + self.index


@dataclass
class GeneratedImage:
    task: Task
    image: Image
    text: str  # the prompt as encoded (concept tokens expanded)
    sampling: SamplingConfig  # resolved: the size is filled in
    concepts: list[Concept]
    layout: Layout | None
    spatial: dict  # the sidecar's spatial block
    backend: str
    attention: torch.Tensor | None = None  # (T, h, w) mean cross-attention (--save-attention)
    provider: str | None = None  # onnxruntime: the execution provider that actually ran

    @property
    def request(self) -> Request:
        return self.task.request

    @property
    def index(self) -> int:
        return self.task.index

    @property
    def seed(self) -> int:
        return self.task.seed


@dataclass(frozen=True)
class BatchKey:
    """Tasks with equal keys can share one UNet batch."""

    height: int
    width: int
    steps: int
    scheduler: str
    guidance: float
    spatial: SpatialMode  # none, bias, adaptive or guidance (a bias on 0 steps: none)
    regularized_steps: int
    save_attention: bool
    guidance_config: GuidanceConfig | None = None  # the guidance knobs (guidance mode only)
    bias_decay: float | None = None  # the adaptive bias's gain schedule (adaptive mode only)
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # steps with the unconditional pass
    cache_interval: int = 1  # DeepCache: a full UNet step every N steps


@dataclass
class _Prepared:
    """A request's per-batch work: expanded text and resolved layout (dropped after the batch)."""

    text: str
    negative: str
    concepts: list[Concept]
    layout: Layout | None


@dataclass(eq=False)
class Started:
    """One task admitted to a step loop (compinv_rt.generate.stepper): its sample state (noise,
    scheduler, text states, bias) and what its GeneratedImage needs."""

    task: Task
    sample: RowSample
    prepared: _Prepared
    sampling: SamplingConfig  # resolved


class GenerationSession:
    def __init__(self, model: LoadedModel, backend: Backend | str = Backend.torch,
                 engine: Path | None = None, engines_root: Path = DEFAULT_ENGINES,
                 max_batch: int = 8, on_status: StatusCallback | None = None):
        from compinv_rt.models.concepts import ConceptVocabulary
        from compinv_rt.spatial.plan import LayoutResolver

        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.backend = Backend(backend)
        self.engine, self.engines_root = engine, Path(engines_root)
        self.max_batch = max_batch
        self.on_status = on_status
        self.concepts: dict[str, Concept] = {}  # resolved folder -> concept read from it
        self.vocab = ConceptVocabulary(model)  # from here on, model.tokenizer follows its scopes
        self._pinned: dict[str, Concept] = {}  # load_concepts: known between batches too
        self._unets: dict[tuple[int, int, bool, bool], object] = {}
        self._layouts = LayoutResolver(model, on_status)

    @classmethod
    def open(cls, options: SessionOptions,
             on_status: StatusCallback | None = None) -> GenerationSession:
        from compinv_rt.models.loading import load_model

        model = load_model(options.model, device=options.device, dtype=options.precision)
        return cls(model, options.backend, options.engine, options.engines_root, options.max_batch,
                   on_status)

    # --- concepts and text ---------------------------------------------------------------

    def read_concepts(self, folders: Iterable[str | Path]) -> list[Concept]:
        """The concepts of `folders`, in order, each read and checked once (cached); nothing joins
        the tokenizer. Refuses a token that another concept of this session already has."""
        from compinv_rt.core.errors import ArtifactError
        from compinv_rt.models.concepts import read_concept

        out = []
        for f in folders:
            if _key(f) not in self.concepts:
                concept = read_concept(self.model, f, self.vocab.base)
                clash = next((c for c in self.concepts.values()
                              if c.token.lower() == concept.token.lower()), None)
                if clash is not None:
                    raise ArtifactError(f"concepts {clash.folder} and {f} use the same token "
                                        f"{concept.token!r}")
                self.concepts[_key(f)] = concept
            out.append(self.concepts[_key(f)])
        return out

    def load_concepts(self, folders: Iterable[str | Path]) -> list[Concept]:
        """`read_concepts`, and keep their tokens in `model.tokenizer` between batches (with
        their ids in `token_ids`), for callers that tokenize prompts themselves. Generation never
        depends on it: each batch sees only its own requests' concepts."""
        concepts = self.read_concepts(folders)
        ids = self._pin(concepts)
        return [replace(c, token_ids=ids[c.token]) for c in concepts]

    def _pin(self, concepts: Iterable[Concept]) -> dict[str, tuple[int, ...]]:
        for c in concepts:
            self._pinned.setdefault(_key(c.folder), c)
        return self.vocab.activate(self._pinned.values())

    def forget(self, folder: str | Path) -> None:
        """Drop a concept folder from the cache (it was deleted or replaced)."""
        self.concepts.pop(_key(folder), None)
        if self._pinned.pop(_key(folder), None) is not None:
            self.vocab.activate(self._pinned.values())

    @staticmethod
    def expand(text: str, concepts: list[Concept]) -> str:
        """`text` with each concept's token expanded to all its vectors."""
        from compinv_rt.models.concepts import expand_prompt

        return expand_prompt(text, concepts)

    # --- requests, tasks, batches --------------------------------------------------------

    def check(self, request: Request) -> SamplingConfig:
        """Cheap validation against the model (no weights touched); the resolved sampling."""
        if request.n < 1:
            raise ConfigError(f"n must be >= 1, got {request.n}")
        if not request.prompt.strip():
            raise ConfigError("the prompt is empty")
        return request.sampling.resolved(self.model.files)

    @staticmethod
    def tasks(request: Request) -> list[Task]:
        return [Task(request, i) for i in range(request.n)]

    def batch_key(self, task: Task) -> BatchKey:
        cfg = self.check(task.request)
        spatial = task.request.spatial
        steps = spatial.regularized_steps(cfg.steps)
        mode = spatial.mode
        if mode in (SpatialMode.bias, SpatialMode.adaptive) and steps == 0:
            mode = SpatialMode.none  # a bias on no step changes nothing
        return BatchKey(*cfg.size, cfg.steps, SchedulerName(cfg.scheduler).value, cfg.guidance, mode,
                        0 if mode is SpatialMode.none else steps, spatial.save_attention,
                        spatial.guidance if mode is SpatialMode.guidance else None,
                        spatial.decay if mode is SpatialMode.adaptive else None, cfg.guidance_interval,
                        cfg.cache_interval)

    def run(self, tasks: Iterable[Task], on_step: StepCallback | None = None,
            on_error: ErrorCallback | None = None) -> Iterator[GeneratedImage]:
        """Pack `tasks` into batches and yield their images as each batch finishes."""
        from compinv_rt.generate.batching import pack

        failed: set[int] = set()
        keyed = []
        for task in tasks:
            try:
                keyed.append((task, self.batch_key(task)))
            except CompinvError as exc:
                self._fail(task.request, exc, failed, on_error)
        for _, entries in pack(keyed, lambda entry: entry[1], self.max_batch):
            batch = [task for task, _ in entries if id(task.request) not in failed]
            images = self.run_batch(batch, on_step, on_error, failed)
            # Callers that read token positions after a run (`generate`'s attention labels) see
            # its concepts; batches never depend on this (each sees only its own concepts).
            self._pin(c for image in images for c in image.concepts)
            yield from images

    def run_batch(self, tasks: list[Task], on_step: StepCallback | None = None,
                  on_error: ErrorCallback | None = None,
                  failed: set[int] | None = None) -> list[GeneratedImage]:
        """One UNet batch of tasks with equal `batch_key`s."""
        failed = set() if failed is None else failed
        concepts: dict[int, list[Concept]] = {}
        for task in tasks:
            req = task.request
            if id(req) not in failed and id(req) not in concepts:
                try:
                    concepts[id(req)] = self.read_concepts(req.concepts)
                except CompinvError as exc:
                    self._fail(req, exc, failed, on_error)
        # The tokenizer and text encoder know this batch's concepts only while it runs.
        with self.vocab.scope(c for task in tasks if id(task.request) not in failed
                              for c in concepts[id(task.request)]):
            return self._run_scoped(tasks, concepts, on_step, on_error, failed)

    def _run_scoped(self, tasks: list[Task], concepts: dict[int, list[Concept]],
                    on_step: StepCallback | None, on_error: ErrorCallback | None,
                    failed: set[int]) -> list[GeneratedImage]:
        from compinv_rt.sampling.denoise import chain_hooks, progress_hook
        from compinv_rt.sampling.pipeline import Pipeline
        from compinv_rt.spatial.plan import spatial_inputs

        prepared: dict[int, _Prepared] = {}
        batch = []
        for task in tasks:
            req = task.request
            if id(req) in failed:
                continue
            try:
                if id(req) not in prepared:
                    prepared[id(req)] = self._prepare(req, concepts[id(req)])
            except CompinvError as exc:
                self._fail(req, exc, failed, on_error)
                continue
            batch.append(task)
        if not batch:
            return []
        key = self.batch_key(batch[0])
        if any(self.batch_key(t) != key for t in batch[1:]):
            raise ConfigError("run_batch needs tasks with equal batch keys (see batch_key)")
        cfg = self.check(batch[0].request)
        preps = [prepared[id(t.request)] for t in batch]
        height, width = cfg.size
        pipe = Pipeline(self.model, self.unet(height, width, cfg.guidance > 1.0, cfg.cache_interval > 1))
        f = self.model.files.vae_scale_factor
        module = pipe.torch_module("--spatial guidance") if key.spatial is SpatialMode.guidance else None
        inputs = spatial_inputs(key, [p.layout for p in preps], [t.request.spatial.strength for t in batch],
                                module, (height // f, width // f), self.model.files.text_len)
        hook = chain_hooks(progress_hook(on_step) if on_step is not None else None, inputs.guidance)
        try:
            images = pipe.generate([p.text for p in preps], [t.seed for t in batch], cfg,
                                   negative_prompts=[p.negative for p in preps], hook=hook,
                                   bias=inputs.bias, attention_recorder=inputs.attention_recorder)
        except NonFiniteOutput as exc:  # NaN/Inf never reach disk: fail those requests only
            images = exc.images
            bad: dict[int, list[Task]] = {}
            for j in exc.bad:
                bad.setdefault(id(batch[j].request), []).append(batch[j])
            for tasks_of in bad.values():
                seeds = ", ".join(str(t.seed) for t in tasks_of)
                self._fail(tasks_of[0].request, NonFiniteError(
                    f"image(s) of seed {seeds} came out non-finite (NaN/Inf; a diverged concept "
                    "embedding or extreme settings?): nothing written for them"), failed, on_error)
        maps = inputs.attention_recorder.maps() if inputs.attention_recorder is not None else None
        history = inputs.guidance.history if inputs.guidance is not None else None
        return [GeneratedImage(
            task, image, prep.text, cfg, prep.concepts, prep.layout,
            task.request.spatial.sidecar(cfg.steps, prep.layout, history, j), pipe.backend.name,
            None if maps is None else maps[j], getattr(pipe.backend, "provider", None))
            for j, (task, prep, image) in enumerate(zip(batch, preps, images)) if image is not None]

    # --- one task at a time, for a step loop (compinv_rt.generate.stepper) -------------------

    def steppable(self, key: BatchKey) -> bool:
        """Can tasks of this key join a step loop: backward guidance needs gradients through the
        whole batch and attention capture reads whole batches, so those run with run_batch; so
        does DeepCache (the features of a batch's last full step serve its next steps)."""
        return (key.spatial is not SpatialMode.guidance and not key.save_attention
                and key.cache_interval == 1)

    def start(self, task: Task, unet) -> Started:
        """A task's per-sample state, made as run_batch makes a batch's (concepts read, text
        expanded and encoded under its own concept scope, layout resolved, bias maps, seeded
        noise): alone, so it depends on nothing else in the loop. Raises CompinvError."""
        from compinv_rt.sampling.pipeline import Pipeline
        from compinv_rt.sampling.rows import RowSample
        from compinv_rt.spatial.plan import spatial_inputs

        key = self.batch_key(task)
        if not self.steppable(key):
            raise ConfigError("--spatial guidance and --save-attention run whole batches (run_batch)")
        cfg, req = self.check(task.request), task.request
        concepts = self.read_concepts(req.concepts)
        f = self.model.files.vae_scale_factor
        with self.vocab.scope(concepts):
            prep = self._prepare(req, concepts)
            inputs = spatial_inputs(key, [prep.layout], [req.spatial.strength], None,
                                    (cfg.size[0] // f, cfg.size[1] // f), self.model.files.text_len)
            scheduler, latents, denoiser = Pipeline(self.model, unet).start(
                [prep.text], [task.seed], cfg, [prep.negative], inputs.bias)
        return Started(task, RowSample(latents, scheduler, denoiser), prep, cfg)

    def finish(self, started: Started, unet) -> GeneratedImage:
        """The image of a finished task (NonFiniteError when it came out NaN/Inf)."""
        from compinv_rt.sampling.pipeline import Pipeline

        task, prep, cfg = started.task, started.prepared, started.sampling
        try:
            (image,) = Pipeline(self.model, unet).decode(started.sample.latents)
        except NonFiniteOutput:
            raise NonFiniteError(f"the image of seed {task.seed} came out non-finite (NaN/Inf; a "
                                 "diverged concept embedding or extreme settings?)") from None
        return GeneratedImage(task, image, prep.text, cfg, prep.concepts, prep.layout,
                              task.request.spatial.sidecar(cfg.steps, prep.layout), unet.name,
                              None, getattr(unet, "provider", None))

    def generate(self, request: Request, on_step: StepCallback | None = None) -> list[GeneratedImage]:
        """All images of one request (errors raised)."""
        return list(self.run(self.tasks(request), on_step))

    def sidecar(self, result: GeneratedImage, **extra) -> dict:
        """The JSON sidecar of one image: enough to regenerate it exactly."""
        from compinv_rt.core.outputs import image_metadata

        req = result.request
        concepts = [{"folder": str(c.folder), "token": c.token, "vectors": c.vectors}
                    for c in result.concepts]
        if result.provider:
            extra = {"provider": result.provider, **extra}
        return image_metadata(req.prompt, req.negative_prompt, result.seed,
                              result.sampling.as_dict(), self.model, result.backend,
                              concepts=concepts, spatial=result.spatial, **extra)

    # --- backends ------------------------------------------------------------------------

    def unet(self, height: int, width: int, guidance: bool, deep_cache: bool = False):
        """The backend for one image size, opened once (engines: found, verified or built);
        `deep_cache`: one with DeepCache's shallow path (an engine with both graphs)."""
        from compinv_rt.engines.registry import BatchShape, open_backend

        key = (height, width, guidance, deep_cache)
        if key not in self._unets:
            self._unets[key] = open_backend(
                self.backend, self.model, BatchShape(height, width, self.max_batch, guidance, deep_cache),
                engine=self.engine, engines_root=self.engines_root, on_status=self.on_status)
        return self._unets[key]

    def wrap_unet(self, height: int, width: int, guidance: bool, wrap: Callable, deep_cache: bool = False):
        """Replace the backend for this size by `wrap(backend)` (e.g. a timer); returns it."""
        key = (height, width, guidance, deep_cache)
        self._unets[key] = wrap(self.unet(height, width, guidance, deep_cache))
        return self._unets[key]

    # --- internals -----------------------------------------------------------------------

    def _prepare(self, request: Request, concepts: list[Concept]) -> _Prepared:
        from compinv_rt.core.schemas import check_concept_tokens, check_prompt_length

        known = {c.token.lower() for c in concepts}
        check_concept_tokens(request.prompt, known)  # a <token> without its concept
        check_concept_tokens(request.negative_prompt, known, "the negative prompt")
        text = self.expand(request.prompt, concepts)
        negative = self.expand(request.negative_prompt, concepts)
        check_prompt_length(self.model.tokenizer, text)  # never cut without a word
        check_prompt_length(self.model.tokenizer, negative, "the negative prompt")
        layout = self._layouts(request.spatial, text, lambda phrase: self.expand(phrase, concepts))
        return _Prepared(text, negative, concepts, layout)

    @staticmethod
    def _fail(request: Request, exc: CompinvError, failed: set[int],
              on_error: ErrorCallback | None) -> None:
        if on_error is None:
            raise exc
        if id(request) not in failed:
            failed.add(id(request))
            on_error(request, exc)


def _key(folder: str | Path) -> str:
    return str(Path(folder).resolve())
