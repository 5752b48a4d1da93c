"""Stable Diffusion component builders: random-weight models with known architectures.

Used by the tests (a tiny SD that runs in milliseconds), by the shapes-world recipe as its starting
point, and by benchmarks that need architecture-true shapes without weights. `save_model` writes the
standard diffusers folder layout that `StableDiffusionPipeline.from_pretrained` loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compinv_rt.models.tokenizer import VOCAB_SIZE, write_clip_tokenizer

# SD 1.x's scheduler settings (what every SD checkpoint ships).
SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    scheduler: Any  # a diffusers scheduler


def tiny_components(seed: int = 0, prediction_type: str = "epsilon", hidden: int = 64) -> Components:
    """A 0.8 M-parameter UNet, an x8 VAE and a 2-layer CLIP text encoder with the real vocabulary."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=128,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    return Components(unet.eval(), vae.eval(), text_encoder.eval(), scheduler)


def save_model(components: Components, out_dir: str | Path) -> Path:
    """Write a diffusers-format Stable Diffusion folder (safetensors weights, real CLIP tokenizer)."""
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(out / "unet")
    components.vae.save_pretrained(out / "vae")
    components.text_encoder.save_pretrained(out / "text_encoder")
    components.scheduler.save_pretrained(out / "scheduler")
    write_clip_tokenizer(out / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(components.scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


# Architecture-true configurations of real checkpoints, for latency benchmarks without weights.
SD_ARCHS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
        vae_size=512, prediction_type="epsilon",
    ),
    "sd21": dict(
        unet=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, hidden_act="gelu", projection_dim=512),
        vae_size=768, prediction_type="v_prediction",
    ),
    # SD 1.5's topology (4 levels, 2 layers per block, 768-wide 77-token cross-attention) at a
    # fraction of the width and 64x64 pixels: exercises the SD 1.5 code paths on a CPU in seconds
    # (benchmarks/gpu_smoke.sh --device cpu). Not a latency proxy for the real size.
    "sd15-proxy": dict(
        unet=dict(sample_size=8, cross_attention_dim=768, attention_head_dim=8),
        blocks=(32, 64, 128, 128),
        text=dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=2,
                  num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
        vae_size=64, vae_blocks=(32, 32, 64, 64), prediction_type="epsilon",
    ),
}


def sd_components(arch: str, seed: int = 0) -> Components:
    """Random weights, real shapes: SD 1.5 or SD 2.1 (UNet, VAE, text encoder, scheduler)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = SD_ARCHS[arch]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=cfg.get("blocks", (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **cfg["unet"],
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=cfg.get("vae_blocks", (128, 256, 512, 512)),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=cfg["vae_size"],
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, **cfg["text"]))
    scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type=cfg["prediction_type"])
    return Components(unet.eval(), vae.eval(), text_encoder.eval(), scheduler)
