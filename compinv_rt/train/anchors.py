"""Anchors: the real words the placeholder is attracted to (semantic inversion).

One anchor reproduces the reference exactly: the target is the anchor word's input embedding.
With K anchors the target is a sparse non-negative combination `sum_k alpha_k a_k`: the
coefficients are learned with the vectors (Adam), an L1 penalty pushes unneeded ones to zero and a
projection after each step keeps them >= 0 (so zeros are exact). `auto:K` picks the K nearest real
vocabulary words of the init word (cosine similarity of input embeddings; the init word itself is
its own nearest, so auto:1 is the init word).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from compinv_rt.models.tokens import single_token_id
from compinv_rt.train.config import parse_anchor_spec

_WORD = re.compile(r"^[a-z]{2,}</w>$")
CARRIES_WEIGHT = 0.05  # an anchor "carries weight" when alpha_k >= 5% of sum(alpha)


@lru_cache(maxsize=4)
def _real_word_ids(vocab_items: tuple) -> list[int]:
    return sorted(i for tok, i in vocab_items if _WORD.match(tok))


def real_word_ids(tokenizer) -> list[int]:
    """Ids of whole, alphabetic vocabulary words (no sub-word pieces, symbols or added tokens)."""
    n = tokenizer.vocab_size  # the base vocabulary, without added tokens
    items = tuple((t, i) for t, i in tokenizer.get_vocab().items() if i < n)
    return _real_word_ids(items)


def word_of(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(token_id)).removesuffix("</w>")


def nearest_words(table: torch.Tensor, tokenizer, query: torch.Tensor, k: int,
                  candidates: list[int] | None = None) -> list[tuple[int, float]]:
    """K nearest real words to `query` by cosine similarity: [(id, cosine), ...]."""
    ids = torch.tensor(candidates if candidates is not None else real_word_ids(tokenizer))
    rows = table[ids].float()
    cos = torch.nn.functional.cosine_similarity(rows, query.float()[None], dim=-1)
    top = torch.topk(cos, min(k, len(ids)))
    return [(int(ids[j]), float(c)) for c, j in zip(top.values, top.indices)]


def resolve_anchor_words(tokenizer, spec: str | None, class_word: str, init_word: str) -> list[str]:
    """Cheap part (tokenizer only): the explicit anchor words, validated. auto:K -> [] here."""
    kind, value = parse_anchor_spec(spec)
    if kind == "auto":
        return []
    words = [class_word.strip()] if kind == "default" else value
    for w in words:
        single_token_id(tokenizer, w, "anchor word")
    return words


def resolve_anchor_ids(tokenizer, table: torch.Tensor, spec: str | None, class_word: str,
                       init_id: int) -> list[int]:
    kind, value = parse_anchor_spec(spec)
    if kind == "auto":
        return [i for i, _ in nearest_words(table, tokenizer, table[init_id], value)]
    words = [class_word.strip()] if kind == "default" else value
    return [single_token_id(tokenizer, w, "anchor word") for w in words]


class AnchorTarget(nn.Module):
    """The attractor: a fixed anchor (K = 1) or a learned sparse non-negative combination."""

    def __init__(self, anchors: torch.Tensor):  # (K, D)
        super().__init__()
        self.register_buffer("anchors", anchors.detach().clone().float())
        k = anchors.shape[0]
        self.learned = k > 1
        self.coefs = nn.Parameter(torch.full((k,), 1.0 / k), requires_grad=self.learned)

    def forward(self) -> torch.Tensor:  # (D,)
        return self.coefs @ self.anchors

    @torch.no_grad()
    def project(self) -> None:
        self.coefs.clamp_(min=0.0)


def anchor_loss(vectors: torch.Tensor, target: AnchorTarget, seq_len: int, l1: float):
    """Reference normalization: the mean over B x T x D of the input-embedding difference between
    the prompt and the anchor prompt = sum over placeholder positions ||v_i - t||^2 / (T * D).
    Returns (attraction, l1 penalty); the penalty is scaled like the attraction (relative to the
    anchors' mean squared norm) so `l1` is dimensionless, and is zero for one fixed anchor."""
    d = vectors.shape[-1]
    attraction = ((vectors - target()[None]) ** 2).sum() / (seq_len * d)
    if not target.learned or l1 == 0:
        return attraction, attraction.new_zeros(())
    scale = (target.anchors ** 2).sum(-1).mean() / (seq_len * d)
    return attraction, l1 * scale * target.coefs.abs().sum()


@dataclass(frozen=True)
class AnchorReport:
    word: str
    token_id: int
    coefficient: float
    carries_weight: bool


def report(tokenizer, ids: list[int], target: AnchorTarget) -> list[AnchorReport]:
    c = target.coefs.detach().float()
    total = float(c.sum()) or 1.0
    return [AnchorReport(word_of(tokenizer, i), int(i), round(float(a), 6),
                         float(a) >= CARRIES_WEIGHT * total and float(a) > 0)
            for i, a in zip(ids, c)]
