"""The seeded, resumable training recipe of the embedded shapes-world Stable Diffusion.

Stages (each resumes from its last checkpoint in `run_dir`, writes are atomic):
  vae    AutoencoderKL on random crops of training scenes (L1 + edge L1 + tiny KL)
  gate   the judge reads VAE reconstructions of clean held-out scenes: exact-object-set accuracy
         must reach `gate_threshold` before the UNet is trained on the VAE's latents
  cache  encode `cache_scenes` training scenes to latents once (scenes stored as JSON so captions
         are re-drawn from the templates at every use)
  unet   UNet + CLIP text encoder from scratch on cached latents: epsilon prediction, SD's
         scaled-linear schedule, min-SNR-gamma weighting, caption dropout for guidance, warm-up,
         EMA; checkpoints every `ckpt_every` steps, EMA snapshots every `snapshot_every` steps
  export the EMA weights as a stock diffusers folder (fp16)
Randomness of step `s` is derived from (seed, s), so a resumed run draws the same batches.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from compinv_rt.apps.world.model import (
    ArchConfig,
    build_text_encoder,
    build_unet,
    build_vae,
    export_model,
    grow_unet,
)
from compinv_rt.apps.world.scenes import (
    WorldConfig,
    WorldObject,
    make_caption,
    sample_batch,
)
from compinv_rt.core.errors import ConfigError, ModelError
from compinv_rt.core.outputs import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, dict], None]
STAGES = ("vae", "gate", "cache", "unet", "export")
GATE_SEED0 = 910_000_000


@dataclass(frozen=True)
class RecipeConfig:
    run_dir: str = ".cache/world/run"
    arch: ArchConfig = field(default_factory=ArchConfig)
    seed: int = 0
    threads: int = 1
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (cuda when available)
    precision: str = "auto"  # fp32 or bf16 (autocast of the forward pass); auto: bf16 on CUDA, fp32 on CPU
    procs: int = 2  # data-parallel CPU processes for the UNet stage (effective batch procs * unet_batch)
    world: WorldConfig = field(default_factory=WorldConfig)
    # VAE
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 3e-3
    vae_scenes: int = 8000
    vae_kl: float = 1e-6
    # gate
    gate_scenes: int = 500
    gate_threshold: float = 0.90
    # latent cache
    cache_scenes: int = 32000
    # UNet + text encoder
    unet_steps: int = 5600
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.998
    snr_gamma: float = 5.0
    cond_drop: float = 0.1
    size_word_prob: float = 0.3
    place_prob: float = 0.4  # captions that state every object's place (and size), from its box
    # scenes with two or more dotted/striped objects are drawn this many times as often (1: uniform):
    # the base leaks one object's pattern onto the other, and such scenes are 1 in ~8 of the cache
    pattern_boost: float = 1.0
    # a diffusers folder (e.g. the shipped model) to continue from: its VAE replaces the vae/gate
    # stages and its UNet + text encoder are the starting weights of the unet stage
    init_from: str | None = None
    ckpt_every: int = 100
    snapshot_every: int = 400

    def to_json(self) -> dict:
        d = asdict(self)
        return d

    @staticmethod
    def from_json(d: dict) -> "RecipeConfig":
        d = dict(d)
        d["arch"] = ArchConfig.from_json(d.get("arch", {}))
        w: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get("world", {}).items()}
        d["world"] = WorldConfig(**w)
        fields = RecipeConfig.__dataclass_fields__
        return RecipeConfig(**{k: v for k, v in d.items() if k in fields})


# ---------------------------------------------------------------------------------------------
# Checkpoint helpers (safetensors + JSON metadata, atomic)


def _save_tensors(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                  metadata={"meta": json.dumps(meta)}))


def _load_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata().get("meta", "{}"))
    return load_file(str(path)), meta


def _opt_tensors(opt) -> tuple[dict, list]:
    """The optimizer's state as "opt.{param}.{name}" tensors, the layout `train.loop` restores."""
    import torch

    sd = opt.state_dict()
    out = {f"opt.{i}.{k}": torch.as_tensor(v) for i, st in sd["state"].items() for k, v in st.items()}
    return out, sd["param_groups"]


def _opt_load(opt, tensors: dict) -> None:
    """Restore the optimizer when the checkpoint has its state (a compact one does not: restart)."""
    from compinv_rt.train.loop import _restore_optimizer

    if any(k.startswith("opt.") for k in tensors):
        _restore_optimizer(opt, tensors)


def _prefixed(prefix: str, module) -> dict:
    return {prefix + k: v for k, v in module.state_dict().items()}


def _unprefixed(prefix: str, tensors: dict) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def _step_rng(seed: int, stage: str, step: int):
    import torch

    s = (seed * 1_000_003 + step * 7919 + {"vae": 1, "unet": 2}[stage]) % (2**63)
    return torch.Generator().manual_seed(s), np.random.default_rng(s)


def resolve_device(cfg: RecipeConfig):
    """(torch.device, autocast dtype or None) for the recipe's `device` and `precision`."""
    import torch

    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda, cuda:N or auto, got {cfg.device!r}")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32, bf16 or auto, got {cfg.precision!r}")
    return device, (torch.bfloat16 if precision == "bf16" else None)


def _lr(base: float, step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# ---------------------------------------------------------------------------------------------
# Stage: VAE


def _images_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)


def vae_loss(vae, x, kl_weight: float):
    """L1 + L1 on image gradients (keeps edges sharp) + kl_weight * KL."""
    post = vae.encode(x).latent_dist
    z = post.sample()
    rec = vae.decode(z).sample
    l1 = (rec - x).abs().mean()
    gx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    gy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    edge = (gx(rec) - gx(x)).abs().mean() + (gy(rec) - gy(x)).abs().mean()
    kl = post.kl().mean() / x[0].numel()
    return l1 + edge + kl_weight * kl, {"l1": l1.item(), "edge": edge.item()}


def train_vae(cfg: RecipeConfig, progress: Progress | None = None, steps: int | None = None):
    """Train (or resume) the VAE up to `steps` (default cfg.vae_steps); returns the model."""
    import torch

    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    ck = run / "vae_ckpt.safetensors"
    total = steps or cfg.vae_steps
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.arch)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if ck.is_file():
        t, meta = _load_tensors(ck)
        vae.load_state_dict(_unprefixed("vae.", t))
        _opt_load(opt, t)
        start = meta["step"]
        log.info("VAE resumes at step %d", start)
    if start >= total:
        return vae.eval()
    _, images = sample_batch(range(cfg.seed * 10_000_000 + 1_000_000,
                                   cfg.seed * 10_000_000 + 1_000_000 + cfg.vae_scenes), "train", cfg.world)
    data = _images_tensor(images)
    n, _, h, w = data.shape
    c = min(cfg.vae_crop, h)
    vae.train()
    t0 = time.time()
    for step in range(start, total):
        gen, _ = _step_rng(cfg.seed, "vae", step)
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=gen)
        ys = torch.randint(0, h - c + 1, (cfg.vae_batch,), generator=gen)
        xs = torch.randint(0, w - c + 1, (cfg.vae_batch,), generator=gen)
        x = torch.stack([data[i, :, y:y + c, x_:x_ + c] for i, y, x_ in zip(idx.tolist(), ys.tolist(), xs.tolist())])
        flip = torch.rand(cfg.vae_batch, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg.vae_lr, step, 100, total)
        loss, info = vae_loss(vae, x, cfg.vae_kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        if progress:
            progress("vae", done, total,
                     {"loss": loss.item(), **info, "s_per_step": (time.time() - t0) / (done - start)})
        if done % cfg.ckpt_every == 0 or done == total:
            ot, groups = _opt_tensors(opt)
            _save_tensors(ck, {**_prefixed("vae.", vae), **ot}, {"step": done, "param_groups": groups})
    return vae.eval()


def _init_weights(cfg: RecipeConfig, part: str) -> dict:
    """State dict of one component ("vae", "unet", "text_encoder") of `cfg.init_from`, float32."""
    from safetensors.torch import load_file

    if not cfg.init_from:
        raise ConfigError("no --init-from model to take weights from")
    folder = Path(cfg.init_from) / part
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"--init-from {cfg.init_from}: no {part}/*.safetensors")
    t = load_file(str(files[0]))
    return {k: v.float() if v.is_floating_point() else v for k, v in t.items()}


def load_vae(cfg: RecipeConfig):
    vae = build_vae(cfg.arch)
    ck = Path(cfg.run_dir) / "vae_ckpt.safetensors"
    if not ck.is_file() and cfg.init_from:
        vae.load_state_dict(_init_weights(cfg, "vae"))
        conf = json.loads((Path(cfg.init_from) / "vae" / "config.json").read_text())
        vae.register_to_config(scaling_factor=conf["scaling_factor"])
        return vae.eval()
    if not ck.is_file():
        raise ModelError(f"no VAE checkpoint in {cfg.run_dir}: run the vae stage first")
    t, meta = _load_tensors(ck)
    vae.load_state_dict(_unprefixed("vae.", t))
    scale = meta.get("scaling_factor")
    if scale:
        vae.register_to_config(scaling_factor=scale)
    return vae.eval()


def reconstruct(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 (N,H,W,3) -> VAE reconstruction (posterior mode) as uint8."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = _images_tensor(images[i:i + batch])
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
            out.append(((rec.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def gate_vae(cfg: RecipeConfig, judge, vae=None) -> dict:
    """Judge VAE reconstructions of clean held-out scenes (all colour-shape pairs)."""
    import torch

    from compinv_rt.apps.world.judge import compare

    torch.set_num_threads(cfg.threads)
    vae = vae if vae is not None else load_vae(cfg)
    scenes, images = sample_batch(range(GATE_SEED0, GATE_SEED0 + cfg.gate_scenes), "any", cfg.world)
    rec = reconstruct(vae, images)
    clean = compare(scenes, judge(images))
    recon = compare(scenes, judge(rec))
    psnr = float(10 * np.log10(255.0**2 / np.mean((rec.astype(np.float32) - images.astype(np.float32)) ** 2)))
    result = {
        "scenes": len(scenes),
        "threshold": cfg.gate_threshold,
        "exact_object_set_recon": recon["exact_object_set"],
        "exact_object_set_clean": clean["exact_object_set"],
        "recon": recon,
        "psnr_db": psnr,
        "passed": recon["exact_object_set"] >= cfg.gate_threshold,
    }
    _write_json(Path(cfg.run_dir) / "gate.json", result)
    return result


# ---------------------------------------------------------------------------------------------
# Stage: latent cache


def build_cache(cfg: RecipeConfig, progress: Progress | None = None, chunk: int = 2000) -> Path:
    """Encode `cache_scenes` training scenes to latents (posterior mean); resumable by chunk."""
    import torch

    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    out = run / "latents.safetensors"
    if out.is_file():
        return out
    device, _ = resolve_device(cfg)
    vae = load_vae(cfg).to(device)
    parts = run / "cache_parts"
    parts.mkdir(parents=True, exist_ok=True)
    base = cfg.seed * 10_000_000 + 3_000_000
    n_chunks = math.ceil(cfg.cache_scenes / chunk)
    for k in range(n_chunks):
        p = parts / f"part{k:04d}.safetensors"
        if p.is_file():
            continue
        lo, hi = base + k * chunk, base + min(cfg.cache_scenes, (k + 1) * chunk)
        scenes, images = sample_batch(range(lo, hi), "train", cfg.world)
        lat = []
        with torch.no_grad():
            for i in range(0, len(images), 100):
                lat.append(vae.encode(_images_tensor(images[i:i + 100]).to(device)).latent_dist.mean.cpu())
        meta = {"scenes": [_scene_record(s) for s in scenes]}
        _save_tensors(p, {"latents": torch.cat(lat).half()}, meta)
        if progress:
            progress("cache", hi - base, cfg.cache_scenes, {})
    lats, recs = [], []
    for k in range(n_chunks):
        t, meta = _load_tensors(parts / f"part{k:04d}.safetensors")
        lats.append(t["latents"])
        recs += meta["scenes"]
    lat = torch.cat(lats)
    std = lat.float().std().item()
    # the latent scale (SD's 0.18215): 1/std for a new VAE, the initial model's own otherwise
    scale = vae.config.scaling_factor if cfg.init_from else 1.0 / std
    _save_tensors(out, {"latents": lat}, {"scenes": recs, "std": std, "mean": lat.float().mean().item(),
                                          "scale": scale})
    ck = run / "vae_ckpt.safetensors"
    if ck.is_file():  # record the scaling factor with the VAE
        t, meta = _load_tensors(ck)
        meta["scaling_factor"] = scale
        _save_tensors(ck, t, meta)
    for p in parts.iterdir():
        p.unlink()
    parts.rmdir()
    return out


def _scene_record(s) -> list:
    """[background, [[shape, colour, pattern, size, box], ...], canvas size]: enough to redraw a
    caption, places included, at every use."""
    return [s.background, [[o.shape, o.colour, o.pattern, o.size, list(o.box)] for o in s.objects], s.size]


def caption_for(rec: list, rng: np.random.Generator, size_word_prob: float, place_prob: float = 0.0) -> str:
    """A fresh caption for a cached scene: a random template, sizes stated with `size_word_prob`,
    places (and sizes) with `place_prob` (records without boxes, from older caches, never)."""
    bg, objs = rec[0], rec[1]
    objects = [WorldObject(o[0], o[1], o[2], o[3], tuple(o[4]) if len(o) > 4 else (0, 0, 0, 0)) for o in objs]
    placed = len(rec) > 2 and bool(rng.random() < place_prob)
    return make_caption(bg, objects, rng, mention_size=placed or bool(rng.random() < size_word_prob),
                        canvas=rec[2] if placed else None)


# ---------------------------------------------------------------------------------------------
# Stage: UNet + text encoder


class _Tokens:
    """Tokenizes captions to (B, 77) ids with a memo (captions repeat a lot)."""

    def __init__(self):
        from compinv_rt.models.tokenizer import clip_tokenizer

        self.tok = clip_tokenizer()
        self.memo: dict[str, list[int]] = {}

    def __call__(self, captions: list[str]):
        import torch

        ids = []
        for c in captions:
            if c not in self.memo:
                self.memo[c] = self.tok(c, padding="max_length", max_length=77, truncation=True).input_ids
            ids.append(self.memo[c])
        return torch.tensor(ids)


def _draw_weights(records: list, pattern_boost: float):
    """Sampling weights of the cached scenes (None: uniform, the original draw)."""
    import torch

    if pattern_boost == 1.0:
        return None
    two = [sum(o[2] != "plain" for o in rec[1]) >= 2 for rec in records]
    return torch.tensor([pattern_boost if t else 1.0 for t in two], dtype=torch.float64)


def _alphas_cumprod():
    from compinv_rt.apps.world.model import build_scheduler

    return build_scheduler().alphas_cumprod


def _dp_worker(cfg_json: dict, rank: int, world: int, addr: str, steps: int | None) -> None:
    """A data-parallel helper process (rank >= 1): same loop, no progress, no writes."""
    logging.basicConfig(level=logging.WARNING)
    train_unet(RecipeConfig.from_json(cfg_json), None, steps, rank=rank, world=world, addr=addr)


def train_unet_parallel(cfg: RecipeConfig, procs: int, progress: Progress | None = None,
                        steps: int | None = None) -> dict:
    """Data-parallel training over `procs` CPU processes (gloo all-reduce of gradients), each with
    `cfg.threads` threads: on a shared 2-core machine two 1-thread processes beat one 2-thread one.
    The effective batch is procs * unet_batch; rank 0 (this process) reports and writes."""
    import multiprocessing as mp
    import socket

    if procs <= 1:
        return train_unet(cfg, progress, steps)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_dp_worker, args=(json.loads(json.dumps(cfg.to_json())), r, procs, addr, steps),
                           daemon=True) for r in range(1, procs)]
    for w in workers:
        w.start()
    try:
        result = train_unet(cfg, progress, steps, rank=0, world=procs, addr=addr)
    finally:
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.terminate()
    return result


def _allreduce_grads(params, world: int) -> None:
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


def train_unet(cfg: RecipeConfig, progress: Progress | None = None, steps: int | None = None,
               stop: Callable[[], bool] | None = None, rank: int = 0, world: int = 1,
               addr: str | None = None) -> dict:
    """Train (or resume) UNet + text encoder on the latent cache up to `steps`.

    With world > 1 this is one rank of a data-parallel group (see `train_unet_parallel`)."""
    import copy

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(cfg.threads)
    if world > 1:
        from datetime import timedelta

        dist.init_process_group("gloo", init_method=addr, rank=rank, world_size=world,
                                timeout=timedelta(minutes=5))
    run = Path(cfg.run_dir)
    cache = run / "latents.safetensors"
    if not cache.is_file():
        raise ModelError(f"no latent cache in {run}: run the cache stage first")
    total = steps or cfg.unet_steps
    t, meta = _load_tensors(cache)
    latents = t["latents"]  # (N, 4, h, w) fp16
    records = meta["scenes"]
    scale = meta.get("scale") or 1.0 / meta["std"]
    n = latents.shape[0]

    device, amp = resolve_device(cfg)
    if world > 1 and device.type != "cpu":
        raise ConfigError("data-parallel processes (--procs > 1) are CPU only; on a GPU use one process "
                          "and a large --unet-batch")
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg.arch)
    text = build_text_encoder(cfg.arch)
    ema_u, ema_t = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ck = run / "unet_ckpt.safetensors"
    start = 0
    history: list = []
    tt: dict = {}
    if ck.is_file():
        tt, m = _load_tensors(ck)
        unet.load_state_dict(_unprefixed("unet.", tt))
        text.load_state_dict(_unprefixed("text.", tt), strict=False)
        ema_u.load_state_dict(_unprefixed("ema_unet.", tt))
        ema_t.load_state_dict(_unprefixed("ema_text.", tt), strict=False)
        start, history = m["step"], m.get("history", [])
        log.info("UNet resumes at step %d", start)
    elif cfg.init_from:
        with torch.no_grad():
            w = _init_weights(cfg, "text_encoder")
            for m_ in (text, ema_t):
                missing, unexpected = m_.load_state_dict(w, strict=False)
                bad = [k for k in missing + unexpected if not k.endswith("position_ids")]
                if bad:
                    raise ModelError(f"--init-from {cfg.init_from}: text_encoder does not fit the recipe's "
                                     f"architecture ({len(bad)} mismatched tensors, e.g. {bad[0]})")
            w = _init_weights(cfg, "unet")
            try:
                grown = [grow_unet(m_, w) for m_ in (unet, ema_u)][0]
            except ModelError as e:
                raise ModelError(f"--init-from {cfg.init_from}: {e}") from None
        log.info("UNet + text encoder start from %s%s", cfg.init_from,
                 f" (grown, identity at first: {', '.join(grown)})" if grown else "")
    for mod in (unet, text, ema_u, ema_t):
        mod.to(device)
    for p in list(ema_u.parameters()) + list(ema_t.parameters()):
        p.requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01, betas=(0.9, 0.99), fused=True)
    _opt_load(opt, tt)
    del tt
    latents = latents.to(device)
    tokens = _Tokens()
    empty = tokens([""])[0]
    ac = _alphas_cumprod()
    unet.train()
    text.train()
    t0 = time.time()
    ema_params = list(ema_u.parameters()) + list(ema_t.parameters())
    run_loss = None
    writer = rank == 0
    draw_weights = _draw_weights(records, cfg.pattern_boost)
    if world > 1:  # identical start on every rank
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, 0)
    for step in range(start, total):
        gen, rng = _step_rng(cfg.seed + 7777 * rank, "unet", step)
        if draw_weights is None:
            idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        else:
            idx = torch.multinomial(draw_weights, cfg.unet_batch, replacement=True, generator=gen)
        caps = [caption_for(records[i], rng, cfg.size_word_prob, cfg.place_prob) for i in idx.tolist()]
        ids = tokens(caps)
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.cond_drop
        ids[drop] = empty
        # every random draw on the CPU generator: the same batches on any device
        noise = torch.randn((cfg.unet_batch, *latents.shape[1:]), generator=gen).to(device)
        ts = torch.randint(0, ac.shape[0], (cfg.unet_batch,), generator=gen)
        a = ac[ts].view(-1, 1, 1, 1).to(device)
        z0 = latents[idx.to(device)].float() * scale
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = _lr(cfg.unet_lr, step, cfg.warmup, total, floor=0.3)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            enc = text(ids.to(device)).last_hidden_state  # (B, 77, hidden)
            pred = unet(zt, ts.to(device), enc).sample.float()
        snr = a.view(-1) / (1 - a.view(-1))
        w = torch.clamp(snr, max=cfg.snr_gamma) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _allreduce_grads(params, world)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done = step + 1
        if world > 1 and done % 200 == 0:  # guard against drift between ranks
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, 0)
        if not writer:
            continue
        d = min(cfg.ema_decay, (1 + done) / (10 + done))
        with torch.no_grad():
            for pe, p in zip(ema_params, params):
                pe.lerp_(p.detach(), 1 - d)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        if progress:
            progress("unet", done, total, {"loss": run_loss, "s_per_step": (time.time() - t0) / (done - start)})
        if done % 100 == 0:
            history.append([done, round(run_loss, 5), round(time.time() - t0, 1)])
            log.info("unet step %d/%d loss %.4f (%.2f s/step)", done, total, run_loss,
                     (time.time() - t0) / (done - start))
        last = done == total or (world == 1 and stop is not None and stop())
        if done % cfg.ckpt_every == 0 or last:
            ot, groups = _opt_tensors(opt)
            tensors = {**_prefixed("unet.", unet), **_prefixed("text.", text),
                       **_prefixed("ema_unet.", ema_u), **_prefixed("ema_text.", ema_t), **ot}
            _save_tensors(ck, tensors, {"step": done, "param_groups": groups, "history": history})
        if done % cfg.snapshot_every == 0 or last:
            snap = {**_prefixed("unet.", ema_u), **_prefixed("text.", ema_t)}
            _save_tensors(run / "snapshots" / f"step{done:06d}.safetensors",
                          {k: v.half() if v.is_floating_point() else v for k, v in snap.items()},
                          {"step": done, "scaling_factor": scale})
        if last and done != total:
            break
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"steps": total if total > start else start, "history": history}


def compact_checkpoint(cfg: RecipeConfig, out: str | Path) -> Path:
    """A resumable copy of the UNet checkpoint small enough to commit: weights and EMA in fp16, no
    optimizer state (a resume restarts AdamW's moments). `train --resume-from` reads it."""
    ck = Path(cfg.run_dir) / "unet_ckpt.safetensors"
    if not ck.is_file():
        raise ModelError(f"no UNet checkpoint in {cfg.run_dir}")
    t, meta = _load_tensors(ck)
    keep = {k: v.half() if v.is_floating_point() else v for k, v in t.items() if not k.startswith("opt.")}
    meta = {"step": meta["step"], "history": meta.get("history", []), "recipe": cfg.to_json()}
    out = Path(out)
    _save_tensors(out, keep, meta)
    return out


def list_snapshots(cfg: RecipeConfig) -> list[Path]:
    return sorted((Path(cfg.run_dir) / "snapshots").glob("step*.safetensors"))


def export_snapshot(cfg: RecipeConfig, out_dir: str | Path, snapshot: str | Path | None = None,
                    info: dict | None = None) -> Path:
    """Write the diffusers folder from an EMA snapshot (default: the latest) or from the EMA half
    of a (compact) UNet checkpoint."""
    import torch

    snaps = list_snapshots(cfg)
    path = Path(snapshot) if snapshot else (snaps[-1] if snaps else None)
    if path is None or not path.is_file():
        raise ModelError(f"no UNet snapshot in {cfg.run_dir}/snapshots: run the unet stage first")
    t, meta = _load_tensors(path)
    if any(k.startswith("ema_unet.") for k in t):  # a checkpoint: its EMA weights are the model
        t = {**{"unet." + k: v for k, v in _unprefixed("ema_unet.", t).items()},
             **{"text." + k: v for k, v in _unprefixed("ema_text.", t).items()}}
    unet, text = build_unet(cfg.arch), build_text_encoder(cfg.arch)
    unet.load_state_dict({k: v.float() for k, v in _unprefixed("unet.", t).items()})
    text.load_state_dict({k: v.float() if v.is_floating_point() else v
                          for k, v in _unprefixed("text.", t).items()}, strict=False)
    vae = load_vae(cfg)
    if "scaling_factor" in meta:  # else the VAE's own (a run continued from a model keeps its scale)
        vae.register_to_config(scaling_factor=meta["scaling_factor"])
    gate_path = Path(cfg.run_dir) / "gate.json"
    full_info = {"recipe": cfg.to_json(), "snapshot_step": meta["step"],
                 "gate": json.loads(gate_path.read_text()) if gate_path.is_file() else None,
                 **(info or {})}
    with torch.no_grad():
        return export_model(vae, unet, text, out_dir, fp16=True, info=full_info)


def run_recipe(cfg: RecipeConfig, stages=STAGES, progress: Progress | None = None, judge_dir=None,
               out_dir=None, force: bool = False, resume_from: str | Path | None = None) -> dict:
    """Run the given stages in order; the UNet stages refuse a VAE that failed its gate.
    `resume_from`: a compact checkpoint (`compact_checkpoint`) the unet stage continues from when
    the run has no checkpoint of its own."""
    from compinv_rt.apps.world.judge import load_judge

    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"unknown stage {s!r}; expected one of {', '.join(STAGES)}")
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "recipe.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        if old.get("arch") != json.loads(json.dumps(cfg.to_json()))["arch"]:
            raise ConfigError(f"{run} holds a run with another architecture; use another --run-dir")
    _write_json(cfg_path, cfg.to_json())
    ck = run / "unet_ckpt.safetensors"
    if resume_from is not None and not ck.is_file():
        if not Path(resume_from).is_file():
            raise ConfigError(f"--resume-from {resume_from}: no such file")
        t, meta = _load_tensors(Path(resume_from))
        if meta.get("recipe", {}).get("arch") != json.loads(json.dumps(cfg.to_json()))["arch"]:
            raise ConfigError(f"--resume-from {resume_from}: a checkpoint of another architecture")
        _save_tensors(ck, t, meta)
    result: dict = {}
    if "vae" in stages:
        train_vae(cfg, progress)
    if "gate" in stages:
        result["gate"] = gate_vae(cfg, load_judge(judge_dir))
    if cfg.init_from and not (run / "gate.json").is_file():
        # the initial model's VAE passed its gate when it was trained: carry the record over
        info_file = Path(cfg.init_from) / "shapes_world.json"
        gate = json.loads(info_file.read_text()).get("gate") if info_file.is_file() else None
        if gate is not None:
            _write_json(run / "gate.json", gate)
    if "cache" in stages or "unet" in stages:
        gate_file = run / "gate.json"
        gate = json.loads(gate_file.read_text()) if gate_file.is_file() else None
        if not force and (gate is None or not gate["passed"]):
            got = "not run" if gate is None else f"{gate['exact_object_set_recon']:.3f}"
            raise ModelError(f"the VAE gate did not pass (exact object set on reconstructions: {got}, "
                             f"needed {cfg.gate_threshold}); train the VAE longer or pass --force")
    if "cache" in stages:
        build_cache(cfg, progress)
    if "unet" in stages:
        result["unet"] = train_unet_parallel(cfg, cfg.procs, progress)
    if "export" in stages:
        result["export"] = str(export_snapshot(cfg, out_dir or run / "model"))
    return result
