"""Trained concepts in generation: put their tokens into a loaded base model (`load_concepts`),
expand prompts that name them (`expand_prompt`), and check folders cheaply before loading
(`check_concepts`). The folder format is written and read by `compinv_rt.train.artifact`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compinv_rt.errors import ArtifactError
from compinv_rt.train import artifact

if TYPE_CHECKING:
    from compinv_rt.models.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Concept:
    folder: Path
    token: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    class_word: str

    @property
    def vectors(self) -> int:
        return len(self.tokens)

    def expand(self, prompt: str) -> str:
        from compinv_rt.train.tokens import expand_prompt

        return expand_prompt(prompt, self.token, self.vectors)


def load_concepts(loaded: LoadedModel, concept_dirs) -> list[Concept]:
    """Add each concept's token(s) to the tokenizer and write its rows into the text encoder's
    table. Refuses a concept trained on another base model, or two concepts with one token."""
    import torch

    from compinv_rt.errors import ConfigError
    from compinv_rt.train.tokens import add_placeholders

    arts = []
    for folder in concept_dirs:
        art = artifact.read_artifact(folder)
        artifact.check_base_model(art, folder, loaded.hash)
        name, emb, _ = artifact.read_embedding_file(Path(folder) / artifact.EMBEDDINGS)
        if emb.shape[0] != int(art["vectors"]):
            raise ArtifactError(f"{folder}: {artifact.EMBEDDINGS} has {emb.shape[0]} vectors, "
                                f"{artifact.ARTIFACT} says {art['vectors']}")
        dim = loaded.text_encoder.get_input_embeddings().weight.shape[1]
        if emb.shape[1] != dim:
            raise ArtifactError(f"{folder}: embedding width {emb.shape[1]} != the text encoder's {dim}")
        arts.append((Path(folder), art, emb))
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
                           tuple(ids), art.get("class_word", "")))
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
