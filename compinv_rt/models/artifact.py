"""Concept artifacts: the writer (`embeddings.safetensors`, `loss_curve.png`, `artifact.json`) and
the reader (`read_artifact`, `read_embedding_file`); `compinv_rt.models.concepts` loads them into a model.

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
from pathlib import Path

from compinv_rt.core.errors import ArtifactError
from compinv_rt.core.outputs import atomic_write_bytes

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EMBEDDINGS = "embeddings.safetensors"
ARTIFACT = "artifact.json"
LOSS_CURVE = "loss_curve.png"
FORMAT = "compinv-rt.embeddings"
MAX_EMBEDDING_VALUE = 1e4


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
    if emb.ndim != 2 or 0 in emb.shape:
        raise ArtifactError(f"{path}: embedding has shape {tuple(emb.shape)}; expected (N, D)")
    emb = emb.float()
    if not emb.isfinite().all():
        raise ArtifactError(f"{path}: the embedding holds NaN or Inf values (a diverged training?)")
    if emb.abs().max() > MAX_EMBEDDING_VALUE:  # fp16 would overflow to Inf in the encoder
        raise ArtifactError(f"{path}: the embedding holds values up to {emb.abs().max():.3g}; token "
                            f"embeddings stay far below {MAX_EMBEDDING_VALUE:g} (a diverged training?)")
    return name, emb, meta


def read_artifact(folder: str | Path) -> dict:
    """Read and check a concept folder's artifact.json (cheap: no model needed)."""
    d = Path(folder)
    if not d.is_dir():
        raise ArtifactError(f"concept folder not found: {d}")
    path = d / ARTIFACT
    if not path.is_file():
        raise ArtifactError(f"{d} is not a trained concept: {ARTIFACT} is missing "
                            "(training unfinished? resume it with `compinv-rt train ... --resume`)")
    from compinv_rt.core.schemas import check_artifact, read_versioned_json

    art = read_versioned_json(path, "schema_version", SCHEMA_VERSION, ArtifactError)
    check_artifact(art, path)  # types and bounds; `files` must hash the embeddings
    emb = d / EMBEDDINGS
    if not emb.is_file():
        raise ArtifactError(f"{d}: {EMBEDDINGS} is missing")
    if file_sha256(emb) != art["files"][EMBEDDINGS]:
        raise ArtifactError(f"{emb} does not match the hash in {ARTIFACT} (modified or corrupt)")
    return art


def check_base_model(art: dict, folder, model_hash: str) -> None:
    trained_on = art["base_model"].get("hash")
    if trained_on != model_hash:
        raise ArtifactError(
            f"concept {folder} ({art['token']}) was trained on another base model "
            f"(hash {str(trained_on)[:12]}..., this model is {model_hash[:12]}...); "
            "retrain it on this model")
