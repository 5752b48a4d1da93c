"""Loading base models: any local diffusers-format Stable Diffusion 1.x/2.x folder, fully offline.

Everything that can be checked cheaply (folder layout, model_index.json, weight-file headers) is
checked before any weights are read, so a bad folder costs milliseconds and gives one clear line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from compinv_rt.core.errors import ModelError
from compinv_rt.core.types import Precision

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

# Set before huggingface_hub is imported anywhere: no code path may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# compinv-rt's own metadata of a model folder (optional; not part of the model's content hash):
# {"vocabulary": [words its text encoder was trained on], "domain": "<what its images show>"}.
# Whoever builds a model writes it (the shapes world does); the core reads it generically.
METADATA_FILE = "compinv_rt.json"
_CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json",
                 "text_encoder/config.json", "scheduler/scheduler_config.json")


@dataclass(frozen=True)
class ModelFiles:
    """What a validated model folder holds."""

    root: Path
    index: dict
    weights: dict[str, list[Path]]  # component -> weight files (safetensors preferred)
    variant: str | None  # e.g. "fp16" when only variant files exist
    unet_config: dict
    vae_config: dict
    scheduler_config: dict

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)

    @property
    def spatial_factor(self) -> int:
        """Height and width must be multiples of this: VAE factor x UNet down-sampling factor."""
        downsamples = len(self.unet_config.get("down_block_types", [])) - 1
        return self.vae_scale_factor * 2 ** max(downsamples, 0)

    @property
    def default_size(self) -> int:
        size = self.unet_config.get("sample_size", 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @cached_property
    def text_len(self) -> int:
        """Tokens per prompt (CLIP: 77): the text encoder's positions, which prompts are padded to."""
        config = _read_json(self.root / "text_encoder" / "config.json")
        return int(config.get("max_position_embeddings", 77))

    @cached_property
    def metadata(self) -> dict:
        """The folder's compinv-rt metadata (METADATA_FILE), {} when it has none."""
        path = self.root / METADATA_FILE
        return _read_json(path) if path.is_file() else {}

    @property
    def vocabulary(self) -> list[str] | None:
        """The words the text encoder was trained on, if the model says (a model trained from
        scratch on a small world leaves the other rows of its table untrained)."""
        words = self.metadata.get("vocabulary")
        return list(words) if words else None

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def all_files(self) -> list[Path]:
        files = [self.root / f for f in _CONFIG_FILES]
        return files + [p for comp in sorted(self.weights) for p in self.weights[comp]]


def resolve_model_dir(spec: str | os.PathLike | None) -> Path:
    """`None` -> the embedded default; a path -> that folder; a hub id -> a clear refusal."""
    if spec is None or str(spec) == "":
        from compinv_rt.models.embedded import default_model_dir

        return default_model_dir()
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {spec} is a file; expected a diffusers model folder")
        return path
    if _HUB_ID.match(str(spec)):
        raise ModelError(
            f"--model {spec} looks like a Hugging Face hub id; compinv-rt never downloads: "
            "download it elsewhere and pass the local folder"
        )
    raise ModelError(f"model folder not found: {path}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None


def _check_safetensors(path: Path) -> None:
    """Parse the header and check the file is as long as the header says (catches truncation)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError types
        raise ModelError(f"corrupt weight file {path}: {str(exc).splitlines()[0]}") from None
    if not keys:
        raise ModelError(f"corrupt weight file {path}: it holds no tensors")


def _find_weights(folder: Path, stem: str) -> tuple[list[Path], str | None]:
    for variant in (None, "fp16"):
        suffix = f".{variant}" if variant else ""
        for ext in ("safetensors", "bin"):
            single = folder / f"{stem}{suffix}.{ext}"
            if single.is_file():
                return [single], variant
            index = folder / f"{stem}{suffix}.{ext}.index.json"
            if index.is_file():
                shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                missing = [s for s in shards if not (folder / s).is_file()]
                if missing:
                    raise ModelError(f"{folder}: weight shard {missing[0]} is missing")
                return [folder / s for s in shards], variant
    return [], None


def inspect_model_dir(root: Path) -> ModelFiles:
    """Validate a model folder without loading weights. Raises ModelError naming the problem."""
    if not any(root.iterdir()):
        raise ModelError(f"model folder {root} is empty")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{root} is not a diffusers model folder: model_index.json is missing")
    index = _read_json(index_path)
    if "text_encoder_2" in index or "transformer" in index:
        raise ModelError(
            f"{root} holds a {index.get('_class_name', 'non-SD1/2')} model; "
            "compinv-rt supports Stable Diffusion 1.x/2.x"
        )
    for comp in COMPONENTS:
        if comp not in index or not (root / comp).is_dir():
            raise ModelError(f"model folder {root} is missing its {comp}/ component")
    tok = root / "tokenizer"
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()) and not (
        tok / "tokenizer.json"
    ).is_file():
        raise ModelError(f"{tok} has no vocabulary (vocab.json + merges.txt or tokenizer.json)")
    weights: dict[str, list[Path]] = {}
    variants = set()
    for comp, stem in WEIGHT_STEMS.items():
        files, variant = _find_weights(root / comp, stem)
        if not files:
            raise ModelError(f"{root / comp} has no weights (expected {stem}.safetensors)")
        for f in files:
            if f.suffix == ".safetensors":
                _check_safetensors(f)
            elif f.stat().st_size == 0:
                raise ModelError(f"corrupt weight file {f}: it is empty")
        weights[comp] = files
        variants.add(variant)
    return ModelFiles(
        root=root,
        index=index,
        weights=weights,
        variant="fp16" if variants == {"fp16"} else None,
        unet_config=_read_json(root / "unet" / "config.json"),
        vae_config=_read_json(root / "vae" / "config.json"),
        scheduler_config=_read_json(root / "scheduler" / "scheduler_config.json"),
    )


def _cache_dir() -> Path:
    return Path(os.environ.get("COMPINV_CACHE", Path.home() / ".cache" / "compinv-rt"))


def content_hash(files: list[Path], cached: bool = True) -> str:
    """sha256 over the files' contents (never their paths). Cached by (path, size, mtime) because
    hashing a full SD checkpoint takes seconds: fine for naming a model, not for integrity (a file
    changed in place with its mtime put back keeps its key), so integrity checks pass
    cached=False."""
    cache_file = _cache_dir() / "file-hashes.json"
    try:
        cache = json.loads(cache_file.read_text()) if cached else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    total = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            digest = cache[key] = h.hexdigest()
            changed = True
        total.update(digest.encode())
    if changed and cached:
        from compinv_rt.core.outputs import atomic_write_text

        try:
            atomic_write_text(cache_file, json.dumps(cache))
        except OSError:
            pass  # the cache is an optimization only
    return total.hexdigest()


@dataclass
class LoadedModel:
    files: ModelFiles
    hash: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    device: torch.device
    dtype: torch.dtype
    extras: dict = field(default_factory=dict)

    @property
    def precision(self) -> Precision:
        return Precision.of(self.dtype)

    @property
    def root(self) -> Path:
        return self.files.root


def pick_device(name: str = "auto"):
    import torch

    from compinv_rt.core.errors import BackendUnavailable, ConfigError
    from compinv_rt.core.schemas import DEVICE

    if not DEVICE.match(str(name)):
        raise ConfigError(f"--device must be auto, cpu, mps, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda asked for, but torch sees no CUDA device")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise BackendUnavailable(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA "
                                 "device(s), numbered from 0")
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise BackendUnavailable("--device mps asked for, but torch sees no MPS device")
    return torch.device(name)


def load_model(spec, device: str = "auto", dtype: Precision | str = Precision.auto) -> LoadedModel:
    """dtype: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (fast on CPUs with AMX)."""
    precision = Precision.parse(dtype)
    files = inspect_model_dir(resolve_model_dir(spec))
    dev = pick_device(device)
    torch_dtype = precision.resolve(dev).torch_dtype

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # Library progress bars and warnings would interleave with ours; errors still surface as raised.
    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()

    def _load(what, fn):
        try:
            return fn()
        except ModelError:
            raise
        except Exception as exc:  # any loader failure here is a problem of the user's files
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load {what} from {files.root}: {msg}") from None

    common = dict(local_files_only=True, torch_dtype=torch_dtype, variant=files.variant)
    root = str(files.root)
    tokenizer = _load("tokenizer", lambda: CLIPTokenizer.from_pretrained(root, subfolder="tokenizer",
                                                                      local_files_only=True))
    text_encoder = _load("text_encoder", lambda: CLIPTextModel.from_pretrained(
        root, subfolder="text_encoder", **common))
    unet = _load("unet", lambda: UNet2DConditionModel.from_pretrained(root, subfolder="unet", **common))
    vae = _load("vae", lambda: AutoencoderKL.from_pretrained(root, subfolder="vae", **common))
    for module in (text_encoder, unet, vae):
        module.to(dev).eval().requires_grad_(False)
    return LoadedModel(files, content_hash(files.all_files()), tokenizer, text_encoder, unet, vae,
                       dev, torch_dtype)
