"""The training loop: semantic inversion (anchor weight > 0) or plain textual inversion (0).

`prepare` checks everything cheap (model folder, tokenizer, token, words, images) before any
weights load or any file is written. `train_concept` then:
  1. loads the model, adds the placeholder token(s), installs the trainable-rows embedding;
  2. encodes every image variant with the VAE once (`data.encode_variants`);
  3. per step and micro-batch: draws variants, a latent sample, noise, timesteps and prompts from a
     generator seeded by (seed, step, micro) -- so a resumed run repeats the uninterrupted one --,
     runs text encoder + UNet, and minimizes
         recon_weight * masked_mse + anchor_weight * (attraction + l1 penalty);
  4. checkpoints every `checkpoint_every` steps (atomic; the last two are kept);
  5. writes the rows into the table (only those rows change) and the artifacts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from compinv_rt.core.errors import ConfigError, OutputError
from compinv_rt.train.config import RESUME_KEYS, TrainConfig

if TYPE_CHECKING:
    from compinv_rt.models.loading import ModelFiles

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
HISTORY_COLUMNS = ("rec", "anchor", "l1", "loss", "anchor_distance", "context")


@dataclass(frozen=True)
class StepInfo:
    step: int  # steps done (1-based)
    total: int
    rec: float
    anchor: float
    l1: float
    loss: float
    anchor_distance: float
    context: float = 0.0  # the context regularizer's loss (0 when off)


@dataclass
class Plan:
    """What `prepare` validated."""

    config: TrainConfig
    files: ModelFiles
    tokenizer: object
    image_files: list[Path]
    images: list
    resolution: int
    anchor_words: list[str]
    contexts: list[str] | None = None  # per image: what it shows besides the concept
    masks: list | None = None  # per image: soft subject mask (H, W) in [0, 1]

    def prompt_contexts(self) -> list[str] | None:
        """Per image, the text after the concept in its training prompts."""
        ctx = self.contexts or [""] * len(self.images)
        if self.config.context_token:
            ctx = [f"{c} {self.config.context_token_name}".strip() for c in ctx]
        return ctx if any(ctx) else None

    def inputs_hash(self) -> str:
        """The images, their captions and masks: what the training reads besides the model."""
        import hashlib

        from compinv_rt.train.data import images_hash

        h = hashlib.sha256(images_hash(self.image_files).encode())
        h.update(json.dumps(self.contexts).encode())
        for m in self.masks or []:
            h.update(np.ascontiguousarray(m, np.float32).tobytes())
        return h.hexdigest()


@dataclass
class TrainResult:
    out: Path
    record: dict
    resumed_from: int
    seconds: float
    anchors: list = field(default_factory=list)
    model: object = None  # the LoadedModel, with the trained rows in its text encoder's table


def load_tokenizer(files):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(files.root), subfolder="tokenizer",
                                             local_files_only=True)
    except Exception as exc:
        from compinv_rt.core.errors import ModelError

        raise ModelError(f"cannot load the tokenizer of {files.root}: {exc}") from None


def prepare(config: TrainConfig, images_dir, model=None) -> Plan:
    """Validate everything that is cheap to validate. Raises ConfigError/ModelError."""
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir
    from compinv_rt.models.tokens import check_new_token, single_token_id
    from compinv_rt.train.anchors import resolve_anchor_words
    from compinv_rt.train.data import list_images, read_captions, read_images, read_masks

    image_files = list_images(images_dir)
    files = inspect_model_dir(resolve_model_dir(model))
    tok = load_tokenizer(files)
    check_new_token(tok, config.token, config.vectors)
    if config.context_token:
        check_new_token(tok, config.context_token_name)
    single_token_id(tok, config.init, "init word")
    anchor_words = resolve_anchor_words(tok, config.anchors, config.class_word, config.init)
    res = config.resolution or files.default_size
    if res % files.spatial_factor:
        raise ConfigError(f"--resolution {res} is not a multiple of {files.spatial_factor} "
                          "(this model's VAE x UNet down-sampling factor)")
    images = read_images(image_files)
    contexts = read_captions(config.captions, image_files)
    masks = read_masks(config.masks, image_files)
    return Plan(config, files, tok, image_files, images, res, anchor_words, contexts, masks)


# ------------------------------------------------------------------------------------------------
# checkpoints


def _ckpt_path(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}.safetensors"


def save_checkpoint(out: Path, step: int, vectors, target, optimizer, history: np.ndarray,
                    fingerprint: dict, config: TrainConfig) -> Path:
    import torch
    from safetensors.torch import save

    from compinv_rt.core.outputs import atomic_write_bytes

    tensors = {"vectors": vectors.detach().float().contiguous(),
               "coefs": target.coefs.detach().float().contiguous(),
               "history": torch.from_numpy(np.ascontiguousarray(history, dtype=np.float32))}
    for pid, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().float().contiguous().reshape(
                torch.as_tensor(v).shape)
    meta = {"step": str(step), "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "config": json.dumps(config.as_dict())}
    path = atomic_write_bytes(_ckpt_path(out, step), save(tensors, metadata=meta))
    for old in sorted((out / CHECKPOINTS).glob("step-*.safetensors"))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(out: Path):
    """-> (step, tensors, metadata) of the newest readable checkpoint, or None."""
    from safetensors import safe_open

    for path in sorted((out / CHECKPOINTS).glob("step-*.safetensors"), reverse=True):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return int(meta["step"]), tensors, meta
        except Exception as exc:  # a torn file from an old crash: fall back to the previous one
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
    return None


def _restore_optimizer(optimizer, tensors: dict) -> None:
    sd = optimizer.state_dict()
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    sd["state"] = state
    optimizer.load_state_dict(sd)


def _fingerprint(config: TrainConfig, model_hash: str, images_hash: str) -> dict:
    d = config.as_dict()
    return {**{k: d[k] for k in RESUME_KEYS}, "base_model_hash": model_hash,
            "images_hash": images_hash}


def resume_point(out: Path, cfg: TrainConfig, fingerprint: dict, status):
    """The newest checkpoint to resume from (None: start at 0); refuses a different config."""
    for stale in out.rglob(".*.tmp"):  # temp files of writes cut short by a kill
        stale.unlink(missing_ok=True)
    ck = latest_checkpoint(out)
    if ck is None:
        status("no checkpoint to resume from: starting from step 0")
        return None
    step, _, meta = ck
    saved = json.loads(meta["fingerprint"])
    diff = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
    if diff:
        raise ConfigError(f"cannot resume {out}: it was trained with different "
                          f"{', '.join(diff)} (checkpoint {step})")
    if step > cfg.steps:
        raise ConfigError(f"cannot resume {out}: its checkpoint is at step {step}, "
                          f"beyond --steps {cfg.steps}")
    return ck


def check_out_dir(out: Path, resume: bool) -> None:
    from compinv_rt.core.outputs import check_writable_dir

    check_writable_dir(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file")
    if resume or not out.exists():
        return
    if any(out.iterdir()):
        raise OutputError(f"--out {out} is not empty; pass --resume to continue the training "
                          "there, or choose another folder")


# ------------------------------------------------------------------------------------------------
# the loop


def _auto_masks(m, plan: Plan, out: Path, status) -> list:
    """`--masks auto`: masks from the base model's attention to the class word, saved as PNGs
    next to the artifacts (auto_masks/) so they can be checked."""
    from compinv_rt.core.outputs import save_png
    from compinv_rt.train.auto_masks import attention_masks

    status(f"masks from the base model's attention to {plan.config.class_word!r}")
    masks = attention_masks(m, plan.images, plan.resolution, plan.config.class_word,
                            plan.config.seed)
    from PIL import Image

    for f, mask in zip(plan.image_files, masks):
        save_png(out / "auto_masks" / f"{f.stem}.png",
                 Image.fromarray((mask * 255).round().astype(np.uint8)))
    return masks


def _step_generator(seed: int, step: int, micro: int):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2 ** 62))


def _diverged(out: Path, step: int, loss: float):
    from compinv_rt.core.errors import NonFiniteError

    kept = sorted((out / CHECKPOINTS).glob("step-*.safetensors"))
    last = (f"the last good checkpoint ({kept[-1].name}) is kept" if kept
            else "no checkpoint was written yet")
    raise NonFiniteError(f"training diverged at step {step} (loss {loss:.4g}, or the embedding is "
                         f"no longer finite); nothing of that step was saved; {last}; retrain with a lower --lr")


def train_concept(plan: Plan, out: str | Path, resume: bool = False, device: str = "auto",
                  on_step: Callable[[StepInfo], None] | None = None,
                  on_status: Callable[[str], None] | None = None,
                  analysis_words: list[str] | None = None) -> TrainResult:
    import torch
    from diffusers import DDPMScheduler

    from compinv_rt import __version__
    from compinv_rt.models import tokens as T
    from compinv_rt.models.artifact import FORMAT, SCHEMA_VERSION
    from compinv_rt.models.loading import content_hash, load_model
    from compinv_rt.train import anchors as A
    from compinv_rt.train import regularizers as R
    from compinv_rt.train.analysis import analyze, vocabulary_ids
    from compinv_rt.train.data import DEFAULT_TEMPLATES, build_prompts, encode_variants, images_hash, make_variants
    from compinv_rt.train.losses import diffusion_target, masked_mse
    from compinv_rt.train.save import write_artifacts

    cfg = plan.config
    out = Path(out)
    status = on_status or (lambda msg: log.info(msg))
    check_out_dir(out, resume)
    t_start = time.perf_counter()
    img_hash = images_hash(plan.image_files)
    fingerprint = _fingerprint(cfg, content_hash(plan.files.all_files()), plan.inputs_hash())
    ck = resume_point(out, cfg, fingerprint, status) if resume else None  # before heavy work

    m = load_model(str(plan.files.root), device=device, dtype="fp32")  # training runs in fp32
    tok, te, unet, vae = m.tokenizer, m.text_encoder, m.unet, m.vae
    masks = plan.masks
    if (cfg.masks or "").strip().lower() == "auto":
        masks = _auto_masks(m, plan, out, status)
    table0 = te.get_input_embeddings().weight.detach().clone()  # the real vocabulary, untouched
    init_id = T.single_token_id(tok, cfg.init, "init word")
    anchor_ids = A.resolve_anchor_ids(tok, table0, cfg.anchors, cfg.class_word, init_id)
    ids = T.add_placeholders(tok, te, cfg.token, cfg.vectors)
    seq_len = tok.model_max_length
    init = table0[init_id][None].repeat(cfg.vectors, 1)  # (N, D)
    n_vec = cfg.vectors
    if cfg.context_token:  # one more trainable row right after the concept's, never saved
        ctx_ids = T.add_placeholders(tok, te, cfg.context_token_name, 1)
        if ctx_ids[0] != ids[-1] + 1:
            raise ConfigError(f"tokenizer gave the context token id {ctx_ids[0]}, not {ids[-1] + 1}")
        init = torch.cat([init, table0[init_id][None]])
    wrapper = T.install(te, ids[0], init)
    target = A.AnchorTarget(table0[anchor_ids]).to(m.device)
    vocab = vocabulary_ids(tok, analysis_words or plan.files.vocabulary)
    norm_kind, norm_value = R.parse_norm(cfg.norm_spec)
    fixed_norm = (R.vocabulary_norm(table0, vocab) * (norm_value or 1.0) if norm_kind == "vocab"
                  else norm_value)  # norm_value: K for vocab:K (1 for vocab), X for a fixed norm
    if fixed_norm is not None:
        R.project_norm(wrapper.vectors.data[:n_vec], fixed_norm)
        status(f"vector norm fixed at {fixed_norm:.4f} (direction learned)")

    # -- data: encode each variant once --------------------------------------------------------
    contexts = plan.prompt_contexts()
    variants = make_variants(plan.images, plan.resolution, cfg.augment, cfg.variants, cfg.seed,
                             masks, contexts)
    status(f"encoding {len(variants)} image variants with the VAE (once)")
    bank = encode_variants(vae, variants, plan.files.vae_scale_factor, m.device, m.dtype)
    placeholder_text = " ".join(T.placeholder_tokens(cfg.token, cfg.vectors))
    templates = cfg.templates or DEFAULT_TEMPLATES
    prompts = build_prompts(tok, templates, placeholder_text, cfg.class_word, contexts or [""])
    scheduler = DDPMScheduler.from_config(plan.files.scheduler_config)
    pred_type = plan.files.prediction_type
    n_train_t = scheduler.config.num_train_timesteps
    use_mask = getattr(te.config, "use_attention_mask", False)
    context_reg = None
    if cfg.context_weight > 0:
        others = R.composition_others(plan.files.vocabulary, cfg.class_word)
        context_reg = R.ContextRegularizer(tok, te, templates, placeholder_text, cfg.class_word,
                                           cfg.vectors, others, use_mask)

    groups = [{"params": [wrapper.vectors], "lr": cfg.effective_lr,
               "weight_decay": cfg.weight_decay}]
    if target.learned:
        groups.append({"params": [target.coefs], "lr": cfg.coef_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)

    # -- resume: restore the checkpoint read before loading -----------------------------------
    start, history = 0, np.zeros((0, len(HISTORY_COLUMNS)), np.float32)
    if ck is not None:
        start, tensors, _ = ck
        with torch.no_grad():
            wrapper.vectors.copy_(tensors["vectors"])
            target.coefs.copy_(tensors["coefs"])
        _restore_optimizer(optimizer, tensors)
        history = tensors["history"].numpy()[:start].copy()
        if history.shape[1] < len(HISTORY_COLUMNS):  # a checkpoint from before a column existed
            history = np.pad(history, ((0, 0), (0, len(HISTORY_COLUMNS) - history.shape[1])))
        status(f"resuming from checkpoint at step {start}")

    # -- train --------------------------------------------------------------------------------
    rows = [history] if len(history) else []
    unet.eval()
    te.eval()
    for step in range(start, cfg.steps):
        parts = np.zeros(4)
        for micro in range(cfg.grad_accum):
            gen = _step_generator(cfg.seed, step, micro)
            pick = torch.randint(len(variants), (cfg.batch,), generator=gen)
            latents = bank.sample(pick, gen)  # (B, C, h, w)
            noise = torch.randn(latents.shape, generator=gen).to(latents)
            t = torch.randint(0, n_train_t, (cfg.batch,), generator=gen).to(m.device)
            input_ids = prompts.pick([bank.keys[i] for i in pick.tolist()], gen).to(m.device)
            noisy = scheduler.add_noise(latents, noise, t)
            mask = (input_ids != tok.pad_token_id).long() if use_mask else None
            states = te(input_ids, attention_mask=mask)[0]  # (B, 77, D)
            pred = unet(noisy, t, states, return_dict=False)[0]
            rec = masked_mse(pred, diffusion_target(scheduler, pred_type, latents, noise, t),
                             bank.mask[pick])
            attraction, l1 = A.anchor_loss(wrapper.vectors[:n_vec], target, seq_len, cfg.anchor_l1)
            loss = cfg.recon_weight * rec + cfg.anchor_weight * (attraction + l1)
            ctx_loss = (context_reg.loss(te, gen, cfg.batch) if context_reg is not None
                        else rec.new_zeros(()))
            loss = loss + cfg.context_weight * ctx_loss
            (loss / cfg.grad_accum).backward()
            parts += np.array([rec.item(), attraction.item(), l1.item(),
                               ctx_loss.item()]) / cfg.grad_accum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        target.project()
        if fixed_norm is not None:
            R.project_norm(wrapper.vectors.data[:n_vec], fixed_norm)
        with torch.no_grad():
            dist = float((wrapper.vectors[:n_vec] - target()[None]).norm(dim=-1).mean())
        total = (cfg.recon_weight * parts[0] + cfg.anchor_weight * (parts[1] + parts[2])
                 + cfg.context_weight * parts[3])
        row = np.array([[parts[0], parts[1], parts[2], total, dist, parts[3]]], np.float32)
        done = step + 1
        if not (np.isfinite(row).all() and bool(wrapper.vectors.isfinite().all())):
            _diverged(out, done, total)  # nothing of this step is saved
        rows.append(row)
        if on_step is not None:
            on_step(StepInfo(done, cfg.steps, *map(float, row[0])))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(out, done, wrapper.vectors, target, optimizer,
                            np.concatenate(rows), fingerprint, cfg)
    history = np.concatenate(rows) if rows else history

    # -- finish: rows into the table, analysis, artifacts -------------------------------------
    vectors = wrapper.vectors.detach()[:n_vec].clone()  # the context token is dropped here
    wrapper.vectors = torch.nn.Parameter(vectors.clone())
    T.uninstall(te, wrapper)
    reports = A.report(tok, anchor_ids, target)
    with torch.no_grad():
        tgt = target().detach()
    analysis = analyze(table0, tok, vectors, tgt, anchor_ids, vocab, seed=cfg.seed)
    seconds = time.perf_counter() - t_start
    tokens = T.placeholder_tokens(cfg.token, cfg.vectors)
    n = len(history)
    tail = history[-max(1, n // 10):]
    head = history[:max(1, n // 10)]
    record = {
        "schema_version": SCHEMA_VERSION,
        "kind": "compinv-rt.concept",
        "method": "semantic-inversion" if cfg.anchor_weight > 0 else "textual-inversion",
        "token": cfg.token,
        "tokens": tokens,
        "vectors": cfg.vectors,
        "class_word": cfg.class_word,
        "init_word": cfg.init,
        "base_model": {"hash": m.hash, "path": str(m.root),
                       "prediction_type": pred_type},
        "images": {"count": len(plan.image_files), "hash": img_hash,
                   "files": [p.name for p in plan.image_files], "variants": len(variants)},
        "anchors": [vars(r) for r in reports],
        "anchors_carrying_weight": [r.word for r in reports if r.carries_weight],
        "anchor_target_distance": round(float((vectors - tgt[None]).norm(dim=-1).mean()), 6),
        "config": cfg.as_dict(),
        "effective_lr": cfg.effective_lr,
        # what --norm applied (`auto` resolved): the config alone does not say
        "norm_constraint": {"spec": cfg.norm_spec,
                            "value": None if fixed_norm is None else round(fixed_norm, 6)},
        "steps_done": n,
        "loss": {
            "columns": list(HISTORY_COLUMNS),
            "first_10pct_mean": [round(float(v), 6) for v in head.mean(0)],
            "last_10pct_mean": [round(float(v), 6) for v in tail.mean(0)],
            "final": [round(float(v), 6) for v in history[-1]],
        },
        "analysis": analysis,
        "seconds": round(seconds, 2),
        "compinv_rt": __version__,
    }
    metadata = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION), "token": cfg.token,
                "vectors": str(cfg.vectors), "base_model_hash": m.hash,
                "class_word": cfg.class_word, "config": cfg.as_dict()}
    title = (f"{cfg.token} ({record['method']}, anchor weight {cfg.anchor_weight}, "
             f"anchors {', '.join(r.word for r in reports)})")
    record = write_artifacts(out, token=cfg.token, vectors=vectors, metadata=metadata,
                             history=history, record=record, title=title)
    return TrainResult(out, record, start, seconds, reports, m)
