"""Where a learned embedding sits relative to the real vocabulary (the paper's OOD analysis).

For each vector: its norm and norm percentile within a vocabulary (by default every whole real
word; for a model trained on a small world, its metadata's vocabulary), the nearest real word and
the distance to it, and the distance to the anchor target and to each anchor word. For scale, the
typical nearest-neighbour distance between vocabulary words is reported too.
"""

from __future__ import annotations

import torch

from compinv_rt.train.anchors import real_word_ids, word_of


def vocabulary_ids(tokenizer, words: list[str] | None = None) -> list[int]:
    """Ids of `words` that are single tokens (others skipped), or every real word."""
    if not words:
        return real_word_ids(tokenizer)
    out = []
    for w in words:
        pieces = tokenizer.tokenize(w)
        if len(pieces) == 1:
            out.append(int(tokenizer.convert_tokens_to_ids(pieces[0])))
    return sorted(set(out))


def analyze(table: torch.Tensor, tokenizer, vectors: torch.Tensor, target: torch.Tensor | None,
            anchor_ids: list[int], vocab_ids: list[int], sample: int = 256, seed: int = 0) -> dict:
    table = table.detach().float()
    vocab = table[torch.tensor(vocab_ids)]  # (V, D)
    norms = vocab.norm(dim=-1)
    # typical distance from a vocabulary word to its nearest other word (sampled when large)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(vocab_ids), generator=g)[:sample]
    d = torch.cdist(vocab[pick], vocab)  # (s, V)
    d[torch.arange(len(pick)), pick] = float("inf")
    nn_typical = float(d.min(-1).values.median())
    per_vector = []
    for i, v in enumerate(vectors.detach().float()):
        dist = torch.cdist(v[None], vocab)[0]
        j = int(dist.argmin())
        entry = {
            "vector": i,
            "norm": round(float(v.norm()), 5),
            "norm_percentile": round(100.0 * float((norms < v.norm()).float().mean()), 2),
            "nearest_word": word_of(tokenizer, vocab_ids[j]),
            "nearest_word_distance": round(float(dist[j]), 5),
            "nearest_word_cosine": round(float(torch.nn.functional.cosine_similarity(
                v, vocab[j], dim=0)), 5),
            "anchor_distances": {word_of(tokenizer, a): round(float((v - table[a]).norm()), 5)
                                 for a in anchor_ids},
        }
        if target is not None:
            entry["target_distance"] = round(float((v - target.float()).norm()), 5)
        per_vector.append(entry)
    return {
        "vocabulary_size": len(vocab_ids),
        "vocabulary_norm_median": round(float(norms.median()), 5),
        "vocabulary_norm_p95": round(float(norms.quantile(0.95)), 5),
        "vocabulary_nn_distance_median": round(nn_typical, 5),
        "anchor_norms": {word_of(tokenizer, a): round(float(table[a].norm()), 5) for a in anchor_ids},
        "vectors": per_vector,
    }
