"""Concept photos and trained embeddings for the evaluation, cached by what decides them.

A trained concept lives in `<cache>/concepts/<name>-<recipe>-<key>/`, where `key` hashes the full
`TrainConfig` (recipe and training seed included), the base model's content hash and the training
inputs' hash (photos, captions, masks): re-runs, `--quick` and
the full run reuse whatever matches, and a change to any of them trains afresh. A training cut
short resumes from its last checkpoint (the train loop's own resume)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compinv_rt.apps.eval.protocol import RECIPES, WORLD_TEMPLATES, EvalConcept, EvalConfig
from compinv_rt.train.config import TrainConfig

log = logging.getLogger(__name__)


def concept_photos(concept: EvalConcept, cache: Path, size: int) -> Path:
    """The user's folder, or world photos made once (deterministic) under the cache."""
    if concept.photos is not None:
        return Path(concept.photos)
    from compinv_rt.apps.world.photos import PhotoConcept, make_photos

    # v2: the folder also holds captions.json and masks/
    spec = f"{concept.shape},{concept.colour},{concept.pattern},{concept.background},{size},v2"
    d = cache / "photos" / f"{concept.name}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"
    if not (d / "concept.json").is_file():  # concept.json is written last
        make_photos(d, PhotoConcept(str(concept.shape), str(concept.colour), concept.pattern or "plain",
                                    str(concept.background)), count=8, seed=1, size=size)
    return d


def train_config(concept: EvalConcept, embedding: str, cfg: EvalConfig, world: bool, seed: int = 0,
                 photos: Path | None = None) -> TrainConfig:
    """The recipe's training of one concept with one seed. `photos`: where a masks/ folder is
    looked for (recipes with masks)."""
    r = RECIPES[embedding]
    masks = "auto" if r.masks == "auto" else None
    if r.masks == "photos" and photos is not None and (Path(photos) / "masks").is_dir():
        masks = str(Path(photos) / "masks")
    return TrainConfig(
        token=concept.token(embedding, seed), class_word=concept.class_word,
        anchor_weight=cfg.si_anchor_weight if r.semantic else 0.0,
        anchors=(r.anchors or concept.anchors(cfg.si_anchors)) if r.semantic else None,
        steps=cfg.train_steps, batch=cfg.train_batch,
        lr=cfg.train_lr, augment=cfg.augment, variants=cfg.train_variants,
        resolution=cfg.train_resolution, checkpoint_every=max(1, min(100, cfg.train_steps)),
        templates=WORLD_TEMPLATES if world else None, seed=seed,
        captions="auto" if r.captions else "none", masks=masks, context_token=r.context_token,
        norm=cfg.norm if r.norm else "none",
        context_weight=cfg.context_weight if r.context_reg else 0.0, vectors=r.vectors)


def cache_key(tc: TrainConfig, model_hash: str, photos_hash: str) -> str:
    blob = json.dumps({"train": tc.as_dict(), "model": model_hash, "photos": photos_hash},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_complete(folder: Path) -> bool:
    from compinv_rt.core.errors import ArtifactError
    from compinv_rt.models.artifact import read_artifact

    if not (folder / "embeddings.safetensors").is_file():
        return False
    try:
        read_artifact(folder)
    except ArtifactError:
        return False
    return True


@dataclass(frozen=True)
class TrainingSetup:
    """What every training of one evaluation shares."""

    model_root: Path  # the base model folder
    model_hash: str  # its content hash (part of each trained folder's cache key)
    cache: Path  # <cache>/photos/ and <cache>/concepts/
    world: bool  # a shapes-world model: its prompt templates apply
    device: str = "auto"


def ensure_trained(concept: EvalConcept, embedding: str, cfg: EvalConfig, setup: TrainingSetup,
                   seed: int = 0, on_status: Callable[[str], None] | None = None,
                   on_step=None) -> tuple[Path, bool]:
    """-> (concept folder, reused). Trains (or finishes training) when no complete match exists."""
    from compinv_rt.train.loop import prepare, train_concept

    status = on_status or log.info
    photos = concept_photos(concept, setup.cache, size=_model_size(setup.model_root))
    tc = train_config(concept, embedding, cfg, setup.world, seed, photos)
    plan = prepare(tc, photos, str(setup.model_root))  # cheap: reads photos, captions, masks
    key = cache_key(tc, setup.model_hash, plan.inputs_hash())
    folder = setup.cache / "concepts" / f"{concept.name.lower()}-{embedding}-{key}"
    if is_complete(folder):
        status(f"reusing {tc.token} from {folder}")
        return folder, True
    status(f"training {tc.token} ({tc.steps} steps, recipe {embedding}, seed {seed}) -> {folder}")
    # the embedding analysis uses the model's own vocabulary (its metadata) when it has one
    train_concept(plan, folder, resume=True, device=setup.device,
                  on_step=on_step, on_status=lambda m: log.info(m))
    return folder, False


def _model_size(model_root: Path) -> int:
    from compinv_rt.models.loading import inspect_model_dir

    return inspect_model_dir(Path(model_root)).default_size

