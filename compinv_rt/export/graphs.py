"""The module each graph of the export contract is exported from (compinv_rt.unet.iospec.GraphIO):
the BiasedUNet wrapper, or DeepCache's full and shallow halves of it (compinv_rt.unet.deep_cache)."""

from __future__ import annotations

from compinv_rt.unet.iospec import FULL_GRAPH, PLAIN_GRAPH, SHALLOW_GRAPH, GraphIO, UNetIOSpec


def graph_modules(unet, spec: UNetIOSpec) -> list[tuple[GraphIO, object]]:
    """[(graph, module in eval mode)] for every graph of `spec` (the module's forward takes the
    graph's inputs in order and returns its outputs). `unet` is used as given (device, dtype)."""
    from compinv_rt.unet.attention import BiasedUNet

    biased = BiasedUNet(unet)
    if not spec.deep_cache:
        return [(PLAIN_GRAPH, biased.eval())]
    from compinv_rt.unet.deep_cache import CachedUNet, FullGraph, ShallowGraph

    cached = CachedUNet(biased)  # ConfigError for a UNet DeepCache cannot split
    return [(FULL_GRAPH, FullGraph(cached).eval()), (SHALLOW_GRAPH, ShallowGraph(cached).eval())]
