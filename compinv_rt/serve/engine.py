"""The server's engine: HTTP requests -> GenerationSession requests, batches -> PNGs + sidecars, and
the served concepts (a folder of trained concepts, changed live by uploads).

Everything about generation is the session's (compinv_rt.session): the batch key, concept
loading, prompt expansion, layouts, the sidecar. This module only translates, and serializes
concept changes with batches (the text encoder's token table is shared by both).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from compinv_rt.errors import ArtifactError, CompinvError, ConfigError
from compinv_rt.serve.batcher import Cancelled
from compinv_rt.serve.schemas import check_concept_name

log = logging.getLogger(__name__)


class ConceptExists(CompinvError):
    """A concept of that name is already served (answered 409)."""


class SessionEngine:
    def __init__(self, session, concepts_dir: Path):
        self.session = session
        self.concepts_dir = Path(concepts_dir)
        self._lock = threading.Lock()  # a batch or a concept change, never both at once
        self._served: dict[str, dict] = {}  # name -> {"folder", "token", ...}
        self._retired: set[str] = set()  # tokens of removed concepts (still in the tokenizer)
        self.concepts_dir.mkdir(parents=True, exist_ok=True)
        for folder in sorted(p for p in self.concepts_dir.iterdir() if p.is_dir()):
            if folder.name.startswith("."):
                continue  # an interrupted upload
            check_concept_name(folder.name)
            self._load(folder.name, folder)

    # --- what the app calls ----------------------------------------------------------------

    def describe(self) -> dict:
        model = self.session.model
        return {"model": {"path": str(model.root), "hash": model.hash},
                "backend": self.session.backend.value}

    def warm_up(self, on_status: Callable[[str], None] = lambda msg: None) -> None:
        """Open (find or build) the backends of the native size before the first request."""
        size = self.session.model.files.default_size
        for guidance in (True, False):
            self.session.unet(size, size, guidance)
        on_status(f"backend {self.session.backend.value} ready for {size}x{size}")

    def plan(self, body) -> tuple[list, object]:
        """A validated API request -> the session's tasks and their batch key (cheap: no
        weights). Unknown concepts and malformed layouts raise here, before queueing."""
        from compinv_rt.runtime.pipeline import SamplingConfig
        from compinv_rt.session import Request
        from compinv_rt.spatial.plan import SpatialConfig

        folders = []
        for name in body.concepts:
            if name not in self._served:
                raise ConfigError(f"unknown concept {name!r}; served: {sorted(self._served) or 'none'}")
            folders.append(self._served[name]["folder"])
        spatial = SpatialConfig.from_options(body.spatial, body.layout, body.bias_strength,
                                             body.bias_steps, backend=self.session.backend,
                                             total_steps=body.steps, decay=body.bias_decay)
        sampling = SamplingConfig(body.steps, body.guidance, body.scheduler, body.height, body.width)
        request = Request(prompt=body.prompt, seed=body.seed, n=body.n,
                          negative_prompt=body.negative_prompt, sampling=sampling,
                          concepts=tuple(folders), spatial=spatial)
        tasks = self.session.tasks(request)
        return tasks, self.session.batch_key(tasks[0])

    def run(self, tasks: Sequence, should_stop: Callable[[], bool]) -> list:
        """One UNet batch -> per task (PNG bytes, sidecar, batch size), or the CompinvError that
        failed its request (a layout phrase missing from its prompt, say: a 400)."""
        from compinv_rt.outputs import slug

        errors: dict[int, CompinvError] = {}

        def on_error(request, exc):
            errors[id(request)] = exc

        def on_step(done, total):
            if should_stop():  # every client of this batch has gone: stop paying for it
                raise Cancelled()

        with self._lock:
            images = self.session.run_batch(tasks, on_step=on_step, on_error=on_error)
        made = {id(img.task): img for img in images}
        out: list[tuple[bytes, dict, int] | CompinvError] = []
        for task in tasks:
            if id(task.request) in errors:
                out.append(errors[id(task.request)])
                continue
            img = made[id(task)]
            name = f"{slug(task.request.prompt)}_{img.seed}.png"  # what `generate` names it
            sidecar = self.session.sidecar(img, index=task.index, image=name)
            out.append((_png_bytes(img.image), sidecar, len(images)))
        return out

    def list_concepts(self) -> list[dict]:
        return [{k: v for k, v in info.items() if k != "folder"}
                for _, info in sorted(self._served.items())]

    def add_concept(self, name: str, files: dict[str, bytes]) -> dict:
        """Validate an upload completely in a hidden folder, then move it in and load it; on any
        problem nothing changes (the served list, the folder, the text encoder)."""
        from compinv_rt.train import artifact

        check_concept_name(name)
        if name in self._served or (self.concepts_dir / name).exists():
            raise ConceptExists(f"a concept named {name!r} is already served; DELETE it first")
        try:
            art = json.loads(files["artifact"])
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{artifact.ARTIFACT} is not valid JSON ({exc})") from None
        if isinstance(art, dict) and str(art.get("token", "")).lower() in self._retired:
            raise ConceptExists(f"token {art['token']!r} belonged to a removed concept and stays in "
                                "the tokenizer until the server restarts; train it under a new token "
                                "or restart the server")
        staging = Path(tempfile.mkdtemp(prefix=f".upload-{name}-", dir=self.concepts_dir))
        try:
            (staging / artifact.EMBEDDINGS).write_bytes(files["embeddings"])
            (staging / artifact.ARTIFACT).write_bytes(files["artifact"])
            art = artifact.read_artifact(staging)  # schema, fields, embeddings hash
            artifact.check_base_model(art, name, self.session.model.hash)
            artifact.read_embedding_file(staging / artifact.EMBEDDINGS)  # a readable tensor
            with self._lock:
                final = self.concepts_dir / name
                staging.rename(final)
                try:
                    info = self._load(name, final)
                except CompinvError:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("concept %s added (%s)", name, info["token"])
        return {k: v for k, v in info.items() if k != "folder"}

    def remove_concept(self, name: str) -> None:
        """Stop serving it and delete its folder. Its token rows are zeroed (the tokenizer cannot
        drop added tokens), so nothing of the removed concept is used again."""
        import torch

        with self._lock:
            info = self._served.pop(name)  # KeyError: 404
            concept = self.session.concepts.pop(str(Path(info["folder"]).resolve()), None)
            if concept is not None:
                table = self.session.model.text_encoder.get_input_embeddings().weight
                with torch.no_grad():
                    table[list(concept.token_ids)] = 0
                self._retired.add(concept.token.lower())
            shutil.rmtree(info["folder"], ignore_errors=True)
        log.info("concept %s removed", name)

    # --- internals -------------------------------------------------------------------------

    def _load(self, name: str, folder: Path) -> dict:
        from compinv_rt.train.artifact import read_artifact

        (concept,) = self.session.load_concepts([folder])  # checks the base model's hash
        art = read_artifact(folder)
        token = concept.token.lower()
        clash = next((n for n, i in self._served.items() if i["token"].lower() == token), None)
        if clash is not None:
            raise ArtifactError(f"token {concept.token!r} is already served by concept {clash!r}")
        info = {"name": name, "token": concept.token, "vectors": concept.vectors,
                "class_word": concept.class_word, "method": art.get("method"), "folder": folder}
        self._served[name] = info
        return info


def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
