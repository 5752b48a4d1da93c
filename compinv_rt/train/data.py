"""User images: validation, the augmentation bank, VAE latents encoded once, prompt table.

Speed: the frozen VAE runs once per (image, augmented variant) before training; every step then
draws a latent sample from the cached posterior (mean + std * noise, as `latent_dist.sample()`
would) and a pre-tokenized prompt. Nothing frozen runs per step except the text encoder and UNet,
which the gradient has to pass through.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compinv_rt.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# "photo of a {}" style templates; {} is the subject ("<tok> heart", possibly with a size phrase).
DEFAULT_TEMPLATES = (
    "a photo of a {}",
    "photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "a close-up photo of a {}",
    "a good photo of a {}",
    "a photo of the {}",
    "a photo of one {}",
    "a bright photo of the {}",
    "a photo of my {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a photo of the large {}",
    "a photo of a small {}",
)

# Scale-augmentation groups: what the prompt says about the framing of a variant.
GROUP_PLAIN, GROUP_FAR, GROUP_ZOOM = 0, 1, 2
GROUP_PHRASES = {GROUP_PLAIN: ("",), GROUP_FAR: ("a far away", "very small"),
                 GROUP_ZOOM: ("zoomed in", "close up")}


def list_images(folder: str | Path) -> list[Path]:
    d = Path(folder)
    if not d.exists():
        raise ConfigError(f"images folder not found: {d}")
    if not d.is_dir():
        raise ConfigError(f"--images {d} is a file; expected a folder of images")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTS)}) in {d}")
    return files


def read_images(files: list[Path]) -> list:
    """Fully decode every image (a truncated file fails here, not mid-training)."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"corrupt image {f}: {msg}") from None
    return out


def images_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def square(image, size: int) -> np.ndarray:
    """Centre-crop to a square, resize to size x size -> float32 (H, W, 3) in [-1, 1]."""
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    im = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(((arr + 1.0) * 127.5).clip(0, 255).round().astype(np.uint8))
    return np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0


@dataclass(frozen=True)
class Variant:
    pixels: np.ndarray  # (H, W, 3) in [-1, 1]
    mask: np.ndarray  # (H, W) float32: 1 where the loss counts
    group: int  # GROUP_PLAIN | GROUP_FAR | GROUP_ZOOM


def augment(base: np.ndarray, rng: np.random.Generator) -> Variant:
    """Random hflip, then the reference's scale augmentation: with p=0.66 shrink to a side in
    [size/3, size] and paste at a random place on an empty (zero = mid-grey) canvas, the mask
    covering only the pasted region; otherwise zoom 1.2-1.4x and crop at random (mask everywhere)."""
    size = base.shape[0]
    img = base[:, ::-1] if rng.random() < 0.5 else base
    if rng.random() < 0.66:
        s = int(rng.integers(size // 3, size + 1))
        s += s % 2
        s = min(s, size)
        small = _resize(img, s)
        canvas = np.zeros_like(base)
        mask = np.zeros(base.shape[:2], np.float32)
        top, left = (int(rng.integers(0, size - s + 1)) for _ in range(2))
        canvas[top:top + s, left:left + s] = small
        mask[top:top + s, left:left + s] = 1.0
        return Variant(canvas, mask, GROUP_FAR if s < 0.6 * size else GROUP_PLAIN)
    s = int(rng.integers(int(1.2 * size), int(1.4 * size) + 1))
    big = _resize(img, s)
    top, left = (int(rng.integers(0, s - size + 1)) for _ in range(2))
    crop = np.ascontiguousarray(big[top:top + size, left:left + size])
    return Variant(crop, np.ones(base.shape[:2], np.float32), GROUP_ZOOM)


def make_variants(images: list, size: int, augment_on: bool, per_image: int, seed: int) -> list[Variant]:
    """Variant 0 of each image is the image itself; the rest are seeded augmentations."""
    out = []
    for i, image in enumerate(images):
        base = square(image, size)
        out.append(Variant(base, np.ones((size, size), np.float32), GROUP_PLAIN))
        if augment_on:
            rng = np.random.default_rng([seed, i, 7])
            out += [augment(base, rng) for _ in range(per_image - 1)]
    return out


@dataclass
class LatentBank:
    """VAE posteriors of every variant, computed once. Shapes: (V, C, h, w), masks (V, 1, h, w)."""

    mean: "torch.Tensor"
    std: "torch.Tensor"
    mask: "torch.Tensor"
    group: "torch.Tensor"  # (V,) long
    scaling: float
    shift: float

    def sample(self, idx, gen) -> "torch.Tensor":
        import torch

        eps = torch.randn(self.mean[idx].shape, generator=gen).to(self.mean.device, self.mean.dtype)
        return (self.mean[idx] + self.std[idx] * eps - self.shift) * self.scaling


def encode_variants(vae, variants: list[Variant], factor: int, device, dtype, chunk: int = 8) -> LatentBank:
    import torch
    import torch.nn.functional as F

    means, stds = [], []
    with torch.inference_mode():
        for i in range(0, len(variants), chunk):
            x = torch.from_numpy(np.stack([v.pixels for v in variants[i:i + chunk]]))
            x = x.permute(0, 3, 1, 2).to(device, dtype)  # (b, 3, H, W)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    masks = torch.from_numpy(np.stack([v.mask for v in variants]))[:, None]  # (V, 1, H, W)
    masks = (F.avg_pool2d(masks, factor) >= 0.5).float()  # (V, 1, h, w) at latent resolution
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return LatentBank(torch.cat(means).clone(), torch.cat(stds).clone(), masks.to(device),
                      torch.tensor([v.group for v in variants], device=device),
                      float(vae.config.scaling_factor), float(shift))


def subject_text(placeholder_text: str, class_word: str, phrase: str = "") -> str:
    return " ".join(p for p in (phrase, placeholder_text, class_word.strip()) if p)


@dataclass
class PromptTable:
    """Every (template, framing phrase) prompt, tokenized once: ids (P, 77); rows per group."""

    prompts: list[str]
    ids: "torch.Tensor"
    rows: dict[int, list[int]]

    def pick(self, groups: list[int], gen) -> "torch.Tensor":
        import torch

        choice = []
        for g in groups:
            rows = self.rows[g]
            choice.append(rows[int(torch.randint(len(rows), (1,), generator=gen))])
        return self.ids[choice]


def build_prompts(tokenizer, templates, placeholder_text: str, class_word: str) -> PromptTable:
    prompts: list[str] = []
    rows: dict[int, list[int]] = {}
    for g, phrases in GROUP_PHRASES.items():
        rows[g] = []
        for t in templates:
            for ph in phrases:
                rows[g].append(len(prompts))
                prompts.append(t.format(subject_text(placeholder_text, class_word, ph)))
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return PromptTable(prompts, ids, rows)
