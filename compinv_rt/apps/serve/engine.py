"""The server's engine: HTTP requests -> GenerationSession requests, batches -> PNGs + sidecars, and
the served concepts (a folder of trained concepts, changed live by uploads).

Everything about generation is the session's (compinv_rt.generate.session): the batch key, concepts (per
request: a batch sees only the concepts its requests name), prompt expansion, layouts, the
sidecar. This module only translates, keeps server paths and CLI flags out of what clients see,
and serializes concept changes with batches.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from compinv_rt.apps.serve.batcher import Cancelled
from compinv_rt.apps.serve.schemas import check_concept_name
from compinv_rt.apps.serve.settings import Limits
from compinv_rt.core.errors import ArtifactError, CompinvError, ConfigError

log = logging.getLogger(__name__)

STAGING = ".upload-"  # an upload being checked (hidden: never served)
TRASH = ".trash-"  # a deleted concept, renamed away before its files are removed
_FLAG = re.compile(r"--([a-z][a-z-]*)")  # CLI flags in session messages -> API field names


class ConceptExists(CompinvError):
    """A concept of that name is already served (answered 409)."""


class SessionEngine:
    def __init__(self, session, concepts_dir: Path, limits: Limits = Limits(), fixed_batch: bool = True):
        from compinv_rt.generate.stepper import StepLoop

        self.session = session
        # The step loop (apps.serve.step_batcher.StepBatcher drives it); fixed_batch: every UNet call
        # has 2 x max_batch rows, so an image never depends on its company (sampling.rows).
        self.loop = StepLoop(session, session.max_batch, fixed_batch, on_step=self._stepped)
        self.last_step_size = 0
        self.concepts_dir = Path(concepts_dir)
        self.limits = limits
        self._lock = threading.Lock()  # a batch or a concept change, never both at once
        self._served: dict[str, dict] = {}  # name -> {"folder", "token", ...}
        self.concepts_dir.mkdir(parents=True, exist_ok=True)
        for folder in sorted(p for p in self.concepts_dir.iterdir() if p.is_dir()):
            if folder.name.startswith((STAGING, TRASH)):  # an interrupted upload or delete
                log.warning("removing leftover %s", folder.name)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if folder.name.startswith("."):
                continue
            try:  # one bad folder must not keep the others from being served
                check_concept_name(folder.name)
                self._load(folder.name, folder)
            except (CompinvError, ValueError) as exc:
                log.warning("not serving concept folder %r: %s", folder.name, exc)

    # --- what the app calls ----------------------------------------------------------------

    def describe(self) -> dict:
        model = self.session.model
        return {"model": {"name": model.root.name, "hash": model.hash},
                "backend": self.session.backend.value}

    def warm_up(self, on_status: Callable[[str], None] = lambda msg: None) -> None:
        """Open (find or build) the backends of the native size before the first request."""
        size = self.session.model.files.default_size
        for guidance in (True, False):
            self.session.unet(size, size, guidance)
        on_status(f"backend {self.session.backend.value} ready for {size}x{size}")

    def plan(self, body) -> tuple[list, object]:
        """A validated API request -> the session's tasks and their batch key (cheap: no
        weights). Unknown concepts, malformed layouts and work over the cost limit raise here,
        before queueing."""
        from compinv_rt.generate.requests import RequestSpec, build_request
        from compinv_rt.sampling.quality import sampler_settings
        from compinv_rt.spatial.plan import SpatialOptions

        try:
            folders = []
            for name in body.concepts:
                if name not in self._served:
                    raise ConfigError(f"unknown concept {name!r}; served: {sorted(self._served) or 'none'}")
                folders.append(self._served[name]["folder"])
            attention = getattr(body, "attention", False)
            if attention and self.session.backend.value != "torch":
                raise ConfigError(f"attention heatmaps read the attention inside the UNet: this "
                                  f"server runs backend {self.session.backend.value}, they need torch")
            spatial = SpatialOptions(mode=body.spatial, layout=body.layout, strength=body.bias_strength,
                                     steps=body.bias_steps, decay=body.bias_decay,
                                     save_attention=attention)
            # quality, steps and scheduler mean what `generate`'s flags mean (sampling.quality)
            preset = sampler_settings(getattr(body, "quality", None), body.steps, body.scheduler, None)
            spec = RequestSpec(prompt=body.prompt, seed=body.seed, n=body.n,
                               negative_prompt=body.negative_prompt, steps=preset.steps,
                               guidance=body.guidance, scheduler=preset.scheduler.value,
                               height=body.height, width=body.width,
                               guidance_interval=preset.guidance_interval, concepts=tuple(folders),
                               spatial=spatial, cache_interval=preset.cache_interval)
            request = build_request(spec, backend=self.session.backend)
            tasks = self.session.tasks(request)
            key = self.session.batch_key(tasks[0])
        except CompinvError as exc:
            raise ConfigError(self.public(str(exc))) from None
        # One request may not hold the worker for long: n x steps x pixels is bounded.
        cost = body.n * key.steps * key.height * key.width
        if cost > self.limits.max_cost:
            raise ConfigError(f"the request's cost n x steps x height x width = {cost:,} is over this "
                              f"server's limit of {self.limits.max_cost:,}: fewer images, steps or "
                              "pixels")
        return tasks, key

    # --- the step loop (StepBatcher) --------------------------------------------------------

    def steppable(self, key) -> bool:
        return self.session.steppable(key)

    def room(self, task) -> bool:
        return self.loop.room(task)

    def admit(self, task):
        """Into the step loop (its text encoded now, under its own concepts); a bad request
        raises ConfigError (a 400) without touching the loop."""
        with self._lock:
            try:
                return self.loop.admit(task)
            except CompinvError as exc:
                raise ConfigError(self.public(str(exc))) from None

    def step(self) -> list:
        with self._lock:
            return self.loop.step()

    def drop(self, slot) -> None:
        self.loop.drop(slot)

    def result(self, slot) -> tuple:
        """A finished slot -> (PNG bytes, sidecar, largest batch it ran in, None)."""
        if slot.error is not None:
            raise ConfigError(self.public(str(slot.error)))
        return self._response(slot.image, slot.peak)

    def _stepped(self, stats) -> None:
        self.last_step_size = stats.size

    # --- whole batches (Batcher; StepBatcher for backward guidance and attention) -------------

    def run(self, tasks: Sequence, should_stop: Callable[[], bool],
            on_progress: Callable[[int, int], None] | None = None) -> list:
        """One UNet batch -> per task (PNG bytes, sidecar, batch size, attention or None), or
        the CompinvError that failed its request (a layout phrase missing from its prompt, say:
        a 400)."""
        errors: dict[int, CompinvError] = {}

        def on_error(request, exc):
            errors[id(request)] = ConfigError(self.public(str(exc)))

        def on_step(done, total):
            if should_stop():  # every client of this batch has gone or timed out: stop paying
                raise Cancelled()
            if on_progress is not None:
                on_progress(done, total)

        with self._lock:
            images = self.session.run_batch(tasks, on_step=on_step, on_error=on_error)
        made = {id(img.task): img for img in images}
        return [errors[id(t.request)] if id(t.request) in errors else self._response(made[id(t)], len(images))
                for t in tasks]

    def _response(self, img, batch_size: int) -> tuple:
        """(PNG bytes, sidecar, batch size, attention) of one image as clients see it: the
        sidecar names the model and concepts, never this machine's paths; attention (when asked
        for) is {"tokens": labels, "png_base64": heatmap grid}, as `generate --save-attention`."""
        from compinv_rt.generate.generation import image_name

        names = {str(info["folder"]): name for name, info in self._served.items()}
        sidecar = self.session.sidecar(img, index=img.index, image=image_name(img))
        sidecar["model"] = {"name": self.session.model.root.name, "hash": sidecar["model"]["hash"]}
        sidecar["concepts"] = [{"name": names.get(c["folder"], "?"), "token": c["token"],
                                "vectors": c["vectors"]} for c in sidecar["concepts"]]
        attention = None
        if img.attention is not None:
            import base64

            from compinv_rt.generate.generation import _attention_outputs

            with self.session.vocab.scope(img.concepts):  # its tokens label its heatmaps
                grid, shares = _attention_outputs(self.session, img)
            sidecar["attention"] = {"share": shares}
            attention = {"tokens": [s["token"] for s in shares],
                         "png_base64": base64.b64encode(_png_bytes(grid)).decode()}
        return _png_bytes(img.image), sidecar, batch_size, attention

    def list_concepts(self) -> list[dict]:
        return [{k: v for k, v in info.items() if k != "folder"}
                for _, info in sorted(self._served.items())]

    def add_concept(self, name: str, files: dict[str, bytes]) -> dict:
        """Validate an upload completely in a hidden folder, then move it in and load it; on any
        problem nothing changes (the served list, the folder, the model)."""
        from compinv_rt.models import artifact
        from compinv_rt.models.concepts import read_concept

        check_concept_name(name)
        if name in self._served or (self.concepts_dir / name).exists():
            raise ConceptExists(f"a concept named {name!r} is already served; DELETE it first")
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{name}-", dir=self.concepts_dir))
        try:
            (staging / artifact.EMBEDDINGS).write_bytes(files["embeddings"])
            (staging / artifact.ARTIFACT).write_bytes(files["artifact"])
            try:  # JSON, schema, hashes, base model, the token's shape (<name>, no real word)
                concept = read_concept(self.session.model, staging, self.session.vocab.base)
            except CompinvError as exc:
                raise ArtifactError(self.public(str(exc).replace(str(staging), name))) from None
            with self._lock:
                self._check_token_free(concept.token)
                final = self.concepts_dir / name
                staging.rename(final)
                try:
                    info = self._load(name, final)
                except CompinvError:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {k: v for k, v in info.items() if k != "folder"}

    def remove_concept(self, name: str) -> None:
        """Stop serving it, then delete its folder atomically: renamed to a hidden trash name
        first (a crash leaves either the whole folder or trash that start-up removes). Nothing
        of it stays in the model: concepts are known only to batches that name them."""
        with self._lock:
            info = self._served.pop(name)  # KeyError: 404
            self.session.forget(info["folder"])
            trash = self.concepts_dir / f"{TRASH}{name}-{uuid.uuid4().hex[:8]}"
            info["folder"].rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def public(self, message: str) -> str:
        """A session message as clients may see it: no server paths, no CLI flags."""
        for root in {str(self.concepts_dir.resolve()), str(self.concepts_dir)}:
            message = message.replace(root + "/", "")
        model = self.session.model.root
        message = message.replace(str(model), model.name)
        message = message.replace("pass its folder with --concept (jobs: 'concepts')",
                                  "name its concept in 'concepts'")
        return _FLAG.sub(lambda m: f"'{m.group(1).replace('-', '_')}'", message)

    # --- internals -------------------------------------------------------------------------

    def _check_token_free(self, token: str) -> None:
        clash = next((n for n, i in self._served.items() if i["token"].lower() == token.lower()), None)
        if clash is not None:
            raise ArtifactError(f"token {token!r} is already served by concept {clash!r}")

    def _load(self, name: str, folder: Path) -> dict:
        from compinv_rt.models.artifact import read_artifact

        # Checks the files, base model and token (<name>, no real word, no other concept's).
        (concept,) = self.session.read_concepts([folder])
        art = read_artifact(folder)
        info = {"name": name, "token": concept.token, "vectors": concept.vectors,
                "class_word": concept.class_word, "method": art.get("method"), "folder": folder}
        self._served[name] = info
        return info


def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
