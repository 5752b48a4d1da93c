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

from compinv_rt.core.errors import ConfigError

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

    from compinv_rt.core.schemas import limits

    top = limits().max_image_pixels
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                if im.width * im.height > top:  # checked before decoding: bounded memory
                    raise ConfigError(f"image {f} is {im.width}x{im.height}; the limit "
                                      f"max_image_pixels is {top} (downscale it)")
                im.load()
                out.append(_to_rgb(im))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"corrupt image {f}: {msg}") from None
    return out


def _to_rgb(im):
    """RGB, 8 bits. 16/32-bit grayscale is scaled down (PIL's convert would clip it to white)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")


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
    mask: np.ndarray  # (H, W) float32 in [0, 1]: the weight of each pixel in the loss
    group: int  # GROUP_PLAIN | GROUP_FAR | GROUP_ZOOM
    context: str = ""  # what the photo shows besides the concept ("on the sand"), or ""


def augment(base: np.ndarray, rng: np.random.Generator, subject: np.ndarray | None = None,
            context: str = "") -> Variant:
    """Random hflip, then the reference's scale augmentation: with p=0.66 shrink to a side in
    [size/3, size] and paste at a random place on an empty (zero = mid-grey) canvas, the mask
    covering only the pasted region; otherwise zoom 1.2-1.4x and crop at random (mask everywhere).
    `subject` (a soft subject mask) goes through the same geometry and multiplies the mask."""
    size = base.shape[0]
    subj = np.ones(base.shape[:2], np.float32) if subject is None else subject
    if rng.random() < 0.5:
        base, subj = base[:, ::-1], subj[:, ::-1]
    if rng.random() < 0.66:
        s = int(rng.integers(size // 3, size + 1))
        s += s % 2
        s = min(s, size)
        canvas = np.zeros_like(base)
        mask = np.zeros(base.shape[:2], np.float32)
        top, left = (int(rng.integers(0, size - s + 1)) for _ in range(2))
        canvas[top:top + s, left:left + s] = _resize(base, s)
        mask[top:top + s, left:left + s] = _resize_mask(subj, s)
        return Variant(canvas, mask, GROUP_FAR if s < 0.6 * size else GROUP_PLAIN, context)
    s = int(rng.integers(int(1.2 * size), int(1.4 * size) + 1))
    top, left = (int(rng.integers(0, s - size + 1)) for _ in range(2))
    crop = np.ascontiguousarray(_resize(base, s)[top:top + size, left:left + size])
    mask = np.ascontiguousarray(_resize_mask(subj, s)[top:top + size, left:left + size])
    return Variant(crop, mask, GROUP_ZOOM, context)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(mask, np.float32), mode="F").resize(
        (size, size), Image.BILINEAR), dtype=np.float32).clip(0.0, 1.0)


def make_variants(images: list, size: int, augment_on: bool, per_image: int, seed: int,
                  masks: list | None = None, contexts: list[str] | None = None) -> list[Variant]:
    """Variant 0 of each image is the image itself; the rest are seeded augmentations. `masks`
    (per image, soft, image-sized) weight the loss; `contexts` (per image) extend its prompts."""
    out = []
    for i, image in enumerate(images):
        base = square(image, size)
        subj = None if masks is None else square_mask(masks[i], size)
        ctx = "" if contexts is None else contexts[i]
        out.append(Variant(base, np.ones((size, size), np.float32) if subj is None else subj,
                           GROUP_PLAIN, ctx))
        if augment_on:
            rng = np.random.default_rng([seed, i, 7])
            out += [augment(base, rng, subj, ctx) for _ in range(per_image - 1)]
    return out


# ------------------------------------------------------------------------------------------------
# what the photos show besides the concept: captions (context phrases) and subject masks

CAPTIONS_FILE = "captions.json"
MASKS_DIR = "masks"
MASK_EXTS = (".png", ".bmp", ".webp", ".jpg", ".jpeg")
BORDER = 1 / 16  # soft border of a subject mask: a blur of this fraction of the image side


def _clean_phrase(text, where: str) -> str:
    if not isinstance(text, str):  # a number or null would become "5" or "None" in the prompts
        import json

        shown = json.dumps(text, default=repr)
        raise ConfigError(f"{where}: a caption must be text (a JSON string), got "
                          f"{shown if len(shown) <= 60 else shown[:57] + '...'}")
    phrase = " ".join(text.split())
    if not phrase or len(phrase) > 200 or "{" in phrase or "}" in phrase:
        raise ConfigError(f"{where}: a caption must be 1-200 characters of text without braces, "
                          f"got {text!r}")
    return phrase


def _read_utf8(path: Path, what: str) -> str:
    """A text file in strict UTF-8 (a leading BOM dropped): a bad byte is refused, never replaced."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}: "
                          f"{exc.object[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _caption_files(image_files: list[Path]) -> list[str] | None:
    """`<photo>.txt` next to every photo, or next to none (None); some only is refused: the
    captions would change what the others' prompts mean."""
    txts = [f.with_suffix(".txt") for f in image_files]
    have = [t.is_file() for t in txts]
    if not any(have):
        return None
    if not all(have):
        missing = [f.name for f, h in zip(image_files, have) if not h]
        raise ConfigError(f"only some photos have a caption file: {_names(missing)} "
                          f"{'has' if len(missing) == 1 else 'have'} no <photo>.txt; caption "
                          "every photo or none (or pass --captions none)")
    return [_clean_phrase(_read_utf8(t, "caption file"), str(t)) for t in txts]


def read_captions(spec: str | None, image_files: list[Path]) -> list[str] | None:
    """Per-photo context phrases (what each photo shows besides the concept, e.g. "on the sand").

    spec: None/"none" (no captions), "auto" (the folder's `captions.json` if present, else a
    `<photo>.txt` next to every photo, else none), or a JSON file {"photo.png": "on sand", ...}.
    Every photo is captioned or none is (a partial set is refused); captions are strings, files
    strict UTF-8. Returns None when there are no captions."""
    import json

    if spec is None or spec.strip().lower() == "none":
        return None
    folder = image_files[0].parent
    auto = spec.strip().lower() == "auto"
    path = folder / CAPTIONS_FILE if auto else Path(spec)
    if auto and not path.is_file():
        return _caption_files(image_files)
    if not path.is_file():
        raise ConfigError(f"--captions file not found: {path}")
    try:
        table = json.loads(_read_utf8(path, "--captions"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--captions {path} is not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"--captions {path}: expected an object {{\"photo.png\": \"on sand\"}}")
    missing = [f.name for f in image_files if f.name not in table]
    if missing:
        raise ConfigError(f"--captions {path} has no caption for {_names(missing)}; caption "
                          "every photo or none")
    return [_clean_phrase(table[f.name], f"--captions {path} entry {f.name!r}")
            for f in image_files]


def read_masks(spec: str | None, image_files: list[Path]) -> list[np.ndarray] | None:
    """Per-photo subject masks (white = the concept) from a folder with a file of the same stem
    per photo (any of MASK_EXTS); None/"none": no masks; "auto": None here (see auto_masks).
    Returned soft: values in [0, 1] at the photo's size, with a blurred border so the loss fades
    out instead of cutting. A mask has its photo's size, or its aspect ratio (a mask made at
    another resolution: resized); another shape is refused (it would be stretched over the
    photo)."""
    if spec is None or spec.strip().lower() in ("none", "auto"):
        return None  # auto: made from the base model's attention once it is loaded (auto_masks)
    d = Path(spec)
    if not d.is_dir():
        raise ConfigError(f"--masks {d} is not a folder of mask images")
    out = []
    for f in image_files:
        cands = [d / (f.stem + e) for e in MASK_EXTS if (d / (f.stem + e)).is_file()]
        if not cands:
            raise ConfigError(f"--masks {d} has no mask for {f.name} (expected {f.stem}.png)")
        out.append(_read_mask(cands[0], f))
    return out


def same_aspect(mask_size: tuple[int, int], photo_size: tuple[int, int]) -> bool:
    """The mask is the photo's shape up to rounding its sides to whole pixels."""
    (mw, mh), (pw, ph) = mask_size, photo_size
    return abs(mw * ph - mh * pw) <= pw + ph


def _read_mask(path: Path, photo: Path) -> np.ndarray:
    from PIL import Image, ImageFilter

    try:
        with Image.open(path) as im, Image.open(photo) as ph:
            m = im.convert("L")
            if m.size != ph.size:
                if not same_aspect(m.size, ph.size):
                    raise ConfigError(
                        f"mask {path} is {m.width}x{m.height} but its photo {photo.name} is "
                        f"{ph.width}x{ph.height}: a mask must have its photo's size (or aspect "
                        "ratio, it is then resized)")
                m = m.resize(ph.size, Image.BILINEAR)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"corrupt mask {path}: {exc}") from None
    hard = np.asarray(m, np.float32) / 255.0
    if hard.max() < 0.5:
        raise ConfigError(f"mask {path} is empty (no pixel >= 128)")
    blur = np.asarray(m.filter(ImageFilter.GaussianBlur(max(1.0, BORDER * max(m.size)))),
                      np.float32) / 255.0
    return np.maximum(hard, np.clip(2.0 * blur, 0.0, 1.0))


def square_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """`square` for a mask: the same centre crop and resize."""
    h, w = mask.shape
    s = min(w, h)
    top, left = (h - s) // 2, (w - s) // 2
    return _resize_mask(mask[top:top + s, left:left + s], size)


@dataclass
class LatentBank:
    """VAE posteriors of every variant, computed once. Shapes: (V, C, h, w), masks (V, 1, h, w)."""

    mean: "torch.Tensor"
    std: "torch.Tensor"
    mask: "torch.Tensor"
    keys: list  # per variant: (group, context), its rows of the prompt table
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
    masks = F.avg_pool2d(masks, factor)  # (V, 1, h, w): soft weights at latent resolution
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return LatentBank(torch.cat(means).clone(), torch.cat(stds).clone(), masks.to(device),
                      [(v.group, v.context) for v in variants],
                      float(vae.config.scaling_factor), float(shift))


def subject_text(placeholder_text: str, class_word: str, phrase: str = "",
                 context: str = "") -> str:
    """"<tok> heart", with a framing phrase before and the photo's context after:
    "a far away <tok> heart on the sand"."""
    return " ".join(p for p in (phrase, placeholder_text, class_word.strip(), context) if p)


@dataclass
class PromptTable:
    """Every (template, framing phrase, context) prompt, tokenized once: ids (P, 77); the rows
    of each (group, context) key."""

    prompts: list[str]
    ids: "torch.Tensor"
    rows: dict[tuple[int, str], list[int]]

    def pick(self, keys: list[tuple[int, str]], gen) -> "torch.Tensor":
        import torch

        choice = []
        for k in keys:
            rows = self.rows[k]
            choice.append(rows[int(torch.randint(len(rows), (1,), generator=gen))])
        return self.ids[choice]


def training_prompts(templates, placeholder_text: str, class_word: str, contexts=("",)):
    """Every training prompt, in the prompt table's order: ((group, context), prompt) pairs."""
    for g, phrases in GROUP_PHRASES.items():
        for ctx in dict.fromkeys(contexts):
            for t in templates:
                for ph in phrases:
                    yield (g, ctx), t.format(subject_text(placeholder_text, class_word, ph, ctx))


def build_prompts(tokenizer, templates, placeholder_text: str, class_word: str,
                  contexts=("",)) -> PromptTable:
    prompts: list[str] = []
    rows: dict[tuple[int, str], list[int]] = {}
    for key, prompt in training_prompts(templates, placeholder_text, class_word, contexts):
        rows.setdefault(key, []).append(len(prompts))
        prompts.append(prompt)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return PromptTable(prompts, ids, rows)


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Each prompt's length in tokens (with start and end), never cut."""
    if not prompts:
        return []
    return [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
