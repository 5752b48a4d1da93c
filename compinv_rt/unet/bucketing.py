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
    return run_bucketed_outputs(lambda *chunk: (run(*chunk),), inputs, profiles)[0]


def run_bucketed_outputs(run, inputs: tuple[torch.Tensor, ...],
                         profiles: list[BatchProfile]) -> tuple[torch.Tensor, ...]:
    """run_bucketed for a `run` that returns a tuple of outputs (DeepCache's full graph: noise_pred
    and deep_features): every output cut back to the rows taken and joined along the batch."""
    outs, start = [], 0
    for take, size in plan_chunks(inputs[0].shape[0], profiles):
        chunk = [x[start:start + take] for x in inputs]
        if size > take:
            chunk = [torch.cat([x, x.new_zeros((size - take, *x.shape[1:]))]) for x in chunk]
        outs.append([o[:take] for o in run(*chunk)])
        start += take
    return tuple(parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*outs))
