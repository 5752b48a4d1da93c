"""Packing many generation items into full UNet batches.

Items with equal keys (session.BatchKey: size, steps, sampler, guidance, spatial mode) can share a
batch; prompts, seeds, negative prompts and biases are per item.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import groupby


def pack(items: list, key, max_batch: int) -> Iterator[tuple[object, list]]:
    """Yield (key, items) batches of at most max_batch items, grouping equal keys together while
    keeping the input order within each group (so a resumed run packs the same way)."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    order: dict = {}
    for it in items:
        order.setdefault(key(it), len(order))
    ordered = sorted(items, key=lambda it: order[key(it)])  # stable: file order within a group
    for k, grouped in groupby(ordered, key=key):
        group = list(grouped)
        for start in range(0, len(group), max_batch):
            yield k, group[start:start + max_batch]
