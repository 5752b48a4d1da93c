"""Trained concepts in generation: read and check a concept folder (`read_concept`), make its token
known to the model only while a request that names it is encoded (`ConceptVocabulary`), expand
prompts that name them (`expand_prompt`), and check folders cheaply before loading
(`check_concepts`). The folder format is written and read by `compinv_rt.models.artifact`.

Why scopes: a tokenizer that every concept joins for good is shared by every request, and its
added tokens match anywhere in a text, so one concept could change other people's images (issue
27). Here the base tokenizer is never changed: a request's prompt is encoded with a copy that
knows its batch's concepts only, and concept tokens have a reserved shape, `<name>`, which no
ordinary word contains, and which a prompt may write only for the concepts it names.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from compinv_rt.core.errors import ArtifactError
from compinv_rt.models import artifact

if TYPE_CHECKING:
    import torch

    from compinv_rt.models.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Concept:
    folder: Path
    token: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]  # ids in the tokenizer it was loaded into; () for a read concept
    class_word: str
    embeddings: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (N, D)

    @property
    def vectors(self) -> int:
        return len(self.tokens)

    def expand(self, prompt: str) -> str:
        from compinv_rt.models.tokens import expand_prompt

        return expand_prompt(prompt, self.token, self.vectors)


def _read(loaded: LoadedModel, folder) -> tuple[dict, torch.Tensor]:
    """artifact.json and the (N, D) vectors of a concept folder trained on this model."""
    art = artifact.read_artifact(folder)
    artifact.check_base_model(art, folder, loaded.hash)
    _, emb, _ = artifact.read_embedding_file(Path(folder) / artifact.EMBEDDINGS)
    if emb.shape[0] != int(art["vectors"]):
        raise ArtifactError(f"{folder}: {artifact.EMBEDDINGS} has {emb.shape[0]} vectors, "
                            f"{artifact.ARTIFACT} says {art['vectors']}")
    dim = loaded.text_encoder.get_input_embeddings().weight.shape[1]
    if emb.shape[1] != dim:
        raise ArtifactError(f"{folder}: embedding width {emb.shape[1]} != the text encoder's {dim}")
    return art, emb


def check_token(token: str, base_tokenizer, vectors: int = 1) -> None:
    """A concept token is `<name>` (no spaces or angle brackets inside) and no word of the base
    vocabulary: it can then only match where a prompt writes it whole."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.core.schemas import CONCEPT_TOKEN
    from compinv_rt.models.tokens import check_new_token

    if not CONCEPT_TOKEN.fullmatch(token):
        raise ArtifactError(f"token {token[:40]!r} does not have the reserved shape <name> (no spaces "
                            f"or angle brackets inside); retrain it as '<{token.strip('<>')[:40]}>'")
    try:
        check_new_token(base_tokenizer, token, vectors)
    except ConfigError as exc:
        raise ArtifactError(str(exc)) from None


def read_concept(loaded: LoadedModel, folder, base_tokenizer) -> Concept:
    """A concept folder checked completely (files, base model, token shape); nothing of the model
    changes."""
    art, emb = _read(loaded, folder)
    check_token(art["token"], base_tokenizer, emb.shape[0])
    return Concept(Path(folder), art["token"], tuple(art.get("tokens") or [art["token"]]), (),
                   art.get("class_word", ""), emb)


class TokenizerView:
    """What a session's `model.tokenizer` is: the base tokenizer plus the concepts of the current
    scope only (ConceptVocabulary). Holders of it (layout predictors) follow every scope."""

    def __init__(self, base):
        self.active = base

    def __call__(self, *args, **kwargs):
        return self.active(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.active, name)

    def __len__(self) -> int:
        return len(self.active)

    def add_tokens(self, *args, **kwargs):
        raise TypeError("a session's tokenizer is never changed: concepts join it only inside "
                        "ConceptVocabulary.scope")


class ConceptVocabulary:
    """Concept tokens for one loaded model, per scope. Entering `scope(concepts)` points the
    model's tokenizer at a copy of the base tokenizer with exactly those concepts' tokens added
    (copies are cached: building one costs ~0.4 s) and writes their vectors into the text
    encoder's rows above the base vocabulary; leaving it restores the previous scope and zeroes
    the rows no longer used. The base tokenizer and rows are never changed, so a prompt encoded
    outside a concept's scope is encoded exactly as by a fresh model."""

    CACHED_TOKENIZERS = 4  # ~14 MB each for CLIP's vocabulary

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.base = loaded.tokenizer
        self.first_id = len(self.base)
        self.view = TokenizerView(self.base)
        loaded.tokenizer = self.view  # duck-typed: every call delegates
        self._copies: OrderedDict[tuple[str, ...], object] = OrderedDict()
        self._active: tuple[Concept, ...] = ()
        self._written = 0  # rows from first_id on that hold concept vectors now
        self._lock = threading.RLock()  # one scope at a time (a session runs one batch at a time)

    @contextlib.contextmanager
    def scope(self, concepts):
        """Inside: the model's tokenizer and text encoder know `concepts` and nothing else."""
        with self._lock:
            previous = self._active
            self.activate(concepts)
            try:
                yield self.view
            finally:
                self.activate(previous)

    def activate(self, concepts) -> dict[str, tuple[int, ...]]:
        """Make `concepts` the current scope; returns each token's ids in it."""
        import torch

        from compinv_rt.models.tokens import placeholder_tokens

        with self._lock:
            unique: dict[str, Concept] = {}
            for c in concepts:  # one token, one concept (the session refuses two with one token)
                unique.setdefault(c.token.lower(), c)
            concepts = tuple(unique.values())
            names = [n for c in concepts for n in placeholder_tokens(c.token, c.vectors)]
            tokenizer = self._tokenizer(tuple(names)) if names else self.base
            te = self.loaded.text_encoder
            end = self.first_id + len(names)
            if te.get_input_embeddings().weight.shape[0] < end:
                te.resize_token_embeddings(end, mean_resizing=False)
            table = te.get_input_embeddings().weight
            with torch.no_grad():
                table[self.first_id:self.first_id + self._written] = 0
                if names:
                    vectors = torch.cat([c.embeddings for c in concepts])
                    table[self.first_id:end] = vectors.to(table.device, table.dtype)
            self._written, self._active, self.view.active = len(names), concepts, tokenizer
            ids, i = {}, self.first_id
            for c in concepts:
                ids[c.token] = tuple(range(i, i + c.vectors))
                i += c.vectors
            return ids

    def _tokenizer(self, names: tuple[str, ...]):
        if names in self._copies:
            self._copies.move_to_end(names)
            return self._copies[names]
        tokenizer = copy.deepcopy(self.base)
        tokenizer.add_tokens(list(names))
        ids = [int(tokenizer.convert_tokens_to_ids(n)) for n in names]
        if ids != list(range(self.first_id, self.first_id + len(names))):
            raise ArtifactError(f"the tokenizer gave ids {ids} to {list(names)}")
        self._copies[names] = tokenizer
        while len(self._copies) > self.CACHED_TOKENIZERS:
            self._copies.popitem(last=False)
        return tokenizer


def load_concepts(loaded: LoadedModel, concept_dirs) -> list[Concept]:
    """Add each concept's token(s) to `loaded`'s own tokenizer for good and write its rows into the
    text encoder's table (a model the caller owns: training checks, benchmarks). Sessions never do
    this (see ConceptVocabulary). Refuses a concept trained on another base model, or two
    concepts with one token."""
    import torch

    from compinv_rt.core.errors import ConfigError
    from compinv_rt.models.tokens import add_placeholders

    arts = [(Path(folder), *_read(loaded, folder)) for folder in concept_dirs]
    seen: dict[str, Path] = {}
    for folder, art, _ in arts:
        key = art["token"].lower()
        if key in seen:
            raise ArtifactError(f"concepts {seen[key]} and {folder} use the same token {art['token']!r}")
        seen[key] = folder
    out = []
    for folder, art, emb in arts:
        try:
            ids = add_placeholders(loaded.tokenizer, loaded.text_encoder, art["token"], emb.shape[0])
        except ConfigError as exc:
            raise ArtifactError(f"concept {folder}: {exc}") from None
        table = loaded.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[ids[0]:ids[-1] + 1] = emb.to(table.device, table.dtype)
        out.append(Concept(folder, art["token"], tuple(art.get("tokens") or [art["token"]]),
                           tuple(ids), art.get("class_word", ""), emb))
        log.info("loaded concept %s (%d vectors) from %s", art["token"], emb.shape[0], folder)
    return out


def expand_prompt(prompt: str, concepts: list[Concept]) -> str:
    for c in concepts:
        prompt = c.expand(prompt)
    return prompt


def check_concepts(concept_dirs, files) -> list[dict]:
    """Cheap pre-flight for `generate --concept`: every folder is a complete concept trained on
    this base model (`files`: ModelFiles) and no two share a token. No weights are loaded."""
    from compinv_rt.models.loading import content_hash

    model_hash = content_hash(files.all_files())
    arts: list[dict] = []
    seen: dict[str, str | Path] = {}
    for folder in concept_dirs:
        art = artifact.read_artifact(folder)
        artifact.check_base_model(art, folder, model_hash)
        key = art["token"].lower()
        if key in seen:
            raise ArtifactError(f"concepts {seen[key]} and {folder} use the same token {art['token']!r}")
        seen[key] = folder
        arts.append(art)
    return arts
