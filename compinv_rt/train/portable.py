"""Portable copies of a trained concept's embedding for other tools (`train --format`).

- `diffusers`: `learned_embeds.safetensors`, {token: (N, D)}: the file name
  `pipe.load_textual_inversion(folder)` looks for, so the folder itself loads.
- `a1111`: the AUTOMATIC1111 web UI's layout, which diffusers' loader also reads:
  `<name>.pt`, a torch pickle of {"string_to_token": {"*": 265}, "string_to_param": {"*": (N, D)},
  "name", "step", "sd_checkpoint", "sd_checkpoint_name"} (A1111's own `Embedding.save`), and
  `<name>.safetensors`, {"emb_params": (N, D)} with name/step in the header metadata (A1111 reads
  it; diffusers needs `token=` for it, since its key does not name the token). A1111 calls an
  embedding by its file name: `<name>` is the token without angle brackets (`<my-heart>` ->
  `my-heart`); the "name" key keeps the token itself, which diffusers registers.

`embeddings.safetensors` (the folder's own file, read by `generate --concept`) is always written by
training; these copies are made from it afterwards and their hashes added to artifact.json.
"""

from __future__ import annotations

import io
import re
from enum import Enum
from pathlib import Path

from compinv_rt.core.outputs import atomic_write_bytes, atomic_write_json

DIFFUSERS_FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE


class EmbeddingFormat(str, Enum):
    diffusers = "diffusers"
    a1111 = "a1111"
    both = "both"


def a1111_name(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", token).strip("-.") or "embedding"


def a1111_files(token: str) -> tuple[str, str]:
    name = a1111_name(token)
    return f"{name}.pt", f"{name}.safetensors"


def check_portable_names(token: str, fmt: EmbeddingFormat | str) -> None:
    """The a1111 copies are named after the token: refuse a token whose copy would overwrite one
    of the folder's own files (`<embeddings>` -> embeddings.safetensors), compared ignoring case
    (case-insensitive file systems). Cheap: called before training."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.models.artifact import ARTIFACT, EMBEDDINGS, LOSS_CURVE

    if str(getattr(fmt, "value", fmt)) not in (EmbeddingFormat.a1111.value, EmbeddingFormat.both.value):
        return
    own = {n.lower(): n for n in (EMBEDDINGS, ARTIFACT, LOSS_CURVE, DIFFUSERS_FILE)}
    for f in a1111_files(token):
        if f.lower() in own:
            raise ConfigError(f"--token {token!r}: its a1111 copy {f} would overwrite the concept "
                              f"folder's own {own[f.lower()]}; pick another token name")


def a1111_pt_bytes(token: str, vectors, step: int, checkpoint_hash: str, checkpoint_name: str) -> bytes:
    import torch

    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.detach().float().cpu().clone()},
            "name": token, "step": int(step), "sd_checkpoint": checkpoint_hash[:10],
            "sd_checkpoint_name": checkpoint_name}
    buf = io.BytesIO()
    torch.save(data, buf)
    return buf.getvalue()


def a1111_safetensors_bytes(token: str, vectors, step: int, checkpoint_hash: str) -> bytes:
    from safetensors.torch import save

    return save({"emb_params": vectors.detach().float().cpu().contiguous()},
                metadata={"name": token, "step": str(int(step)), "sd_checkpoint": checkpoint_hash[:10]})


def write_portable(folder: Path, fmt: EmbeddingFormat | str) -> list[Path]:
    """Write the `fmt` copies of a finished concept folder's embedding; returns their paths."""
    from compinv_rt.models.artifact import (
        ARTIFACT,
        EMBEDDINGS,
        embeddings_bytes,
        file_sha256,
        read_artifact,
        read_embedding_file,
    )

    fmt = EmbeddingFormat(fmt)
    folder = Path(folder)
    art = read_artifact(folder)
    token, vectors, _ = read_embedding_file(folder / EMBEDDINGS)
    token = token or art["token"]
    check_portable_names(token, fmt)  # never overwrite the folder's own files
    step, base = art.get("steps_done", 0), art["base_model"]
    written = []
    if fmt in (EmbeddingFormat.diffusers, EmbeddingFormat.both):
        written.append(atomic_write_bytes(folder / DIFFUSERS_FILE, embeddings_bytes(token, vectors, {})))
    if fmt in (EmbeddingFormat.a1111, EmbeddingFormat.both):
        pt, st = a1111_files(token)
        written.append(atomic_write_bytes(folder / pt, a1111_pt_bytes(
            token, vectors, step, base["hash"], Path(base.get("path", "")).name)))
        written.append(atomic_write_bytes(folder / st,
                                          a1111_safetensors_bytes(token, vectors, step, base["hash"])))
    art["files"] = {**art["files"], **{p.name: file_sha256(p) for p in written}}
    atomic_write_json(folder / ARTIFACT, art)
    return written
