"""Constraints that keep a learned token from dominating the prompt it is used in.

- Norm constraint (`--norm vocab|vocab:K|X`): after every step each vector is rescaled to a fixed
  norm (the median norm of the vocabulary's words, K times it, or X); only its direction is learned. Plain TI drives the
  token to 5-8x the typical word norm, and a long vector outweighs the other words in attention.
- Context regularizer (`--context-weight W`): in composition prompts ("a photo of a <tok> heart and
  a blue circle"), the text encoder's outputs for the *other* tokens (everything after the concept:
  the other object, the end token and the padding the UNet also reads) must stay what they are
  when the class word stands in place of the token ("a photo of a heart and a blue circle"). The
  reference outputs are computed once; per step one batch of composition prompts runs through the
  text encoder with the gradient. The concept's own positions (its vectors and the class word
  after them) are free.
"""

from __future__ import annotations

import torch

# parse_norm lives with the config (checked without torch); imported from here by eval and tests
from compinv_rt.train.config import NORM_MAX, NORM_MIN, parse_norm  # noqa: F401

COLOUR_SHAPE_OTHERS = tuple(f"a {c} {s}" for c in ("red", "blue", "green", "yellow", "purple",
                                                   "orange")
                            for s in ("circle", "square", "star", "triangle", "heart", "cross"))
GENERIC_OTHERS = ("a dog", "a cat", "a cup", "a chair", "a car", "a tree", "a person", "a book")


def composition_others(vocabulary: list[str] | None, class_word: str) -> list[str]:
    """The other objects of the regularizer's composition prompts: for a model that declares a
    small trained vocabulary, the colour-shape phrases made of its words; otherwise common
    objects. Never the concept's own class."""
    known = set(vocabulary or ())
    pool = [o for o in COLOUR_SHAPE_OTHERS if set(o.split()[1:]) <= known] or GENERIC_OTHERS
    return [o for o in pool if class_word.strip() not in o.split()]


def vocabulary_norm(table: torch.Tensor, vocab_ids: list[int]) -> float:
    """The median L2 norm of the vocabulary's input embeddings."""
    return float(table[vocab_ids].float().norm(dim=-1).median())


@torch.no_grad()
def project_norm(vectors: torch.Tensor, norm: float) -> None:
    vectors.mul_(norm / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12))


class ContextRegularizer:
    """Composition prompts with the token and the same prompts with the class word in its place,
    aligned position by position after the concept."""

    def __init__(self, tokenizer, text_encoder, templates, placeholder_text: str, class_word: str,
                 n_vectors: int, others, use_mask: bool):
        with_tok, with_word = [], []
        for t in templates:
            for o in others:
                with_tok.append(t.format(f"{placeholder_text} {class_word} and {o}"))
                with_word.append(t.format(f"{class_word} and {o}"))
        def enc(texts):
            return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids

        self.ids = enc(with_tok)  # (P, T)
        ref_ids = enc(with_word)
        self.n = n_vectors
        self.pad = tokenizer.pad_token_id
        self.use_mask = use_mask
        first = tokenizer.convert_tokens_to_ids(placeholder_text.split()[0])
        # the first placeholder position of each prompt: everything from start + N + 1 (after the
        # vectors and the class word) is compared with the reference from start + 1 on
        self.start = (self.ids == first).float().argmax(dim=1)  # (P,)
        device = next(text_encoder.parameters()).device
        with torch.no_grad():
            self.ref = self._encode(text_encoder, ref_ids.to(device)).detach()  # (P, T, D)
        self.prompts = with_tok

    def _encode(self, te, ids):
        mask = (ids != self.pad).long() if self.use_mask else None
        return te(ids, attention_mask=mask)[0]

    def loss(self, text_encoder, gen, batch: int) -> torch.Tensor:
        pick = torch.randint(len(self.ids), (batch,), generator=gen)
        device = self.ref.device
        states = self._encode(text_encoder, self.ids[pick].to(device))  # (B, T, D)
        T = states.shape[1]
        errs = []
        for b, p in enumerate(pick.tolist()):
            s = int(self.start[p])
            ours = states[b, s + self.n + 1:]
            ref = self.ref[p, s + 1:T - self.n]
            errs.append(((ours - ref) ** 2).mean())
        return torch.stack(errs).mean()
