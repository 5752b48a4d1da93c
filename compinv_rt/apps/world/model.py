"""Architecture of the embedded shapes-world Stable Diffusion and its diffusers export.

Sized for CPU training and fast CPU sampling at 64x64: a factor-4 AutoencoderKL (16x16x4 latents),
a UNet2DConditionModel whose cross-attention sits at 8x8, 4x4 and the mid block (`unet_attn`; the
grown base adds 16x16, the costliest place, see `grow_unet`), and a small CLIPTextModel over the
real 49,408-token CLIP vocabulary.
`export_model` writes the folder stock `StableDiffusionPipeline.from_pretrained` loads, with fp16
weights (the text encoder's config says float32 so transformers upcasts it like diffusers does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from compinv_rt.apps.world import scenes as S
from compinv_rt.models.embedded import EMBEDDED_MODEL_DIR
from compinv_rt.models.loading import METADATA_FILE
from compinv_rt.models.tokenizer import VOCAB_SIZE

DOMAIN = "shapes-world"  # models.loading.METADATA_FILE "domain" of the models built here


@dataclass(frozen=True)
class ArchConfig:
    image_size: int = 64
    # VAE: len(vae_channels) - 1 downsamplings -> latent factor
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_layers: int = 1
    latent_channels: int = 4
    # UNet
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_attn: tuple[bool, ...] = (False, True, True)  # cross-attention per resolution level
    unet_layers: int = 1
    unet_heads: int = 4
    # CLIP text encoder
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "ArchConfig":
        fields = ArchConfig.__dataclass_fields__
        kw: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
        return ArchConfig(**kw)


TINY_ARCH = ArchConfig(
    vae_channels=(8, 16, 16), unet_channels=(16, 32, 32), text_hidden=32, text_layers=1,
    unet_heads=2, text_heads=2,
)


def build_vae(arch: ArchConfig):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=arch.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=arch.latent_channels,
        norm_num_groups=min(16, arch.vae_channels[0]),
        layers_per_block=arch.vae_layers,
        sample_size=arch.image_size,
        mid_block_add_attention=False,
    )


def build_unet(arch: ArchConfig):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.unet_attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.unet_attn))
    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=arch.unet_layers,
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=arch.unet_heads,
        norm_num_groups=min(16, arch.unet_channels[0]),
    )


def grow_unet(unet, state: dict) -> list[str]:
    """Load a smaller UNet's `state` into `unet`, which may have attention blocks the smaller one
    lacks (e.g. cross-attention at 16x16). A grown block starts as the identity: its output
    projection is zero and a Transformer2DModel adds its output to its input, so the grown UNet
    computes exactly what the smaller one did, and training starts from the shipped model's
    behaviour. Returns the grown blocks' prefixes; any other mismatch is a ModelError."""
    import torch

    from compinv_rt.core.errors import ModelError

    missing, unexpected = unet.load_state_dict(state, strict=False)
    grown = sorted({k.split(".attentions.")[0] + ".attentions." + k.split(".attentions.")[1].split(".")[0]
                    for k in missing if ".attentions." in k})
    stray = [k for k in missing if not any(k.startswith(g + ".") for g in grown)] + list(unexpected)
    # a grown block must be new as a whole: none of its tensors may come from `state`
    stray += [k for k in state if any(k.startswith(g + ".") for g in grown)]
    if stray:
        raise ModelError(f"the UNet weights do not fit the architecture ({len(stray)} mismatched tensors, "
                         f"e.g. {stray[0]})")
    with torch.no_grad():
        for g in grown:
            proj = unet.get_submodule(g + ".proj_out")
            proj.weight.zero_()
            proj.bias.zero_()
    return grown


def build_text_encoder(arch: ArchConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=arch.text_hidden,
            intermediate_size=4 * arch.text_hidden,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    from compinv_rt.models.architectures import SD_SCHEDULER

    return DDIMScheduler(**SD_SCHEDULER, prediction_type="epsilon")


def export_model(vae, unet, text_encoder, out_dir: str | Path, fp16: bool = True, info: dict | None = None) -> Path:
    """Write a stock diffusers SD folder atomically (to a temp sibling, then rename)."""
    import copy

    import torch

    from compinv_rt.models.architectures import Components, save_model

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    mods = [copy.deepcopy(m).eval() for m in (unet, vae, text_encoder)]
    if fp16:
        mods = [m.to(torch.float16) for m in mods]
    save_model(Components(mods[0], mods[1], mods[2], build_scheduler()), tmp)
    # transformers >= 5 loads in the checkpoint's dtype unless the config says otherwise;
    # diffusers loads float32: make both load float32 by default.
    cfg_path = tmp / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if info is not None:
        (tmp / "shapes_world.json").write_text(json.dumps(info, indent=2))
    (tmp / METADATA_FILE).write_text(json.dumps(model_metadata(), indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


def default_model_dir() -> Path:
    return EMBEDDED_MODEL_DIR


def shapes_world_vocabulary() -> list[str]:
    """The words of the shapes world's captions: the trained vocabulary of the embedded model (a
    text encoder trained from scratch, whose other 49k rows are untrained)."""
    words = set(S.COLOURS) | set(S.SHAPES) | set(S.SIZES) | set(S.POSITIONS) | {"dotted", "striped"}
    phrases = list(S.PLACE_PHRASES.values()) + [p for ps in S.BG_PHRASES.values() for p in ps]
    for text in list(S.TEMPLATES) + phrases:
        words |= set(re.findall(r"[a-z]+", text.replace("{objs}", "").replace("{bg}", "")))
    return sorted(words | {"a", "an", "and"})


def model_metadata() -> dict:
    """What a shapes-world model tells the core about itself (models.loading.METADATA_FILE)."""
    return {"domain": DOMAIN, "vocabulary": shapes_world_vocabulary()}
