"""Concept artifacts: the writer (`embeddings.safetensors`, `loss_curve.png`, `artifact.json`) and
`load_concepts`, which puts trained tokens into a loaded base model.

`embeddings.safetensors` holds one tensor, key = the token, shape (N, D): the layout diffusers'
`load_textual_inversion` reads (multi-vector tokens become `tok, tok_1, ...`) and the common
single-file embedding layout other UIs read (one tensor; the file or key names the token). Its
metadata describes it (format, token, vectors, base-model hash, config). `artifact.json` is
written last, so its presence means the folder is complete; it records the file hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from compinv_rt.errors import ArtifactError
from compinv_rt.outputs import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EMBEDDINGS = "embeddings.safetensors"
ARTIFACT = "artifact.json"
LOSS_CURVE = "loss_curve.png"
FORMAT = "compinv-rt.embeddings"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embeddings_bytes(token: str, vectors, metadata: dict) -> bytes:
    from safetensors.torch import save

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return save({token: vectors.detach().float().cpu().contiguous()}, metadata=meta)


def write_embeddings(path: Path, token: str, vectors, metadata: dict) -> Path:
    return atomic_write_bytes(path, embeddings_bytes(token, vectors, metadata))


def read_embedding_file(path: str | Path):
    """-> (token or None, (N, D) tensor, metadata). Reads our files, diffusers' learned_embeds,
    and single-file embeddings keyed `emb_params` or `string_to_param.*`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in keys}
    except FileNotFoundError:
        raise ArtifactError(f"embedding file not found: {path}") from None
    except Exception as exc:
        raise ArtifactError(f"corrupt embedding file {path}: {str(exc).splitlines()[0]}") from None
    if len(tensors) == 1:
        key, emb = next(iter(tensors.items()))
        name = meta.get("token") or (None if key in ("emb_params", "string_to_param.*") else key)
    elif "emb_params" in tensors:
        name, emb = meta.get("token") or meta.get("name"), tensors["emb_params"]
    elif "string_to_param.*" in tensors:
        name, emb = meta.get("name"), tensors["string_to_param.*"]
    else:
        raise ArtifactError(f"{path}: expected one embedding tensor, found keys {keys[:5]}")
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2:
        raise ArtifactError(f"{path}: embedding has shape {tuple(emb.shape)}; expected (N, D)")
    return name, emb.float(), meta


def write_artifacts(out: Path, *, token: str, vectors, metadata: dict, history, record: dict,
                    title: str) -> dict:
    """Write the three files (embeddings, loss curve, then artifact.json) and return the record."""
    from compinv_rt.train.plot import loss_curve

    out = Path(out)
    emb = write_embeddings(out / EMBEDDINGS, token, vectors, metadata)
    png = loss_curve(out / LOSS_CURVE, history, title)
    record = {**record, "files": {p.name: file_sha256(p) for p in (emb, png)}}
    atomic_write_json(out / ARTIFACT, record)
    return record


def read_artifact(folder: str | Path) -> dict:
    """Read and check a concept folder's artifact.json (cheap: no model needed)."""
    d = Path(folder)
    if not d.is_dir():
        raise ArtifactError(f"concept folder not found: {d}")
    path = d / ARTIFACT
    if not path.is_file():
        raise ArtifactError(f"{d} is not a trained concept: {ARTIFACT} is missing "
                            "(training unfinished? resume it with `compinv-rt train ... --resume`)")
    try:
        art = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if art.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema version {art.get('schema_version')!r}, this "
                            f"compinv-rt reads version {SCHEMA_VERSION}")
    for key in ("token", "vectors", "base_model", "files"):
        if key not in art:
            raise ArtifactError(f"{path}: missing field {key!r}")
    emb = d / EMBEDDINGS
    if not emb.is_file():
        raise ArtifactError(f"{d}: {EMBEDDINGS} is missing")
    want = art["files"].get(EMBEDDINGS)
    if want and file_sha256(emb) != want:
        raise ArtifactError(f"{emb} does not match the hash in {ARTIFACT} (modified or corrupt)")
    return art


def check_base_model(art: dict, folder, model_hash: str) -> None:
    trained_on = art["base_model"].get("hash")
    if trained_on != model_hash:
        raise ArtifactError(
            f"concept {folder} ({art['token']}) was trained on another base model "
            f"(hash {str(trained_on)[:12]}..., this model is {model_hash[:12]}...); "
            "retrain it on this model")


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


def load_concepts(loaded, concept_dirs) -> list[Concept]:
    """Add each concept's token(s) to the tokenizer and write its rows into the text encoder's
    table. Refuses a concept trained on another base model, or two concepts with one token."""
    import torch

    from compinv_rt.errors import ConfigError
    from compinv_rt.train.tokens import add_placeholders

    arts = []
    for folder in concept_dirs:
        art = read_artifact(folder)
        check_base_model(art, folder, loaded.hash)
        name, emb, _ = read_embedding_file(Path(folder) / EMBEDDINGS)
        if emb.shape[0] != int(art["vectors"]):
            raise ArtifactError(f"{folder}: {EMBEDDINGS} has {emb.shape[0]} vectors, "
                                f"{ARTIFACT} says {art['vectors']}")
        dim = loaded.text_encoder.get_input_embeddings().weight.shape[1]
        if emb.shape[1] != dim:
            raise ArtifactError(f"{folder}: embedding width {emb.shape[1]} != the text encoder's {dim}")
        arts.append((Path(folder), art, emb))
    seen = {}
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
    arts, seen = [], {}
    for folder in concept_dirs:
        art = read_artifact(folder)
        check_base_model(art, folder, model_hash)
        key = art["token"].lower()
        if key in seen:
            raise ArtifactError(f"concepts {seen[key]} and {folder} use the same token {art['token']!r}")
        seen[key] = folder
        arts.append(art)
    return arts
