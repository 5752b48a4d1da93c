"""Placeholder tokens: validation, the diffusers multi-vector naming, prompt expansion, and the
embedding wrapper that trains only the placeholder rows.

Naming follows diffusers' `load_textual_inversion`: a token with N vectors is the N tokens
`tok, tok_1, ..., tok_{N-1}` and a prompt's `tok` expands to all of them, so every vector is in
every prompt (the reference code's bug: only the first vector ever saw a gradient).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from compinv_rt.core.errors import ConfigError


def placeholder_tokens(token: str, vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def in_vocabulary(tokenizer, token: str, vocab=None, added=None) -> bool:
    """`vocab`/`added`: the tokenizer's, when the caller checks many tokens (49k entries)."""
    vocab = tokenizer.get_vocab() if vocab is None else vocab
    t = token.lower()
    if added is None:
        added = {k.lower() for k in getattr(tokenizer, "added_tokens_encoder", {})}
    return token in vocab or t in vocab or f"{t}</w>" in vocab or t in added


def check_new_token(tokenizer, token: str, vectors: int = 1) -> None:
    vocab = tokenizer.get_vocab()
    added = {k.lower() for k in getattr(tokenizer, "added_tokens_encoder", {})}
    for t in placeholder_tokens(token, vectors):
        if in_vocabulary(tokenizer, t, vocab, added):
            raise ConfigError(
                f"token {t!r} is already in the tokenizer's vocabulary; pick a new name such as "
                f"'<my-{token.strip('<>').lower()}>'")


def single_token_id(tokenizer, word: str, what: str) -> int:
    """The id of a real vocabulary word that the tokenizer keeps as one token."""
    pieces = tokenizer.tokenize(word)
    added = {k.lower() for k in getattr(tokenizer, "added_tokens_encoder", {})}
    if len(pieces) != 1 or pieces[0].lower() in added:
        how = f"it splits into {' + '.join(pieces)}" if len(pieces) > 1 else "it is not a word"
        raise ConfigError(f"unknown {what} {word!r}: not a single token of this model's "
                          f"tokenizer ({how})")
    return int(tokenizer.convert_tokens_to_ids(pieces[0]))


def expand_prompt(prompt: str, token: str, vectors: int) -> str:
    """'a <tok> heart' -> 'a <tok> <tok>_1 <tok>_2 heart' (case-insensitive, like the tokenizer)."""
    if vectors <= 1:
        return prompt
    t = re.escape(token)  # not a `tok_1` itself, nor a `tok` already followed by its `tok_1`
    pattern = re.compile(rf"{t}(?!_\d)(?!\s+{t}_1(?!\d))", re.IGNORECASE)
    return pattern.sub(" ".join(placeholder_tokens(token, vectors)), prompt)


def add_placeholders(tokenizer, text_encoder, token: str, vectors: int) -> list[int]:
    """Add the tokens and grow the embedding table; returns their (contiguous) ids."""
    names = placeholder_tokens(token, vectors)
    check_new_token(tokenizer, token, vectors)
    tokenizer.add_tokens(names)
    ids = [int(tokenizer.convert_tokens_to_ids(n)) for n in names]
    if ids != list(range(ids[0], ids[0] + vectors)):
        raise ConfigError(f"tokenizer gave non-contiguous ids {ids} to {names}")
    table = text_encoder.get_input_embeddings().weight
    if table.shape[0] < ids[-1] + 1:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return ids


class PlaceholderEmbedding(nn.Module):
    """Token embedding lookup with trainable rows for `first_id .. first_id+N-1`.

    The frozen table is looked up as usual; placeholder positions take `vectors` instead. Only the
    (N, D) parameter receives a gradient: no dense table gradient, no optimizer state for 49k rows,
    and the table itself is never written during training.
    """

    def __init__(self, base: nn.Embedding, first_id: int, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.vectors = nn.Parameter(vectors.clone())  # (N, D)

    @property
    def weight(self):  # what get_input_embeddings().weight users expect
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        out = F.embedding(ids, self.base.weight)
        n = self.vectors.shape[0]
        sel = (ids >= self.first_id) & (ids < self.first_id + n)  # (B, T)
        if not bool(sel.any()):
            return out
        local = (ids - self.first_id).clamp(0, n - 1)
        return torch.where(sel[..., None], self.vectors[local].to(out.dtype), out)


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Swap a submodule by identity (the attribute path differs across transformers versions)."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise RuntimeError("the text encoder's token embedding was not found among its modules")


def install(text_encoder, first_id: int, init: torch.Tensor) -> PlaceholderEmbedding:
    base = text_encoder.get_input_embeddings()
    wrapper = PlaceholderEmbedding(base, first_id, init)
    _replace_module(text_encoder, base, wrapper)
    return wrapper


def uninstall(text_encoder, wrapper: PlaceholderEmbedding) -> None:
    """Put the plain table back and write the trained rows into it (only those rows change)."""
    _replace_module(text_encoder, wrapper, wrapper.base)
    n = wrapper.vectors.shape[0]
    with torch.no_grad():
        wrapper.base.weight[wrapper.first_id:wrapper.first_id + n] = wrapper.vectors.detach().to(
            wrapper.base.weight.dtype)
