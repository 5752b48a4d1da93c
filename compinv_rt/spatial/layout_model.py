"""The layout model: prompt text-encoder states + concept token positions -> one box per concept.

A small MLP in the spirit of the reference's (per-token Linear(D -> 64), GELU, flatten 77 x 64,
Linear), extended so it serves any number of concepts up to 4: the flattened prompt feature is
joined with each concept's pooled token feature, the pooled feature of the words that follow it
(up to the next concept: "at the top left", "on the right on grass"), its slot and the concept
count, and a shared head predicts that concept's box as (centre, size) through a sigmoid, so
boxes are always valid. The following words matter because CLIP's text encoder is causal: a
concept's own token states never see the place words said after it, and the flattened prompt
has them at a different slot in every caption.

Trained from layouts: ground truth (a JSONL of {"prompt", "phrases", "boxes"}) or layouts
recovered from the base model's own cross-attention on generated "A and B" images. Stored as
`layout_model.safetensors` (config in its metadata) + `layout_model.json`; never pickle.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from compinv_rt.core.errors import ArtifactError, ConfigError
from compinv_rt.spatial.layouts import MAX_CONCEPTS, check_box, concept_tokens

log = logging.getLogger(__name__)
WEIGHTS, CONFIG = "layout_model.safetensors", "layout_model.json"
FORMAT_VERSION = 2  # 2: + the following-words feature (config "context"); reads 1 (without it)
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class LayoutModelConfig:
    hidden: int  # text-encoder width D
    seq_len: int = 77
    token_dim: int = 64
    width: int = 256
    max_concepts: int = MAX_CONCEPTS
    context: bool = False  # reads the words after each concept (format 2); False: format 1 models


class LayoutMLP(nn.Module):
    def __init__(self, cfg: LayoutModelConfig):
        super().__init__()
        self.cfg = cfg
        self.token = nn.Sequential(nn.Linear(cfg.hidden, cfg.token_dim), nn.GELU())
        self.prompt = nn.Sequential(nn.Linear(cfg.seq_len * cfg.token_dim, cfg.width), nn.GELU())
        n = cfg.max_concepts
        pooled = cfg.token_dim * (2 if cfg.context else 1)
        self.head = nn.Sequential(nn.Linear(cfg.width + pooled + 2 * n, cfg.width), nn.GELU(),
                                  nn.Linear(cfg.width, 4))

    def forward(self, states: torch.Tensor, weights: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """states (B, 77, D); weights (B, K, 77): each concept's token indicator (all-zero rows are
        padding); context (B, K, 77): the indicator of the words following each concept
        (`context_weights`; needed when cfg.context) -> boxes (B, K, 4) as x0, y0, x1, y1 in [0, 1]."""
        b, k, _ = weights.shape
        tok = self.token(states)  # (B, 77, E)
        g = self.prompt(tok.flatten(1))  # (B, W)
        pooled = weights @ tok / weights.sum(-1, keepdim=True).clamp_min(1)  # (B, K, E)
        if self.cfg.context:
            if context is None:
                raise ValueError("this layout model reads the words after each concept: pass context")
            after = context @ tok / context.sum(-1, keepdim=True).clamp_min(1)
            pooled = torch.cat([pooled, after], -1)
        n = self.cfg.max_concepts
        slot = torch.eye(n, device=states.device)[:k].expand(b, k, n)
        count = (weights.sum(-1) > 0).sum(1)  # (B,)
        count = F.one_hot((count - 1).clamp(0, n - 1), n).to(states.dtype)[:, None].expand(b, k, n)
        out = torch.sigmoid(self.head(torch.cat([g[:, None].expand(b, k, -1), pooled, slot, count], -1)))
        centre, size = out[..., :2], 0.02 + 0.98 * out[..., 2:]
        return torch.cat([(centre - size / 2).clamp(0, 1), (centre + size / 2).clamp(0, 1)], -1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (..., 4) x (..., 4) -> (...)
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-9)


# --- data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutExample:
    prompt: str
    phrases: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]  # one box per phrase


def read_jsonl(path: str | Path) -> list[LayoutExample]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"layout data file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            ex = LayoutExample(d["prompt"], tuple(d["phrases"]),
                               tuple(check_box(b, f"{path}:{n} box") for b in d["boxes"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{n} is not a layout record "
                              f"{{\"prompt\", \"phrases\", \"boxes\"}} ({exc})") from None
        if len(ex.phrases) != len(ex.boxes) or not 1 <= len(ex.phrases) <= MAX_CONCEPTS:
            raise ConfigError(f"{path}:{n}: need 1-{MAX_CONCEPTS} phrases and one box per phrase")
        out.append(ex)
    if not out:
        raise ConfigError(f"no layout records in {path}")
    return out


def write_jsonl(path: str | Path, examples) -> Path:
    from compinv_rt.core.outputs import atomic_write_text

    lines = [json.dumps({"prompt": e.prompt, "phrases": list(e.phrases),
                         "boxes": [[round(v, 4) for v in b] for b in e.boxes]}) for e in examples]
    return atomic_write_text(path, "\n".join(lines) + "\n")


@torch.no_grad()
def encode(tokenizer, text_encoder, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """The conditioning states (N, 77, D), as the pipeline computes them (float32, CPU)."""
    device = next(text_encoder.parameters()).device
    out = []
    for i in range(0, len(prompts), batch):
        ids = tokenizer(prompts[i:i + batch], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(device))[0].float().cpu())
    return torch.cat(out)


def token_weights(token_lists: list[list[int]], seq_len: int = 77) -> torch.Tensor:  # (K, 77)
    w = torch.zeros(len(token_lists), seq_len)
    for k, toks in enumerate(token_lists):
        w[k, toks] = 1.0
    return w


def context_weights(token_lists: list[list[int]], n_tokens: int, seq_len: int = 77) -> torch.Tensor:
    """(K, 77): for each concept, the tokens after its last one up to the next concept's first
    (or the prompt's end, EOS excluded); `n_tokens` counts the prompt's tokens with BOS and EOS."""
    starts = sorted(min(t) for t in token_lists if t)
    end_of_prompt = min(n_tokens, seq_len) - 1
    w = torch.zeros(len(token_lists), seq_len)
    for k, toks in enumerate(token_lists):
        if not toks:
            continue
        after = max(toks) + 1
        stop = min([s for s in starts if s >= after] + [end_of_prompt])
        w[k, after:stop] = 1.0
    return w


def prompt_length(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def _tensors(examples, tokenizer, text_encoder, seq_len=77):
    states = encode(tokenizer, text_encoder, [e.prompt for e in examples])
    weights = torch.zeros(len(examples), MAX_CONCEPTS, seq_len)
    context = torch.zeros(len(examples), MAX_CONCEPTS, seq_len)
    boxes = torch.zeros(len(examples), MAX_CONCEPTS, 4)
    valid = torch.zeros(len(examples), MAX_CONCEPTS, dtype=torch.bool)
    for i, e in enumerate(examples):
        toks = concept_tokens(tokenizer, e.prompt, e.phrases)
        k = len(toks)
        weights[i, :k] = token_weights(toks, seq_len)
        context[i, :k] = context_weights(toks, prompt_length(tokenizer, e.prompt), seq_len)
        boxes[i, :k] = torch.tensor(e.boxes)
        valid[i, :k] = True
    return states, weights, context, boxes, valid


# --- training, evaluation, storage ---------------------------------------------------------


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 10
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0


def fit(examples, tokenizer, text_encoder, cfg: FitConfig = FitConfig(),
        on_epoch: Callable[[int, int, float], None] | None = None) -> LayoutMLP:
    """Train on layouts: L1 on the box coordinates plus (1 - IoU), Adam, cosine schedule."""
    torch.manual_seed(cfg.seed)
    states, weights, context, boxes, valid = _tensors(examples, tokenizer, text_encoder)
    model = LayoutMLP(LayoutModelConfig(hidden=states.shape[-1], context=True))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    n = len(examples)
    steps = cfg.epochs * math.ceil(n / cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    order = list(range(n))
    rng = random.Random(cfg.seed)
    for epoch in range(cfg.epochs):
        rng.shuffle(order)
        total = 0.0
        for i in range(0, n, cfg.batch):
            idx = torch.tensor(order[i:i + cfg.batch])
            pred = model(states[idx], weights[idx], context[idx])
            v = valid[idx]
            loss = (F.l1_loss(pred[v], boxes[idx][v]) + (1 - box_iou(pred[v], boxes[idx][v])).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if on_epoch:
            on_epoch(epoch + 1, cfg.epochs, total / n)
    return model.eval()


@torch.no_grad()
def evaluate(model: LayoutMLP, examples, tokenizer, text_encoder) -> dict:
    """Mean IoU of predicted vs given boxes over all concepts, plus the fixed-box baseline."""
    from compinv_rt.spatial.layouts import fixed_boxes

    states, weights, context, boxes, valid = _tensors(examples, tokenizer, text_encoder)
    pred = model(states, weights, context)
    fixed = torch.zeros_like(boxes)
    for i, e in enumerate(examples):
        fixed[i, :len(e.phrases)] = torch.tensor(fixed_boxes(len(e.phrases)))
    return {"mean_iou": box_iou(pred[valid], boxes[valid]).mean().item(),
            "fixed_boxes_iou": box_iou(fixed[valid], boxes[valid]).mean().item(),
            "concepts": int(valid.sum()), "prompts": len(examples)}


def save(model: LayoutMLP, out_dir: str | Path, info: dict, half: bool = False) -> Path:
    """Atomically write layout_model.safetensors (config in its metadata) + layout_model.json.
    `half`: float16 weights (half the size; `load` computes in float32 either way)."""
    from safetensors.torch import save as st_save

    from compinv_rt.core.outputs import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    meta = {"format_version": FORMAT_VERSION, "config": asdict(model.cfg), **info}
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS, st_save(state, metadata={"compinv_rt": json.dumps(meta)}))
    atomic_write_json(out / CONFIG, meta)
    return out


def load(path: str | Path) -> tuple[LayoutMLP, dict]:
    """A layout model folder (or its .safetensors file) -> (model, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise ArtifactError(f"no layout model at {path} (expected {WEIGHTS})")
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["compinv_rt"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise ArtifactError(f"layout model {weights} has format {meta.get('format_version')}, "
                                f"this version reads {', '.join(map(str, READABLE_VERSIONS))}")
        model = LayoutMLP(LayoutModelConfig(**meta["config"]))
        model.load_state_dict(state)
    except ArtifactError:
        raise
    except Exception as exc:  # corrupt header, missing keys, wrong shapes
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"corrupt layout model {weights}: {msg}") from None
    return model.eval(), meta


class LayoutPredictor:
    """`resolve_layout`'s predictor: (prompt, token lists) -> one box per concept."""

    def __init__(self, model: LayoutMLP, tokenizer, text_encoder):
        hidden = text_encoder.config.hidden_size
        if model.cfg.hidden != hidden:
            raise ArtifactError(f"the layout model was fit on a {model.cfg.hidden}-wide text "
                                f"encoder; this model's is {hidden}-wide")
        self.model, self.tokenizer, self.text_encoder = model, tokenizer, text_encoder

    @torch.no_grad()
    def __call__(self, prompt: str, token_lists: list[list[int]]) -> list[tuple]:
        states = encode(self.tokenizer, self.text_encoder, [prompt])
        seq_len = self.model.cfg.seq_len
        context = context_weights(token_lists, prompt_length(self.tokenizer, prompt), seq_len)
        boxes = self.model(states, token_weights(token_lists, seq_len)[None], context[None])[0]
        return [tuple(round(v, 4) for v in b.tolist()) for b in boxes]
