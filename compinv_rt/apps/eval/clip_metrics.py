"""The paper's metrics for real models, from local weights only (no downloads).

- `--clip PATH`: an open_clip checkpoint folder (`open_clip_config.json` + `open_clip_model.safetensors`,
  the layout open_clip writes and the hub serves; standard ViT CLIP towers such as ViT-B-32).
  open_clip's own model code needs torchvision, which this CPU environment does not have, so the
  weights are mapped onto transformers' `CLIPModel` (the same architecture) and the real CLIP BPE
  tokenizer (`models.tokenizer.clip_tokenizer`). Text alignment = 2.5 x max(cosine(image, prompt
  without placeholders), 0) (CLIPScore); image alignment = cosine to the user's photos, averaged.
- `--detector PATH`: a transformers DETR folder (`DetrForObjectDetection`, safetensors). An image
  counts for CoI when every label the prompt asks to detect scores >= 0.8.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from compinv_rt.core.errors import ModelError

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _read_clip_config(path: Path) -> tuple[dict, dict]:
    f = path / CONFIG
    if not f.is_file():
        raise ModelError(f"--clip {path}: {CONFIG} not found (expected an open_clip checkpoint "
                         f"folder: {CONFIG} + {WEIGHTS})")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"--clip {f} is not valid JSON: {exc.msg}") from None
    model_cfg = cfg.get("model_cfg", cfg)
    vision, text = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    if not isinstance(vision, dict) or not isinstance(text, dict) or "embed_dim" not in model_cfg:
        raise ModelError(f"--clip {f}: needs model_cfg with embed_dim, vision_cfg and text_cfg")
    if any(k in vision for k in ("timm_model_name", "hf_model_name")) or "hf_model_name" in text:
        raise ModelError(f"--clip {path}: timm/HF tower CLIP variants are not supported; use a "
                         "standard ViT CLIP (e.g. ViT-B-32)")
    return model_cfg, cfg.get("preprocess_cfg", {})


def _hf_config(mc: dict):
    from transformers import CLIPConfig

    v, t = mc["vision_cfg"], mc["text_cfg"]
    act = "quick_gelu" if mc.get("quick_gelu") else "gelu"
    vw, tw = int(v["width"]), int(t["width"])
    text = dict(vocab_size=int(t.get("vocab_size", 49408)), hidden_size=tw,
                intermediate_size=int(tw * t.get("mlp_ratio", 4)), num_hidden_layers=int(t["layers"]),
                num_attention_heads=int(t.get("heads", tw // 64)),
                max_position_embeddings=int(t.get("context_length", 77)), hidden_act=act,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    vision = dict(hidden_size=vw, intermediate_size=int(vw * v.get("mlp_ratio", 4)),
                  num_hidden_layers=int(v["layers"]),
                  num_attention_heads=vw // int(v.get("head_width", 64)),
                  image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), hidden_act=act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(mc["embed_dim"]))


def convert_open_clip(sd: dict) -> dict:
    """open_clip CLIP state dict -> transformers CLIPModel state dict."""
    out = {}

    def tower(src: str, dst: str):
        layers = {int(k[len(src):].split(".")[0]) for k in sd if k.startswith(src)}
        for i in layers:
            a, b = f"{src}{i}.", f"{dst}{i}."
            w, bias = sd[a + "attn.in_proj_weight"], sd[a + "attn.in_proj_bias"]
            for name, wi, bi in zip("qkv", w.chunk(3), bias.chunk(3)):
                out[f"{b}self_attn.{name}_proj.weight"], out[f"{b}self_attn.{name}_proj.bias"] = wi, bi
            for s, d in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{b}{d}.weight"], out[f"{b}{d}.bias"] = sd[f"{a}{s}.weight"], sd[f"{a}{s}.bias"]

    tower("transformer.resblocks.", "text_model.encoder.layers.")
    tower("visual.transformer.resblocks.", "vision_model.encoder.layers.")
    simple = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight",
              "ln_final.bias": "text_model.final_layer_norm.bias",
              "visual.class_embedding": "vision_model.embeddings.class_embedding",
              "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
              "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
              "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
              "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
              "visual.ln_post.weight": "vision_model.post_layernorm.weight",
              "visual.ln_post.bias": "vision_model.post_layernorm.bias",
              "logit_scale": "logit_scale"}
    for s, d in simple.items():
        out[d] = sd[s]
    out["text_projection.weight"] = sd["text_projection"].T.contiguous()
    out["visual_projection.weight"] = sd["visual.proj"].T.contiguous()
    return out


class ClipScorer:
    def __init__(self, path: str | Path):
        import torch
        from safetensors.torch import load_file
        from transformers import CLIPModel

        from compinv_rt.models.tokenizer import clip_tokenizer

        path = Path(path)
        if not path.is_dir():
            raise ModelError(f"--clip {path} is not a folder")
        mc, pc = _read_clip_config(path)
        weights = path / WEIGHTS
        if not weights.is_file():
            raise ModelError(f"--clip {path}: {WEIGHTS} not found (only safetensors weights are "
                             "loaded, never pickle)")
        try:
            sd = convert_open_clip(load_file(str(weights)))
        except KeyError as exc:
            raise ModelError(f"--clip {weights}: not a standard open_clip CLIP ({exc} missing)") from None
        self.model = CLIPModel(_hf_config(mc)).eval()
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ModelError(f"--clip {weights}: weights do not fit the config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.tokenizer = clip_tokenizer()
        self.size = int(mc["vision_cfg"]["image_size"])
        self.mean = torch.tensor(pc.get("mean", OPENAI_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pc.get("std", OPENAI_STD)).view(1, 3, 1, 1)
        self.context = int(mc["text_cfg"].get("context_length", 77))
        self.path = path

    def image_features(self, images):
        import torch
        from PIL import Image

        arr = np.stack([np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC))
                        for im in images]).astype(np.float32) / 255.0
        x = (torch.from_numpy(arr).permute(0, 3, 1, 2) - self.mean) / self.std
        with torch.no_grad():
            f = self.model.get_image_features(pixel_values=x)
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f, dim=-1)

    def text_features(self, texts: list[str]):
        import torch

        ids = self.tokenizer(texts, padding="max_length", max_length=self.context, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            f = self.model.get_text_features(input_ids=ids)
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f, dim=-1)

    def score(self, images, text: str, reference_features) -> list[dict]:
        """Per image: clip_text (2.5 x max(cos, 0)) and clip_image (mean cosine to the photos)."""
        img = self.image_features(images)
        txt = self.text_features([text])[0]
        t = (2.5 * (img @ txt).clamp_min(0)).tolist()
        i = (img @ reference_features.T).mean(1).tolist() if reference_features is not None else [None] * len(t)
        return [{"clip_text": round(a, 5), "clip_image": None if b is None else round(b, 5)}
                for a, b in zip(t, i)]


class DetrScorer:
    def __init__(self, path: str | Path, threshold: float = 0.8):
        from transformers import DetrForObjectDetection, DetrImageProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelError(f"--detector {path}: config.json not found (expected a transformers "
                             "DETR folder)")
        try:
            self.model = DetrForObjectDetection.from_pretrained(str(path), use_safetensors=True,
                                                                local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise ModelError(f"--detector {path}: cannot load a DETR model: "
                             f"{str(exc).splitlines()[0]}") from None
        try:
            self.processor = DetrImageProcessor.from_pretrained(str(path), local_files_only=True)
        except OSError:
            self.processor = DetrImageProcessor()
        self.labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        self.threshold = threshold
        self.path = path

    def known(self, labels) -> list[str]:
        return [lab for lab in labels if lab.lower() in self.labels]

    def coi(self, images, labels: list[str]) -> list[float]:
        """Per image: 1.0 when every label is detected with score >= threshold."""
        import torch

        want = {self.labels[lab.lower()] for lab in labels}
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        with torch.no_grad():
            out = self.model(**inputs)
        sizes = torch.tensor([[im.height, im.width] for im in images])
        res = self.processor.post_process_object_detection(out, threshold=self.threshold,
                                                           target_sizes=sizes)
        return [float(want <= set(r["labels"].tolist())) for r in res]
