"""The training loop: semantic inversion (anchor weight > 0) or plain textual inversion (0).

`prepare` checks everything cheap (model folder, tokenizer, token, words, images) before any
weights load or any file is written. `train_concept` then:
  1. loads the model, adds the placeholder token(s), installs the trainable-rows embedding
     (`_load_model`, `_install_rows`);
  2. encodes every image variant with the VAE once (`_encode_data`, `data.encode_variants`);
  3. restores a checkpoint (`_restore`), then per step and micro-batch (`_step`): draws variants, a
     latent sample, noise, timesteps and prompts from a generator seeded by (seed, step, micro) --
     so a resumed run repeats the uninterrupted one --, runs text encoder + UNet, and minimizes
         recon_weight * masked_mse + anchor_weight * (attraction + l1 penalty);
  4. checkpoints every `checkpoint_every` steps (atomic; the last two are kept; `_train_steps`);
  5. writes the rows into the table (only those rows change) and the artifacts (`_finish`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    """Validate everything that is cheap to validate: the photos, their captions and masks (files
    only, before torch is imported), then the model folder, the tokenizer and what needs it.
    Raises ConfigError/ModelError."""
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir
    from compinv_rt.train.data import list_images, read_captions, read_images, read_masks

    image_files = list_images(images_dir)
    images = read_images(image_files)
    contexts = read_captions(config.captions, image_files)
    masks = read_masks(config.masks, image_files)
    files = inspect_model_dir(resolve_model_dir(model))
    from compinv_rt.models.tokens import check_new_token, single_token_id
    from compinv_rt.train.anchors import resolve_anchor_words

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
    check_prompt_lengths(config, tok, image_files, contexts, files.vocabulary)
    return Plan(config, files, tok, image_files, images, res, anchor_words, contexts, masks)


def check_prompt_lengths(cfg: TrainConfig, tok, image_files: list[Path],
                         contexts: list[str] | None, vocabulary=None) -> None:
    """Every training prompt (template, framing phrase, the token's vectors, class word, the
    photo's caption, the context token; the context regularizer's composition prompts) fits the
    text encoder's 77 tokens: a longer one would be cut without a word (generate refuses them).

    The placeholders are not in `tok` yet: the prompts are measured without them, each counting
    one token (an added token is split off before the BPE, so the rest tokenizes the same)."""
    from compinv_rt.models import tokens as T
    from compinv_rt.train.data import DEFAULT_TEMPLATES, prompt_lengths, training_prompts

    templates = cfg.templates or DEFAULT_TEMPLATES
    photo_of: dict[str, str] = {}  # caption -> the first photo with it
    for f, c in zip(image_files, contexts or [""] * len(image_files)):
        photo_of.setdefault(c, f.name)
    ctx_token = [cfg.context_token_name] if cfg.context_token else []
    shown = " ".join(T.placeholder_tokens(cfg.token, cfg.vectors))
    plain = training_prompts(templates, "", cfg.class_word, list(photo_of))
    real = training_prompts(templates, shown, cfg.class_word,
                            [" ".join([c, *ctx_token]).strip() for c in photo_of])
    cases = [(p, cfg.vectors + len(ctx_token), r, photo_of[ctx])
             for ((_, ctx), p), (_, r) in zip(plain, real)]
    if cfg.context_weight > 0:
        from compinv_rt.train.regularizers import composition_others

        cases += [(t.format(f"{cfg.class_word} and {o}"), cfg.vectors,
                   t.format(f"{shown} {cfg.class_word} and {o}"), "")
                  for t in templates for o in composition_others(vocabulary, cfg.class_word)]
    totals = [n + c[1] for n, c in zip(prompt_lengths(tok, [c[0] for c in cases]), cases)]
    top = tok.model_max_length
    if not totals or max(totals) <= top:
        return
    n = max(totals)
    _, _, prompt, photo = cases[totals.index(n)]
    why = [f"the caption of {photo}" if photo and contexts else "",
           f"the token's {cfg.vectors} vectors count {cfg.vectors}" if cfg.vectors > 1 else ""]
    prompt = prompt if len(prompt) <= 100 else prompt[:97] + "..."
    raise ConfigError(
        f"a training prompt is {n} tokens, over the {top} the text encoder reads "
        f"({'; '.join(w for w in why if w) or 'its template'}): {prompt!r}; shorten the "
        "caption or the templates, or use fewer --vectors")


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
    from compinv_rt.core.outputs import FolderLock

    if any(p.name != FolderLock.NAME for p in out.iterdir()):  # the lock is this run's own
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


@dataclass
class _Embedding:
    """The fp32 model with the token's trainable rows installed, and what the anchor loss, the norm
    constraint and the analysis read."""

    m: Any  # models.loading.LoadedModel
    table0: Any  # the real vocabulary, untouched
    anchor_ids: list
    wrapper: Any  # models.tokens' trainable-rows embedding
    target: Any  # anchors.AnchorTarget
    vocab: Any  # the analysis vocabulary's ids
    fixed_norm: float | None  # --norm: every vector's norm (None: free)
    n_vec: int  # the concept's vectors (a context token's row follows them)


@dataclass
class _Data:
    """What every step draws from: the encoded variants, the prompts, the noise schedule."""

    n_variants: int
    bank: Any  # data.encode_variants' latents, keys and loss masks
    prompts: Any  # data.build_prompts' token ids per variant key
    scheduler: Any  # DDPMScheduler
    pred_type: str
    use_mask: bool  # the text encoder takes an attention mask
    context_reg: Any  # regularizers.ContextRegularizer, or None


@dataclass
class _Training:
    """One training run, handed to its steps."""

    cfg: TrainConfig
    out: Path
    fingerprint: dict  # what a resumed run must match
    images_hash: str
    t_start: float
    emb: _Embedding
    data: _Data
    optimizer: Any


def train_concept(plan: Plan, out: str | Path, resume: bool = False, device: str = "auto",
                  on_step: Callable[[StepInfo], None] | None = None,
                  on_status: Callable[[str], None] | None = None,
                  analysis_words: list[str] | None = None) -> TrainResult:
    from compinv_rt.models.loading import content_hash
    from compinv_rt.train.data import images_hash

    cfg = plan.config
    out = Path(out)
    status = on_status or (lambda msg: log.info(msg))
    check_out_dir(out, resume)
    t_start = time.perf_counter()
    img_hash = images_hash(plan.image_files)
    fingerprint = _fingerprint(cfg, content_hash(plan.files.all_files()), plan.inputs_hash())
    ck = resume_point(out, cfg, fingerprint, status) if resume else None  # before heavy work

    m, masks = _load_model(plan, out, device, status)
    emb = _install_rows(plan, m, status, analysis_words)
    data = _encode_data(plan, emb, masks, status)
    t = _Training(cfg, out, fingerprint, img_hash, t_start, emb, data, _optimizer(cfg, emb))
    start, history = _restore(t, ck, status)
    history = _train_steps(t, start, history, on_step)
    return _finish(t, plan, history, start)


def _load_model(plan: Plan, out: Path, device: str, status) -> tuple[Any, list | None]:
    """The base model in fp32 (training runs in fp32), and the masks (`--masks auto`: from it)."""
    from compinv_rt.models.loading import load_model

    m = load_model(str(plan.files.root), device=device, dtype="fp32")
    masks = plan.masks
    if (plan.config.masks or "").strip().lower() == "auto":
        masks = _auto_masks(m, plan, out, status)
    return m, masks


def _install_rows(plan: Plan, m, status, analysis_words: list[str] | None) -> _Embedding:
    """Add the placeholder token(s) (and the context token) and install their trainable rows,
    starting at the init word; the anchor target; the fixed norm, applied at once."""
    import torch

    from compinv_rt.models import tokens as T
    from compinv_rt.train import anchors as A
    from compinv_rt.train import regularizers as R
    from compinv_rt.train.analysis import vocabulary_ids

    cfg = plan.config
    tok, te = m.tokenizer, m.text_encoder
    table0 = te.get_input_embeddings().weight.detach().clone()  # the real vocabulary, untouched
    init_id = T.single_token_id(tok, cfg.init, "init word")
    anchor_ids = A.resolve_anchor_ids(tok, table0, cfg.anchors, cfg.class_word, init_id)
    ids = T.add_placeholders(tok, te, cfg.token, cfg.vectors)
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
    return _Embedding(m, table0, anchor_ids, wrapper, target, vocab, fixed_norm, n_vec)


def _encode_data(plan: Plan, emb: _Embedding, masks, status) -> _Data:
    """Encode each image variant with the VAE once; the prompts; the noise schedule; the context
    regularizer (--context-weight)."""
    from diffusers import DDPMScheduler

    from compinv_rt.models import tokens as T
    from compinv_rt.train import regularizers as R
    from compinv_rt.train.data import DEFAULT_TEMPLATES, build_prompts, encode_variants, make_variants

    cfg, m = plan.config, emb.m
    tok, te = m.tokenizer, m.text_encoder
    contexts = plan.prompt_contexts()
    variants = make_variants(plan.images, plan.resolution, cfg.augment, cfg.variants, cfg.seed,
                             masks, contexts)
    status(f"encoding {len(variants)} image variants with the VAE (once)")
    bank = encode_variants(m.vae, variants, plan.files.vae_scale_factor, m.device, m.dtype)
    placeholder_text = " ".join(T.placeholder_tokens(cfg.token, cfg.vectors))
    templates = cfg.templates or DEFAULT_TEMPLATES
    prompts = build_prompts(tok, templates, placeholder_text, cfg.class_word, contexts or [""])
    scheduler = DDPMScheduler.from_config(plan.files.scheduler_config)
    use_mask = getattr(te.config, "use_attention_mask", False)
    context_reg = None
    if cfg.context_weight > 0:
        others = R.composition_others(plan.files.vocabulary, cfg.class_word)
        context_reg = R.ContextRegularizer(tok, te, templates, placeholder_text, cfg.class_word,
                                           cfg.vectors, others, use_mask)
    return _Data(len(variants), bank, prompts, scheduler, plan.files.prediction_type, use_mask,
                 context_reg)


def _optimizer(cfg: TrainConfig, emb: _Embedding):
    import torch

    groups = [{"params": [emb.wrapper.vectors], "lr": cfg.effective_lr,
               "weight_decay": cfg.weight_decay}]
    if emb.target.learned:
        groups.append({"params": [emb.target.coefs], "lr": cfg.coef_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def _restore(t: _Training, ck, status) -> tuple[int, np.ndarray]:
    """-> (first step, loss history so far): the checkpoint read before loading, or step 0."""
    import torch

    start, history = 0, np.zeros((0, len(HISTORY_COLUMNS)), np.float32)
    if ck is not None:
        start, tensors, _ = ck
        with torch.no_grad():
            t.emb.wrapper.vectors.copy_(tensors["vectors"])
            t.emb.target.coefs.copy_(tensors["coefs"])
        _restore_optimizer(t.optimizer, tensors)
        history = tensors["history"].numpy()[:start].copy()
        if history.shape[1] < len(HISTORY_COLUMNS):  # a checkpoint from before a column existed
            history = np.pad(history, ((0, 0), (0, len(HISTORY_COLUMNS) - history.shape[1])))
        status(f"resuming from checkpoint at step {start}")
    return start, history


def _train_steps(t: _Training, start: int, history: np.ndarray,
                 on_step: Callable[[StepInfo], None] | None) -> np.ndarray:
    """Steps start..cfg.steps: each checked finite before it counts, checkpointed every
    `checkpoint_every` and at the end. -> the whole loss history."""
    cfg = t.cfg
    rows = [history] if len(history) else []
    t.emb.m.unet.eval()
    t.emb.m.text_encoder.eval()
    for step in range(start, cfg.steps):
        row, total = _step(t, step)
        done = step + 1
        if not (np.isfinite(row).all() and bool(t.emb.wrapper.vectors.isfinite().all())):
            _diverged(t.out, done, total)  # nothing of this step is saved
        rows.append(row)
        if on_step is not None:
            on_step(StepInfo(done, cfg.steps, *map(float, row[0])))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(t.out, done, t.emb.wrapper.vectors, t.emb.target, t.optimizer,
                            np.concatenate(rows), t.fingerprint, cfg)
    return np.concatenate(rows) if rows else history


def _step(t: _Training, step: int) -> tuple[np.ndarray, float]:
    """One optimizer step over `grad_accum` micro-batches, each drawn from a generator seeded by
    (seed, step, micro) so that a resumed run repeats the uninterrupted one. -> (its history row,
    its total loss)."""
    import torch

    from compinv_rt.train import anchors as A
    from compinv_rt.train import regularizers as R
    from compinv_rt.train.losses import diffusion_target, masked_mse

    cfg, emb, data = t.cfg, t.emb, t.data
    m, wrapper, target = emb.m, emb.wrapper, emb.target
    tok, te = m.tokenizer, m.text_encoder
    parts = np.zeros(4)
    for micro in range(cfg.grad_accum):
        gen = _step_generator(cfg.seed, step, micro)
        pick = torch.randint(data.n_variants, (cfg.batch,), generator=gen)
        latents = data.bank.sample(pick, gen)  # (B, C, h, w)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        timesteps = torch.randint(0, data.scheduler.config.num_train_timesteps, (cfg.batch,),
                                  generator=gen).to(m.device)
        input_ids = data.prompts.pick([data.bank.keys[i] for i in pick.tolist()], gen).to(m.device)
        noisy = data.scheduler.add_noise(latents, noise, timesteps)
        mask = (input_ids != tok.pad_token_id).long() if data.use_mask else None
        states = te(input_ids, attention_mask=mask)[0]  # (B, 77, D)
        pred = m.unet(noisy, timesteps, states, return_dict=False)[0]
        rec = masked_mse(pred, diffusion_target(data.scheduler, data.pred_type, latents, noise, timesteps),
                         data.bank.mask[pick])
        attraction, l1 = A.anchor_loss(wrapper.vectors[:emb.n_vec], target, tok.model_max_length,
                                       cfg.anchor_l1)
        loss = cfg.recon_weight * rec + cfg.anchor_weight * (attraction + l1)
        ctx_loss = (data.context_reg.loss(te, gen, cfg.batch) if data.context_reg is not None
                    else rec.new_zeros(()))
        loss = loss + cfg.context_weight * ctx_loss
        (loss / cfg.grad_accum).backward()
        parts += np.array([rec.item(), attraction.item(), l1.item(),
                           ctx_loss.item()]) / cfg.grad_accum
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    target.project()
    if emb.fixed_norm is not None:
        R.project_norm(wrapper.vectors.data[:emb.n_vec], emb.fixed_norm)
    with torch.no_grad():
        dist = float((wrapper.vectors[:emb.n_vec] - target()[None]).norm(dim=-1).mean())
    total = (cfg.recon_weight * parts[0] + cfg.anchor_weight * (parts[1] + parts[2])
             + cfg.context_weight * parts[3])
    return np.array([[parts[0], parts[1], parts[2], total, dist, parts[3]]], np.float32), total


def _finish(t: _Training, plan: Plan, history: np.ndarray, start: int) -> TrainResult:
    """The trained rows into the table (the context token dropped), the analysis, the artifacts."""
    import torch

    from compinv_rt.models import tokens as T
    from compinv_rt.models.artifact import FORMAT, SCHEMA_VERSION
    from compinv_rt.train import anchors as A
    from compinv_rt.train.analysis import analyze
    from compinv_rt.train.save import write_artifacts

    cfg, emb = t.cfg, t.emb
    vectors = emb.wrapper.vectors.detach()[:emb.n_vec].clone()  # the context token is dropped here
    emb.wrapper.vectors = torch.nn.Parameter(vectors.clone())
    T.uninstall(emb.m.text_encoder, emb.wrapper)
    reports = A.report(emb.m.tokenizer, emb.anchor_ids, emb.target)
    with torch.no_grad():
        tgt = emb.target().detach()
    analysis = analyze(emb.table0, emb.m.tokenizer, vectors, tgt, emb.anchor_ids, emb.vocab,
                       seed=cfg.seed)
    seconds = time.perf_counter() - t.t_start
    record = _record(t, plan, history, reports, (vectors, tgt),
                     {"analysis": analysis, "seconds": round(seconds, 2)})
    metadata = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION), "token": cfg.token,
                "vectors": str(cfg.vectors), "base_model_hash": emb.m.hash,
                "class_word": cfg.class_word, "config": cfg.as_dict()}
    title = (f"{cfg.token} ({record['method']}, anchor weight {cfg.anchor_weight}, "
             f"anchors {', '.join(r.word for r in reports)})")
    record = write_artifacts(t.out, token=cfg.token, vectors=vectors, metadata=metadata,
                             history=history, record=record, title=title)
    return TrainResult(t.out, record, start, seconds, reports, emb.m)


def _record(t: _Training, plan: Plan, history: np.ndarray, reports: list, trained: tuple,
            measured: dict) -> dict:
    """artifact.json's record. `trained`: (the vectors, the anchor target); `measured`: the
    analysis and the seconds."""
    from compinv_rt import __version__
    from compinv_rt.models import tokens as T
    from compinv_rt.models.artifact import SCHEMA_VERSION

    cfg, m = t.cfg, t.emb.m
    vectors, tgt = trained
    n = len(history)
    tail = history[-max(1, n // 10):]
    head = history[:max(1, n // 10)]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "compinv-rt.concept",
        "method": "semantic-inversion" if cfg.anchor_weight > 0 else "textual-inversion",
        "token": cfg.token,
        "tokens": T.placeholder_tokens(cfg.token, cfg.vectors),
        "vectors": cfg.vectors,
        "class_word": cfg.class_word,
        "init_word": cfg.init,
        "base_model": {"hash": m.hash, "path": str(m.root),
                       "prediction_type": t.data.pred_type},
        "images": {"count": len(plan.image_files), "hash": t.images_hash,
                   "files": [p.name for p in plan.image_files], "variants": t.data.n_variants},
        "anchors": [vars(r) for r in reports],
        "anchors_carrying_weight": [r.word for r in reports if r.carries_weight],
        "anchor_target_distance": round(float((vectors - tgt[None]).norm(dim=-1).mean()), 6),
        "config": cfg.as_dict(),
        "effective_lr": cfg.effective_lr,
        # what --norm applied (`auto` resolved): the config alone does not say
        "norm_constraint": {"spec": cfg.norm_spec,
                            "value": None if t.emb.fixed_norm is None else round(t.emb.fixed_norm, 6)},
        "steps_done": n,
        "loss": {
            "columns": list(HISTORY_COLUMNS),
            "first_10pct_mean": [round(float(v), 6) for v in head.mean(0)],
            "last_10pct_mean": [round(float(v), 6) for v in tail.mean(0)],
            "final": [round(float(v), 6) for v in history[-1]],
        },
        **measured,
        "compinv_rt": __version__,
    }
