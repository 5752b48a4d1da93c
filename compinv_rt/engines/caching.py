"""What the engine backends share for the graphs of the export contract (compinv_rt.unet.iospec):
their inputs in the engine's dtypes (batch splitting/padding is compinv_rt.unet.bucketing's)."""

from __future__ import annotations

import torch

from compinv_rt.unet.iospec import DEEP_FEATURES, PLAIN_GRAPH, GraphIO, UNetIOSpec


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
