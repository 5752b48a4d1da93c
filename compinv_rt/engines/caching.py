"""What the engine backends share for the graphs of the export contract (compinv_rt.unet.iospec):
their inputs in the engine's dtypes, and batch splitting/padding for graphs with several outputs
(DeepCache's full graph: noise_pred and deep_features)."""

from __future__ import annotations

import torch

from compinv_rt.unet.bucketing import plan_chunks
from compinv_rt.unet.iospec import DEEP_FEATURES, PLAIN_GRAPH, BatchProfile, GraphIO, UNetIOSpec


def engine_inputs(spec: UNetIOSpec, device: torch.device, inputs: tuple, graph: GraphIO = PLAIN_GRAPH) -> tuple:
    """`inputs` in `graph`'s input order, on `device` in the spec's dtypes, contiguous. An optional
    input left out (None) gets the spec's default (zero bias, gain [1, 0]); deep_features has none."""
    batch = inputs[0].shape[0]
    out = []
    for name, t in zip(graph.inputs, inputs):
        if t is None:
            if name == DEEP_FEATURES:
                raise ValueError("the shallow path needs the deep_features of an earlier full step")
            t = spec.default_input(name, batch, device)
        out.append(t.to(device, spec.dtype(name)).contiguous())
    return tuple(out)


def run_bucketed_outputs(run, inputs: tuple[torch.Tensor, ...],
                         profiles: list[BatchProfile]) -> tuple[torch.Tensor, ...]:
    """compinv_rt.unet.bucketing.run_bucketed for a `run` that returns several outputs: the same
    chunks (split above the largest profile, zero rows padding up to a static bucket), every output
    cut back to the rows taken and joined along the batch."""
    outs, start = [], 0
    for take, size in plan_chunks(inputs[0].shape[0], profiles):
        chunk = [x[start:start + take] for x in inputs]
        if size > take:
            chunk = [torch.cat([x, x.new_zeros((size - take, *x.shape[1:]))]) for x in chunk]
        outs.append([o[:take] for o in run(*chunk)])
        start += take
    return tuple(parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*outs))
