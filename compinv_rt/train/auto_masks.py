"""`--masks auto`: subject masks from the base model's own cross-attention to the class word.

For photos without masks: each photo is encoded, noised at a few fixed timesteps and run once
through the UNet with "a photo of a CLASS"; the cross-attention probabilities of the class word's
token (every cross-attention layer, heads and timesteps averaged) say where the base model sees
the class. The map is normalized to [0, 1] per photo and ramped (below LOW -> 0, above HIGH -> 1),
which gives the soft border. Computed once before training (a few UNet forwards per photo).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TIMESTEPS = (250, 450, 650)  # fractions of 1000: structure is decided, the subject still visible
LOW, HIGH = 0.25, 0.6  # ramp of the normalized attention map


@torch.no_grad()
def attention_masks(model, images: list, size: int, class_word: str, seed: int = 0) -> list:
    """One soft (size, size) mask in [0, 1] per image (PIL), from `model` (a LoadedModel)."""
    from compinv_rt.models.tokens import single_token_id
    from compinv_rt.spatial.heatmaps import AttentionRecorder
    from compinv_rt.train.data import square
    from compinv_rt.unet.capture import capturing

    tok, te, unet, vae = model.tokenizer, model.text_encoder, model.unet, model.vae
    prompt = f"a photo of a {class_word.strip()}"
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(model.device)
    word = single_token_id(tok, class_word.strip(), "class word")
    pos = int((ids[0] == word).nonzero()[0, 0])
    states = te(ids)[0]
    n_t = len(TIMESTEPS)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(model.files.scheduler_config)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    gen = torch.Generator().manual_seed(seed)
    out = []
    for image in images:
        x = torch.from_numpy(square(image, size)).permute(2, 0, 1)[None].to(model.device, vae.dtype)
        latents = (vae.encode(x).latent_dist.mean - shift) * vae.config.scaling_factor
        latents = latents.repeat(n_t, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.tensor(TIMESTEPS, device=model.device)
        noisy = scheduler.add_noise(latents, noise, t)
        h, w = latents.shape[-2:]
        rec = AttentionRecorder(n_t, h, w)
        with capturing(unet, rec):
            unet(noisy, t, states.expand(n_t, -1, -1), return_dict=False)
        a = rec.maps()[:, pos].mean(0)  # (h, w)
        a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
        a = F.interpolate(a[None, None], size=(size, size), mode="bilinear",
                          align_corners=False)[0, 0]
        out.append(((a - LOW) / (HIGH - LOW)).clamp(0, 1).cpu().numpy().astype(np.float32))
    return out


def iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of two masks thresholded at `threshold`."""
    x, y = a >= threshold, b >= threshold
    union = np.logical_or(x, y).sum()
    return float(np.logical_and(x, y).sum() / union) if union else 1.0
