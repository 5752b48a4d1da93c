"""Fitting a UNet batch to an engine's batch profiles: split above the largest, pad up to a
static bucket. Padding rows are zeros and are sliced off; each row is computed independently."""

from __future__ import annotations

import torch

from compinv_rt.unet.iospec import BatchProfile


def plan_chunks(batch: int, profiles: list[BatchProfile]) -> list[tuple[int, int]]:
    """[(rows taken, batch the engine runs)] covering `batch` rows."""
    largest = max(p.max for p in profiles)
    plan, left = [], batch
    while left > 0:
        take = min(left, largest)
        fitting = [p for p in profiles if p.max >= take]
        best = min(fitting, key=lambda p: p.max)
        plan.append((take, max(take, best.min)))
        left -= take
    return plan


def run_bucketed(run, inputs: tuple[torch.Tensor, ...], profiles: list[BatchProfile]) -> torch.Tensor:
    """`run(*inputs)` on engine-sized chunks; every input has the batch on dim 0."""
    outs, start = [], 0
    for take, size in plan_chunks(inputs[0].shape[0], profiles):
        chunk = [x[start:start + take] for x in inputs]
        if size > take:
            chunk = [torch.cat([x, x.new_zeros((size - take, *x.shape[1:]))]) for x in chunk]
        outs.append(run(*chunk)[:take])
        start += take
    return outs[0] if len(outs) == 1 else torch.cat(outs)
