"""Writing a trained concept's folder: embeddings, loss curve, then artifact.json (last, so a
folder with artifact.json is complete). The format itself lives in compinv_rt.models.artifact."""

from __future__ import annotations

from pathlib import Path

from compinv_rt.core.outputs import atomic_write_json
from compinv_rt.models import artifact
from compinv_rt.train.plot import loss_curve


def write_artifacts(out: Path, *, token: str, vectors, metadata: dict, history, record: dict,
                    title: str) -> dict:
    """Write the three files (embeddings, loss curve, then artifact.json) and return the record."""
    out = Path(out)
    emb = artifact.write_embeddings(out / artifact.EMBEDDINGS, token, vectors, metadata)
    png = loss_curve(out / artifact.LOSS_CURVE, history, title)
    record = {**record, "files": {p.name: artifact.file_sha256(p) for p in (emb, png)}}
    atomic_write_json(out / artifact.ARTIFACT, record)
    return record


