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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from compinv_rt.apps.eval.metrics import WORDS_FLOOR, aggregate, attention_stats, prompt_slots, score_image
from compinv_rt.apps.eval.protocol import WORDS, EvalConfig, Protocol
from compinv_rt.core.outputs import atomic_write_json, make_grid, remove_stale_temp_files, save_png

if TYPE_CHECKING:
    from compinv_rt.generate.session import GenerationSession
    from compinv_rt.models.loading import ModelFiles

log = logging.getLogger(__name__)
STRIP = 8  # images per cell kept as PNG (the row of the sample grids)
Progress = Callable[[float, int, str], None]  # (done, fractional within a cell; total, what)


@dataclass
class Scorers:
    judge: Any = None  # world.judge's judge (world prompts only)
    clip: Any = None  # clip_metrics.ClipScorer (--clip)
    detector: Any = None  # clip_metrics.DetrScorer (--detector)
    photo_features: dict = field(default_factory=dict)  # concept name -> CLIP features of its photos


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunOptions:
    """Where an evaluation reads from besides its protocol, and where it runs."""

    model: str | None = None  # base model folder (default: embedded)
    cache: str | Path | None = None  # trained concepts and cells (default: OUT/cache)
    clip: str | Path | None = None  # open_clip folder: CLIP alignment scores
    detector: str | Path | None = None  # DETR folder: detector CoI
    device: str = "auto"


@dataclass
class _Run:
    """One evaluation's shared state, handed to its steps."""

    protocol: Protocol
    cfg: EvalConfig
    options: RunOptions
    out: Path
    cache: Path
    files: ModelFiles
    model_hash: str
    scorers: Scorers
    folders: dict = field(default_factory=dict)  # (concept, recipe, seed) -> trained folder
    reused: dict = field(default_factory=dict)  # (concept, recipe, seed) -> was it cached
    session: GenerationSession | None = None


@dataclass
class _Tracker:
    """Units done of the total (fractional within a cell), reported through `Progress`."""

    report: Progress
    total: int
    done: float = 0

    def __call__(self, what: str, within: float = 0.0) -> None:
        self.report(self.done + within, self.total, what)


def run_eval(protocol: Protocol, cfg: EvalConfig, out: str | Path,
             options: RunOptions = RunOptions(),
             on_status: Callable[[str], None] | None = None,
             on_progress: Progress | None = None) -> dict:
    t0 = time.time()
    status = on_status or log.info
    run = _open_run(protocol, cfg, Path(out), options, status)
    recipes = sorted({m.embedding for m in protocol.methods if m.trained})
    seeds = list(range(cfg.train_seeds))
    trainings = [(c, e, s) for c in protocol.concepts for e in recipes for s in seeds]
    units = [(m, p, s) for m in protocol.methods for p in protocol.prompts
             for s in (seeds if m.trained else [0])]
    progress = _Tracker(on_progress or (lambda done, total, what: None), len(trainings) + len(units))
    _train_all(run, trainings, progress, status)
    progress("load model")
    _open_session(run)
    cells = {(method.name, prompt.id, seed): _cell(run, method, prompt, seed, progress)
             for method, prompt, seed in units}
    return _summarize(run, cells, time.time() - t0)


def _open_run(protocol: Protocol, cfg: EvalConfig, out: Path, options: RunOptions,
              status: Callable[[str], None]) -> _Run:
    """The model's files and hash, the scorers (fail fast, before training), the output folder."""
    from compinv_rt.models.loading import content_hash, inspect_model_dir, resolve_model_dir

    cache = Path(options.cache) if options.cache is not None else out / "cache"
    files = inspect_model_dir(resolve_model_dir(options.model))
    model_hash = content_hash(files.all_files())
    scorers = _load_scorers(protocol, options.clip, options.detector, cfg, status)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    atomic_write_json(out / "protocol.json", {"config": cfg.as_dict(), **protocol.to_json()})
    return _Run(protocol, cfg, options, out, cache, files, model_hash, scorers)


def _train_all(run: _Run, trainings: list, progress: _Tracker, status: Callable[[str], None]) -> None:
    from compinv_rt.apps.eval.training import TrainingSetup, ensure_trained
    from compinv_rt.apps.world.model import DOMAIN

    world = run.files.metadata.get("domain") == DOMAIN  # the judge and world templates apply
    setup = TrainingSetup(run.files.root, run.model_hash, run.cache, world, run.options.device)
    for c, e, seed in trainings:
        progress(f"train {c.token(e, seed)}")
        run.folders[c.name, e, seed], run.reused[c.name, e, seed] = ensure_trained(
            c, e, run.cfg, setup, seed=seed, on_status=status)
        progress.done += 1


def _open_session(run: _Run) -> None:
    """The model, once, with every trained concept; the concepts' photo features for CLIP."""
    from compinv_rt.generate.session import GenerationSession, SessionOptions

    run.session = GenerationSession.open(SessionOptions(str(run.files.root), run.options.device,
                                                        max_batch=run.cfg.batch))
    run.session.load_concepts(run.folders.values())
    if run.scorers.clip is not None:
        run.scorers.photo_features = _photo_features(run.scorers.clip, run.protocol, run.cache,
                                                     run.files.default_size)


def _cell(run: _Run, method, prompt, seed: int, progress: _Tracker) -> dict:
    """One (method, prompt, training seed) cell: this run's copy, else the shared store's, else
    computed (and stored in both)."""
    key = cell_key(run.cfg, method, prompt, run.model_hash, run.folders, seed, run.options.clip,
                   run.options.detector)
    path = run.out / "cells" / method.name / f"{prompt.id}{f'-s{seed}' if seed else ''}.json"
    stored = run.cache / "cells" / f"{key}.json"  # shared by every run using this cache
    what = f"{method.name}{f' seed {seed}' if method.trained else ''}: {prompt.template}"
    cell = _read_cell(path, key)
    if cell is None and _read_cell(stored, key) is not None:
        _copy_cell(stored, path)
        cell = _read_cell(path, key)
    if cell is None:
        progress(what)

        def on_batch(images, n):
            progress(f"{what} ({images}/{n} images)", images / n)

        cell = _run_cell(method, prompt, run, seed, on_batch)
        cell["key"] = key
        save_png(path.with_suffix(".png"), make_grid(cell.pop("_images")[:STRIP], cols=STRIP))
        atomic_write_json(path, cell)
        _copy_cell(path, stored)
    progress.done += 1
    progress(what)
    return cell


def cell_key(cfg: EvalConfig, method, prompt, model_hash: str, folders: dict, seed: int, clip,
             detector) -> str:
    """What decides a cell's images and scores, and nothing else: a TI cell is the same whatever
    the semantic-inversion settings, a cell without a layout the same whatever the bias strength.
    The trained concept folders' names hash their whole training config (seed included)."""
    c = cfg.as_dict()
    decides = {k: c[k] for k in ("samples", "steps", "guidance", "seed", "batch")}
    if (cfg.scheduler, tuple(cfg.guidance_interval)) != ("ddim", (0.0, 1.0)):  # old keys stay valid
        decides.update(scheduler=cfg.scheduler, guidance_interval=list(cfg.guidance_interval))
    if cfg.cache_interval != 1:
        decides.update(cache_interval=cfg.cache_interval)
    if method.spatial == "adaptive":  # the adaptive bias runs on its own defaults
        from compinv_rt.spatial.plan import ADAPTIVE_DECAY, ADAPTIVE_STEPS, ADAPTIVE_STRENGTH

        decides.update(adaptive=[ADAPTIVE_STRENGTH, ADAPTIVE_STEPS, ADAPTIVE_DECAY])
    elif method.spatial != "none":
        decides.update(bias_strength=cfg.bias_strength, spatial_steps=cfg.spatial_steps)
    if detector is not None:
        decides["detector_threshold"] = cfg.detector_threshold
    concepts = ([folders[n, method.embedding, seed].name for n in prompt.concepts]
                if method.trained else [WORDS])
    return _key({"config": decides, "spatial": method.spatial, "template": prompt.template,
                 "detect": prompt.detect, "model": model_hash, "concepts": concepts,
                 "clip": str(clip), "detector": str(detector)})


def _copy_cell(src: Path, dst: Path) -> None:
    from compinv_rt.core.outputs import atomic_write_bytes

    atomic_write_bytes(dst.with_suffix(".png"), src.with_suffix(".png").read_bytes())
    atomic_write_bytes(dst, src.read_bytes())  # the JSON last: it marks the cell complete


def _load_scorers(protocol, clip, detector, cfg, status) -> Scorers:
    s = Scorers()
    if any(prompt_slots(p, protocol.by_name) is not None for p in protocol.prompts):
        from compinv_rt.apps.world.judge import load_judge

        s.judge = load_judge()
    if clip is not None:
        from compinv_rt.apps.eval.clip_metrics import ClipScorer

        status(f"loading CLIP from {clip}")
        s.clip = ClipScorer(clip)
    if detector is not None:
        from compinv_rt.apps.eval.clip_metrics import DetrScorer

        status(f"loading DETR from {detector}")
        s.detector = DetrScorer(detector, cfg.detector_threshold)
    return s


def _photo_features(scorer, protocol, cache, size) -> dict:
    from compinv_rt.apps.eval.training import concept_photos
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


def _run_cell(method, prompt, run: _Run, seed: int = 0, on_batch=None) -> dict:
    from compinv_rt.generate.batching import pack
    from compinv_rt.generate.requests import build_request
    from compinv_rt.spatial.layouts import concept_phrases

    t0 = time.time()
    session = run.session
    assert session is not None  # opened before the first cell
    concepts = run.protocol.by_name
    if method.trained:
        concept_dirs = tuple(str(run.folders[n, method.embedding, seed]) for n in prompt.concepts)
        used = session.load_concepts(concept_dirs)
        raw = prompt.render(concepts, "tokens", method.embedding, seed)
    else:  # the concept written out in words: no token at all
        concept_dirs, used, raw = (), [], prompt.render(concepts, "world")
    text = session.expand(raw, used)
    phrases = concept_phrases(raw)  # objects in order of mention ("<tok> heart", "blue circle")
    request = build_request(_cell_spec(run.cfg, method, raw, phrases, concept_dirs))
    positions = _token_positions(session, method, prompt, text, used, phrases, concepts)
    readable = prompt_slots(prompt, concepts) if run.scorers.judge is not None else None
    samples, images, layout = [], [], None
    tasks = session.tasks(request)
    # one request: every task has the same key, so these are the request's tasks in order, cut
    # into batches of cfg.batch
    for _, batch in pack(tasks, session.batch_key, run.cfg.batch):
        results = session.run_batch(batch)
        layout = results[0].spatial
        samples += _score_batch(run.scorers, prompt, concepts, results, readable, positions)
        images += [r.image for r in results]
        if on_batch is not None:
            on_batch(len(images), len(tasks))
    return {"method": method.name, "prompt": prompt.to_json(), "text": text,
            "train_seed": seed if method.trained else None,
            "judged": readable is not None, "spatial": layout, "samples": samples,
            "seconds": round(time.time() - t0, 2), "_images": images}


def _cell_spec(cfg: EvalConfig, method, raw: str, phrases: list, concept_dirs: tuple):
    """A cell's request: the protocol's sampler and seeds; the method's spatial mode on the fixed
    reference boxes (the adaptive bias on its own defaults); attention recorded in every method."""
    from compinv_rt.generate.requests import RequestSpec
    from compinv_rt.spatial.layouts import boxes_layout, fixed_boxes
    from compinv_rt.spatial.plan import SpatialOptions

    own_defaults = method.spatial == "adaptive"
    spatial = SpatialOptions(
        None if method.spatial == "none" else method.spatial,
        None if method.spatial == "none" else boxes_layout(phrases, fixed_boxes(len(phrases))),
        None if own_defaults else cfg.bias_strength, None if own_defaults else cfg.spatial_steps,
        save_attention=True)
    return RequestSpec(raw, cfg.seed, cfg.samples, steps=cfg.steps, guidance=cfg.guidance,
                       scheduler=cfg.scheduler, guidance_interval=cfg.guidance_interval,
                       concepts=concept_dirs, spatial=spatial, cache_interval=cfg.cache_interval)


def _token_positions(session, method, prompt, text: str, used: list, phrases: list,
                     concepts: dict) -> tuple[list, list, list]:
    """-> (content token labels, each concept's token positions, the other objects' positions)."""
    from compinv_rt.spatial.heatmaps import prompt_token_labels
    from compinv_rt.spatial.layouts import concept_tokens

    tok = session.model.tokenizer
    ids = tok(text, truncation=True, max_length=tok.model_max_length).input_ids
    content = [p for p, _ in prompt_token_labels(tok, text)]
    if method.trained:
        concept_pos = [[i for i, t in enumerate(ids) if t in set(a.token_ids)] for a in used]
        tokens = {a.token for a in used}
        others = [p for p in phrases if not any(t in p for t in tokens)]
    else:  # the concept's own words stand where its token would
        words = [concepts[n].words() for n in prompt.concepts]
        concept_pos = concept_tokens(tok, text, words)
        others = [p for p in phrases if not any(w in p for w in words)]
    other_pos = concept_tokens(tok, text, others) if others else []
    return content, concept_pos, other_pos


def _score_batch(scorers: Scorers, prompt, concepts: dict, results: list, readable,
                 positions: tuple[list, list, list]) -> list[dict]:
    """Per image of one batch: attention shares, CLIP, DETR and (world prompts) the judge's scores."""
    import torch

    imgs = [r.image for r in results]
    judged = scorers.judge(imgs) if readable is not None else [None] * len(imgs)
    clip = (scorers.clip.score(imgs, prompt.render(concepts, "plain"), torch.cat(
        [scorers.photo_features[n] for n in prompt.concepts]))
        if scorers.clip is not None else [{}] * len(imgs))
    detr = None
    if scorers.detector is not None and prompt.detect and \
            len(scorers.detector.known(prompt.detect)) == len(prompt.detect):
        detr = scorers.detector.coi(imgs, list(prompt.detect))
    samples = []
    for j, r in enumerate(results):
        rec = {"seed": r.seed, **attention_stats(r.attention, *positions),
               **clip[j], "detr_coi": None if detr is None else detr[j]}
        if readable is not None:
            rec.update(score_image(readable[0], readable[1], judged[j],
                                   scorers.judge.config.size))
            rec["judgement"] = judged[j].to_json()  # type: ignore[union-attr]
        samples.append(rec)
    return samples


def _embedding_analysis(folders) -> dict:
    """Per concept and recipe, the analysis of the seed-0 training (and how many seeds ran)."""
    from compinv_rt.models.artifact import read_artifact

    out: dict[str, dict] = {}
    for (name, emb, seed), folder in sorted(folders.items(), key=lambda kv: kv[0][2]):
        if seed != 0:
            out[name][emb]["seeds"] += 1
            continue
        art = read_artifact(folder)
        a = art["analysis"]
        v = a["vectors"][0]
        out.setdefault(name, {})[emb] = {
            "token": art["token"], "folder": str(folder), "seeds": 1,
            "norm": v["norm"], "norm_x_median": round(v["norm"] / a["vocabulary_norm_median"], 3),
            "norm_percentile": v["norm_percentile"], "nearest_word": v["nearest_word"],
            "nearest_word_distance": v["nearest_word_distance"],
            "anchor_distance": v.get("target_distance"),
            "vocabulary_norm_median": a["vocabulary_norm_median"],
            "vocabulary_nn_distance_median": a["vocabulary_nn_distance_median"],
            "train_seconds": art.get("seconds"), "final_loss": art["loss"]["final"],
        }
    return out


KINDS = ("single", "pretrained", "inverted")
RANGE_KEYS = ("coi", "identity", "accuracy", "region")


def _spread(values: list) -> list | None:
    vals = [v for v in values if v is not None]
    return [round(min(vals), 4), round(max(vals), 4)] if vals else None


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def _method_block(m, protocol, cells, seeds) -> dict:
    """Pooled means over images of every seed, per-seed means and their range."""
    from compinv_rt.apps.eval.metrics import concept_metrics

    def pooled(kinds, seed_list):
        return [r for s in seed_list for p in protocol.prompts if p.kind in kinds
                for r in cells[m.name, p.id, s]["samples"]]

    block = {"label": m.label, "embedding": m.embedding, "spatial": m.spatial,
             "seeds": len(seeds)}
    for kind in KINDS:
        block[kind] = aggregate(pooled((kind,), seeds))
    block["compositions"] = aggregate(pooled(("pretrained", "inverted"), seeds))
    block["all"] = aggregate(pooled(KINDS, seeds))
    per_seed = {s: {k: aggregate(pooled((k,) if k in KINDS else KINDS, [s]))
                    for k in (*KINDS, "all")} for s in seeds}
    block["range"] = {k: {key: _spread([per_seed[s][k].get(key) for s in seeds])
                          for key in RANGE_KEYS} for k in (*KINDS, "all")}
    block["per_concept"] = {}
    block["per_concept_seeds"] = {}
    for c in protocol.concepts:
        group = {"single": ("single",), "pretrained": ("pretrained",),
                 "compositions": ("pretrained", "inverted"), "all": KINDS}
        mine = lambda kinds, seed_list: [  # noqa: E731
            r for s in seed_list for p in protocol.prompts if p.kind in kinds and
            c.name in p.concepts for r in cells[m.name, p.id, s]["samples"]]
        block["per_concept"][c.name] = {
            **aggregate(mine(KINDS, seeds)),
            **{g: concept_metrics(mine(kinds, seeds), c.name) for g, kinds in group.items()}}
        block["per_concept_seeds"][c.name] = {
            str(s): {g: concept_metrics(mine(kinds, [s]), c.name) for g, kinds in group.items()}
            for s in seeds}
    block["seconds"] = round(sum(cells[m.name, p.id, s]["seconds"] for p in protocol.prompts
                                 for s in seeds), 1)
    return block


def word_parity(methods: dict, protocol) -> tuple[dict, dict]:
    """Per concept and method: identity over the words' identity ("word parity") on single
    prompts and in compositions, and the other object's rate over the words' rate; mean and
    range over training seeds. Then per method the means over concepts (words >= WORDS_FLOOR),
    and the other object's pooled rate over the words' pooled rate."""
    from compinv_rt.apps.eval.metrics import ratio

    words = methods.get(WORDS)
    per_concept: dict = {}
    summary: dict = {}
    if words is None:
        return per_concept, summary
    for c in protocol.concepts:
        w = words["per_concept"][c.name]
        oracle = {"single": w["single"]["identity"], "compositions": w["compositions"]["identity"],
                  "other": w["pretrained"]["other"]}
        entry: dict = {"words": oracle,
                       "below_floor": (w["compositions"]["identity"] or 0) < WORDS_FLOOR}
        for name, m in methods.items():
            if name == WORDS:
                continue
            seeds = m["per_concept_seeds"][c.name].values()
            row = {}
            for g in ("single", "compositions"):
                vals = [ratio(s[g]["identity"], oracle[g]) for s in seeds]
                row[g] = {"identity": m["per_concept"][c.name][g]["identity"],
                          "identity_range": _spread([s[g]["identity"] for s in seeds]),
                          "parity": _mean(vals), "parity_range": _spread(vals)}
            vals = [ratio(s["pretrained"]["other"], oracle["other"]) for s in seeds]
            row["other"] = {"rate": m["per_concept"][c.name]["pretrained"]["other"],
                            "rate_range": _spread([s["pretrained"]["other"] for s in seeds]),
                            "vs_words": _mean(vals), "vs_words_range": _spread(vals)}
            entry[name] = row
        per_concept[c.name] = entry
    counted = [n for n, e in per_concept.items() if not e["below_floor"]]
    for name in methods:
        if name == WORDS:
            continue
        summary[name] = {
            "concepts": len(counted),
            "parity_compositions": _mean([per_concept[n][name]["compositions"]["parity"]
                                          for n in counted]),
            "parity_single": _mean([per_concept[n][name]["single"]["parity"] for n in counted]),
            "other_vs_words": _mean([per_concept[n][name]["other"]["vs_words"] for n in counted]),
            # the pooled rates' ratio: a concept the base rarely draws the other object beside
            # (a small words rate) cannot swing it as it swings the mean of ratios
            "other_pooled": ratio(_mean([per_concept[n][name]["other"]["rate"] for n in counted]),
                                  _mean([per_concept[n]["words"]["other"] for n in counted])),
        }
    summary["_below_floor"] = [n for n, e in per_concept.items() if e["below_floor"]]
    return per_concept, summary


def _summarize(run: _Run, cells: dict, seconds: float) -> dict:
    from compinv_rt import __version__
    from compinv_rt.apps.eval.report import write_report

    protocol, cfg, scorers, folders = run.protocol, run.cfg, run.scorers, run.folders
    methods = {m.name: _method_block(m, protocol, cells,
                                     list(range(cfg.train_seeds)) if m.trained else [0])
               for m in protocol.methods}
    parity, parity_summary = word_parity(methods, protocol)
    results = {
        "kind": "compinv-rt.eval", "compinv_rt": __version__,
        "model": {"path": str(run.files.root), "hash": run.model_hash},
        "config": cfg.as_dict(), "protocol": protocol.to_json(),
        "judge": "shapes-world judge" if scorers.judge is not None else
                 "skipped (no prompt whose concepts all have world attributes)",
        "clip": str(scorers.clip.path) if scorers.clip is not None else "skipped (no --clip)",
        "detector": (str(scorers.detector.path) if scorers.detector is not None
                     else "skipped (no --detector)"),
        "trained": {f"{n}-{e}" + (f"-s{s}" if s else ""): {"folder": str(f),
                                                             "reused": run.reused[n, e, s]}
                    for (n, e, s), f in folders.items()},
        "embeddings": _embedding_analysis(folders),
        "methods": methods,
        "word_parity": parity,
        "word_parity_summary": parity_summary,
        "seconds": round(seconds, 1),
    }
    results["report"] = {k: str(v) for k, v in write_report(results, run.out).items()}
    return results
