"""Training speed: compinv-rt's loop vs a straightforward loop written the way the diffusers
textual-inversion example does it, same model, batch and steps, in one run.

The baseline, per step: opens and preprocesses each image with PIL (random flip), tokenizes a random
template prompt per item, VAE-encodes the batch, runs text encoder + UNet, back-propagates into the
whole token-embedding table, AdamW over the whole table (weight decay 1e-2), then restores every
non-placeholder row from a saved copy. Ours: VAE latents of every augmented variant cached once,
prompts tokenized once, a trainable (N, D) parameter instead of the table, AdamW over N x D, plus
the anchor loss and the masked reconstruction loss. Runs alternate (baseline, ours, baseline, ...)
so background load on a shared machine hits both alike; the per-step median after warm-up counts.

    .venv/bin/python benchmarks/train_speed.py --model world --steps 30 --batch 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".cache" / "bench-train"
WARMUP = 3


def model_dir(name: str) -> Path:
    """tiny: the tests' tiny SD (128 px, x8 VAE); world: the shapes-world architecture with random
    weights (64 px, x4 VAE); sd15/sd21: real architectures with random weights; embedded: the
    trained shapes-world model; else a folder."""
    from compinv_rt.models.architectures import save_model, tiny_components

    if name == "tiny":
        d = CACHE / "tiny"
        if not (d / "model_index.json").exists():
            save_model(tiny_components(seed=0), d)
        return d
    if name == "world":
        d = CACHE / "world-arch"
        if not (d / "model_index.json").exists():
            from compinv_rt.apps.world.model import ArchConfig, build_text_encoder, build_unet, build_vae, export_model

            torch.manual_seed(0)
            arch = ArchConfig()
            export_model(build_vae(arch), build_unet(arch), build_text_encoder(arch), d, fp16=False)
        return d
    if name in ("sd15", "sd21"):  # architecture-true, random weights (speed only)
        from compinv_rt.models.architectures import sd_components

        d = CACHE / name
        if not (d / "model_index.json").exists():
            save_model(sd_components(name), d)
        return d
    if name == "embedded":
        from compinv_rt.models.embedded import default_model_dir

        return default_model_dir()
    return Path(name)


def baseline(model: Path, photos: Path, token: str, steps: int, batch: int, size: int,
             lr: float, seed: int) -> list[float]:
    """A diffusers-example-style textual-inversion loop; returns per-step seconds."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    from compinv_rt.models.loading import load_model
    from compinv_rt.train.data import DEFAULT_TEMPLATES, list_images

    torch.manual_seed(seed)
    rnd = random.Random(seed)
    m = load_model(str(model), device="cpu")
    tok, te, unet, vae = m.tokenizer, m.text_encoder, m.unet, m.vae
    tok.add_tokens([token])
    pid = tok.convert_tokens_to_ids(token)
    init = tok.convert_tokens_to_ids("heart</w>")
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = te.get_input_embeddings()
    with torch.no_grad():
        emb.weight[pid] = emb.weight[init].clone()
    emb.weight.requires_grad_(True)  # the whole table trains, as in the example
    orig = emb.weight.detach().clone()
    opt = torch.optim.AdamW(emb.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = DDPMScheduler.from_config(m.files.scheduler_config)
    files = list_images(photos)

    def item(i):
        im = Image.open(files[i % len(files)]).convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.BICUBIC)
        if rnd.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        text = rnd.choice(DEFAULT_TEMPLATES).format(f"{token} heart")
        ids = tok(text, padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids[0]
        return x, ids

    times = []
    k = 0
    for _ in range(steps):
        t0 = time.perf_counter()
        items = [item(k + j) for j in range(batch)]
        k += batch
        pixels = torch.stack([x for x, _ in items])
        ids = torch.stack([i for _, i in items])
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        noisy = sched.add_noise(latents, noise, t)
        states = te(ids)[0]
        pred = unet(noisy, t, states).sample
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            keep = torch.ones(len(tok), dtype=torch.bool)
            keep[pid:pid + 1] = False
            emb.weight[keep] = orig[keep]
        times.append(time.perf_counter() - t0)
    return times


def ours(model: Path, photos: Path, token: str, steps: int, batch: int, size: int, lr: float,
         seed: int, anchor_weight: float) -> tuple[list[float], float]:
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept

    cfg = TrainConfig(token=token, class_word="heart", steps=steps, batch=batch, lr=lr,
                      resolution=size,
                      scale_lr=False, seed=seed, checkpoint_every=steps,
                      anchor_weight=anchor_weight)
    stamps = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train_concept(prepare(cfg, photos, model), Path(tmp) / "c", device="cpu",
                      on_step=lambda info: stamps.append(time.perf_counter()))
    setup = stamps[0] - t0  # load + VAE-encode every variant once (+ the first step)
    return [b - a for a, b in zip(stamps, stamps[1:])], setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="world")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's size")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from compinv_rt.apps.world.photos import make_photos
    from compinv_rt.models.loading import inspect_model_dir

    model = model_dir(args.model)
    size = args.resolution or inspect_model_dir(model).default_size
    photos = CACHE / f"photos-{size}"
    if not photos.exists():
        make_photos(photos, count=8, size=size)
    runs = {"baseline": [], "ours": [], "ours_setup_s": []}
    for r in range(args.rounds):
        runs["baseline"] += baseline(model, photos, f"<b{r}>", args.steps, args.batch, size,
                                     args.lr, r)[WARMUP:]
        times, setup = ours(model, photos, f"<o{r}>", args.steps, args.batch, size, args.lr, r,
                            0.95)
        runs["ours"] += times[WARMUP:]
        runs["ours_setup_s"].append(round(setup, 3))
        print(f"round {r}: baseline {statistics.median(runs['baseline']):.4f} s/step, "
              f"ours {statistics.median(runs['ours']):.4f} s/step", file=sys.stderr)
    b, o = statistics.median(runs["baseline"]), statistics.median(runs["ours"])
    result = {
        "model": args.model, "model_dir": str(model), "resolution": size, "batch": args.batch,
        "steps_per_run": args.steps, "rounds": args.rounds, "warmup_steps_dropped": WARMUP,
        "threads": args.threads, "baseline_s_per_step_median": round(b, 5),
        "ours_s_per_step_median": round(o, 5), "speedup": round(b / o, 2),
        "baseline_s_per_step_p90": round(sorted(runs["baseline"])[int(0.9 * len(runs["baseline"]))], 5),
        "ours_s_per_step_p90": round(sorted(runs["ours"])[int(0.9 * len(runs["ours"]))], 5),
        "ours_setup_s": runs["ours_setup_s"], "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
