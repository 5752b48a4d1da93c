"""Run the protocol: train (cached), generate every (method, prompt) cell, judge, aggregate.

Each cell writes `cells/<method>/<prompt id>.json` (per-image metrics) and `.png` (its images in one
row) atomically once it is complete, keyed by everything that decides it; a re-run skips the cells
whose key matches, so a killed run continues where it stopped and a changed setting recomputes
only what it changes. Every method uses the same sampler, steps, guidance and seeds
(image i of every cell: seed + i). Cross-attention is recorded in every method alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compinv_rt.eval.metrics import aggregate, attention_stats, prompt_slots, score_image
from compinv_rt.eval.protocol import EvalConfig, Protocol
from compinv_rt.outputs import atomic_write_json, make_grid, remove_stale_temp_files, save_png

log = logging.getLogger(__name__)
STRIP = 8  # images per cell kept as PNG (the row of the sample grids)
Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class Scorers:
    judge: object | None = None
    clip: object | None = None
    detector: object | None = None
    photo_features: dict | None = None  # concept name -> CLIP features of its photos


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_eval(protocol: Protocol, cfg: EvalConfig, out: str | Path, model: str | None = None,
             cache: str | Path | None = None, clip: str | Path | None = None,
             detector: str | Path | None = None, device: str = "auto",
             on_status: Callable[[str], None] | None = None,
             on_progress: Progress | None = None) -> dict:
    from compinv_rt.models.loading import content_hash, inspect_model_dir, resolve_model_dir

    t0 = time.time()
    status = on_status or log.info
    progress = on_progress or (lambda done, total, what: None)
    out = Path(out)
    cache = Path(cache) if cache is not None else out / "cache"
    files = inspect_model_dir(resolve_model_dir(model))
    from compinv_rt.world.model import DOMAIN

    world = files.metadata.get("domain") == DOMAIN  # the judge and world templates apply
    model_hash = content_hash(files.all_files())
    scorers = _load_scorers(protocol, clip, detector, cfg, status)  # fail fast, before training
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    atomic_write_json(out / "protocol.json", {"config": cfg.as_dict(), **protocol.to_json()})

    embeddings = sorted({m.embedding for m in protocol.methods})
    cells = [(m, p) for m in protocol.methods for p in protocol.prompts]
    total = len(protocol.concepts) * len(embeddings) + len(cells)
    done = 0
    folders, reused = {}, {}
    for c in protocol.concepts:
        for e in embeddings:
            progress(done, total, f"train {c.token(e)}")
            folders[c.name, e], reused[c.name, e] = _train(c, e, cfg, files.root, model_hash,
                                                           cache, world, status, device)
            done += 1
    progress(done, total, "load model")

    from compinv_rt.runtime.pipeline import SamplingConfig
    from compinv_rt.session import GenerationSession, SessionOptions

    session = GenerationSession.open(SessionOptions(str(files.root), device, max_batch=cfg.batch))
    session.load_concepts(folders.values())
    sampling = SamplingConfig(cfg.steps, cfg.guidance)
    if scorers.clip is not None:
        scorers.photo_features = _photo_features(scorers.clip, protocol, cache, files.default_size)

    results_cells = {}
    for method, prompt in cells:
        key = _key({"config": {k: v for k, v in cfg.as_dict().items() if k != "quick"},
                    "method": method.name, "spatial": method.spatial, "template": prompt.template,
                    "detect": prompt.detect, "model": model_hash,
                    "concepts": [folders[n, method.embedding].name for n in prompt.concepts],
                    "clip": str(clip), "detector": str(detector)})
        path = out / "cells" / method.name / f"{prompt.id}.json"
        cell = _read_cell(path, key)
        if cell is None:
            progress(done, total, f"{method.name}: {prompt.template}")
            cell = _run_cell(method, prompt, protocol, cfg, session, sampling, folders, scorers)
            cell["key"] = key
            save_png(path.with_suffix(".png"), make_grid(cell.pop("_images")[:STRIP], cols=STRIP))
            atomic_write_json(path, cell)
        results_cells[method.name, prompt.id] = cell
        done += 1
        progress(done, total, f"{method.name}: {prompt.template}")

    return _summarize(protocol, cfg, files, model_hash, folders, reused, results_cells, scorers,
                      out, time.time() - t0)


def _train(concept, embedding, cfg, root, model_hash, cache, world, status, device):
    from compinv_rt.eval.training import ensure_trained

    return ensure_trained(concept, embedding, cfg, root, model_hash, cache, world,
                          on_status=status, device=device)


def _load_scorers(protocol, clip, detector, cfg, status) -> Scorers:
    s = Scorers()
    if any(prompt_slots(p, protocol.by_name) is not None for p in protocol.prompts):
        from compinv_rt.world.judge import load_judge

        s.judge = load_judge()
    if clip is not None:
        from compinv_rt.eval.clip_metrics import ClipScorer

        status(f"loading CLIP from {clip}")
        s.clip = ClipScorer(clip)
    if detector is not None:
        from compinv_rt.eval.clip_metrics import DetrScorer

        status(f"loading DETR from {detector}")
        s.detector = DetrScorer(detector, cfg.detector_threshold)
    return s


def _photo_features(scorer, protocol, cache, size) -> dict:
    from compinv_rt.eval.training import concept_photos
    from compinv_rt.train.data import list_images, read_images

    return {c.name: scorer.image_features(read_images(list_images(concept_photos(c, cache, size))))
            for c in protocol.concepts}


def _read_cell(path: Path, key: str) -> dict | None:
    if not path.is_file() or not path.with_suffix(".png").is_file():
        return None
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cell if cell.get("key") == key else None


def _run_cell(method, prompt, protocol, cfg, session, sampling, folders, scorers) -> dict:
    import torch

    from compinv_rt.session import Request
    from compinv_rt.spatial.heatmaps import prompt_token_labels
    from compinv_rt.spatial.layouts import boxes_layout, concept_phrases, concept_tokens, fixed_boxes
    from compinv_rt.spatial.plan import SpatialConfig

    t0 = time.time()
    concepts = protocol.by_name
    concept_dirs = tuple(str(folders[n, method.embedding]) for n in prompt.concepts)
    used = session.load_concepts(concept_dirs)
    raw = prompt.render(concepts, "tokens", method.embedding)
    text = session.expand(raw, used)
    phrases = concept_phrases(raw)  # objects in order of mention ("<tok> heart", "blue circle")
    spatial = SpatialConfig.from_options(
        None if method.spatial == "none" else method.spatial,
        None if method.spatial == "none" else boxes_layout(phrases, fixed_boxes(len(phrases))),
        cfg.bias_strength, cfg.spatial_steps, save_attention=True, total_steps=cfg.steps)
    tok = session.model.tokenizer
    ids = tok(text, truncation=True, max_length=tok.model_max_length).input_ids
    content = [p for p, _ in prompt_token_labels(tok, text)]
    concept_pos = [[i for i, t in enumerate(ids) if t in set(a.token_ids)] for a in used]
    tokens = {a.token for a in used}
    others = [p for p in phrases if not any(t in p for t in tokens)]
    other_pos = concept_tokens(tok, text, others) if others else []
    readable = prompt_slots(prompt, concepts) if scorers.judge is not None else None
    request = Request(raw, cfg.seed, cfg.samples, sampling=sampling, concepts=concept_dirs,
                      spatial=spatial)
    samples, images, layout = [], [], None
    tasks = session.tasks(request)
    for i in range(0, len(tasks), cfg.batch):
        results = session.run_batch(tasks[i:i + cfg.batch])
        imgs = [r.image for r in results]
        layout = results[0].spatial
        judged = scorers.judge(imgs) if readable is not None else [None] * len(imgs)
        clip = (scorers.clip.score(imgs, prompt.render(concepts, "plain"), torch.cat(
            [scorers.photo_features[n] for n in prompt.concepts]))
            if scorers.clip is not None else [{}] * len(imgs))
        detr = None
        if scorers.detector is not None and prompt.detect and \
                len(scorers.detector.known(prompt.detect)) == len(prompt.detect):
            detr = scorers.detector.coi(imgs, list(prompt.detect))
        for j, r in enumerate(results):
            rec = {"seed": r.seed, **attention_stats(r.attention, content, concept_pos, other_pos),
                   **clip[j], "detr_coi": None if detr is None else detr[j]}
            if readable is not None:
                rec.update(score_image(readable[0], readable[1], judged[j],
                                       scorers.judge.config.size))
                rec["judgement"] = judged[j].to_json()  # type: ignore[union-attr]
            samples.append(rec)
        images += imgs
    return {"method": method.name, "prompt": prompt.to_json(), "text": text,
            "judged": readable is not None, "spatial": layout, "samples": samples,
            "seconds": round(time.time() - t0, 2), "_images": images}


def _embedding_analysis(folders) -> dict:
    from compinv_rt.train.artifact import read_artifact

    out: dict[str, dict] = {}
    for (name, emb), folder in folders.items():
        art = read_artifact(folder)
        a = art["analysis"]
        v = a["vectors"][0]
        out.setdefault(name, {})[emb] = {
            "token": art["token"], "folder": str(folder),
            "norm": v["norm"], "norm_x_median": round(v["norm"] / a["vocabulary_norm_median"], 3),
            "norm_percentile": v["norm_percentile"], "nearest_word": v["nearest_word"],
            "nearest_word_distance": v["nearest_word_distance"],
            "anchor_distance": v.get("target_distance"),
            "vocabulary_norm_median": a["vocabulary_norm_median"],
            "vocabulary_nn_distance_median": a["vocabulary_nn_distance_median"],
            "train_seconds": art.get("seconds"), "final_loss": art["loss"]["final"],
        }
    return out


def _summarize(protocol, cfg, files, model_hash, folders, reused, cells, scorers, out,
               seconds) -> dict:
    from compinv_rt import __version__
    from compinv_rt.eval.report import write_report

    methods = {}
    for m in protocol.methods:
        rows: dict[str, list] = {"pretrained": [], "inverted": []}
        per_concept: dict = {}
        for p in protocol.prompts:
            samples = cells[m.name, p.id]["samples"]
            rows[p.kind] += samples
            for n in p.concepts:
                per_concept.setdefault(n, []).extend(samples)
        methods[m.name] = {
            "label": m.label, "embedding": m.embedding, "spatial": m.spatial,
            "pretrained": aggregate(rows["pretrained"]), "inverted": aggregate(rows["inverted"]),
            "all": aggregate(rows["pretrained"] + rows["inverted"]),
            "per_concept": {n: aggregate(s) for n, s in per_concept.items()},
            "seconds": round(sum(cells[m.name, p.id]["seconds"] for p in protocol.prompts), 1),
        }
    results = {
        "kind": "compinv-rt.eval", "compinv_rt": __version__,
        "model": {"path": str(files.root), "hash": model_hash},
        "config": cfg.as_dict(), "protocol": protocol.to_json(),
        "judge": "shapes-world judge" if scorers.judge is not None else
                 "skipped (no prompt whose concepts all have world attributes)",
        "clip": str(scorers.clip.path) if scorers.clip is not None else "skipped (no --clip)",
        "detector": (str(scorers.detector.path) if scorers.detector is not None
                     else "skipped (no --detector)"),
        "trained": {f"{n}-{e}": {"folder": str(f), "reused": reused[n, e]}
                    for (n, e), f in folders.items()},
        "embeddings": _embedding_analysis(folders),
        "methods": methods,
        "seconds": round(seconds, 1),
    }
    results["report"] = {k: str(v) for k, v in write_report(results, out).items()}
    return results
