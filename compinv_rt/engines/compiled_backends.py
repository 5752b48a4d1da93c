"""Compiled PyTorch backends: torch.compile in-process, and AOTInductor packages from `export`."""

from __future__ import annotations

from pathlib import Path

import torch

from compinv_rt.core.errors import BackendUnavailable
from compinv_rt.engines.caching import engine_inputs
from compinv_rt.unet.attention import BiasedUNet
from compinv_rt.unet.bucketing import run_bucketed, run_bucketed_outputs
from compinv_rt.unet.iospec import FULL_GRAPH, SHALLOW_GRAPH, BatchProfile, GraphIO, UNetIOSpec


def compile_unet(module: torch.nn.Module, device: torch.device):
    """torch.compile as every compiled path here uses it (ours and bench's stock baseline alike).
    On CUDA: mode="reduce-overhead" (CUDA graphs, recorded per batch size), the fastest stock
    PyTorch path. On CPU: Inductor freezing (weights become constants prepacked for oneDNN;
    inference only). The batch dimension is dynamic (see `mark_batch_dynamic`), nothing else.
    Past torch's recompile limit dynamo would run the module eager, silently, and a benchmark would
    time eager as "compile": it raises instead (process-wide, so bench's stock baseline too)."""
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if device.type == "cuda":
        mode, options = "reduce-overhead", None
    else:
        mode, options = None, {"freezing": True}
    return torch.compile(module, mode=mode, dynamic=False, options=options)


def mark_batch_dynamic(*tensors) -> None:
    """One graph for every batch size: with static shapes each (batch, bias present/absent) was its
    own graph, and the 9th hit torch's recompile limit and ran eager, silently (partial batches,
    mixed bias, or two precisions in `bench`). maybe_: batch 1 (no guidance) may still specialize."""
    for t in tensors:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)


class CompileBackend:
    """torch.compile of the BiasedUNet wrapper (`compile_unet`); channels_last on CUDA. At most
    two graphs: with and without an attention bias (the no-bias path keeps the fused SDPA)."""

    name = "compile"

    def __init__(self, unet, device: torch.device):
        if device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
        self.module = compile_unet(BiasedUNet(unet), device)

    @torch.inference_mode()
    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        mark_batch_dynamic(sample, timestep, encoder_hidden_states, attention_bias, bias_gain)
        try:
            out = self.module(sample, timestep, encoder_hidden_states, attention_bias, bias_gain)
        except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
            raise BackendUnavailable(
                f"torch.compile hit its recompile limit ({torch._dynamo.config.recompile_limit} graphs) and "
                "would run eager from here; stopped instead (TORCH_LOGS=recompiles says why)") from exc
        return out.clone()  # CUDA-graph outputs are overwritten by the next replay


class AOTIBackend:
    """AOTInductor packages, one per batch profile; batches are split/padded to fit them. On a
    deep-cache engine the plain call runs the full graph's packages and drops the deep features.

    Each package holds its own copy of the weights (frozen into constants on CPU, where freezing
    prepacks them for oneDNN; AOTInductor has no API to read a loaded package's constants back,
    so they cannot be shared): `export --format aoti --dynamic` builds one package for every
    batch size, hence one copy."""

    name = "aoti"

    def __init__(self, engine_dir: Path, spec: UNetIOSpec, profiles: list[BatchProfile],
                 device: torch.device):
        self.spec, self.profiles, self.device = spec, profiles, device
        self.engine_dir = Path(engine_dir)
        self.runners = self._load(spec.main_graph)

    def _load(self, graph: GraphIO) -> dict:
        """The graph's package for every profile, loaded."""
        from compinv_rt.export.aoti import package_name

        # --device cuda:N: the package's weights and kernels go to that GPU (-1 = current device).
        device = self.device
        index = device.index if device.type == "cuda" and device.index is not None else -1
        return {p: torch._inductor.aoti_load_package(str(self.engine_dir / package_name(p, graph)),
                                                     device_index=index)
                for p in self.profiles}

    @staticmethod
    def _runner(runners: dict):
        """run(*inputs) on the package whose profile takes the inputs' batch."""

        def run(*inputs):
            batch = inputs[0].shape[0]
            return next(r for p, r in runners.items() if p.accepts(batch))(*inputs)

        return run

    def _run(self, *inputs):
        out = self._runner(self.runners)(*inputs)
        return out[0] if self.spec.deep_cache else out  # the full graph: (noise_pred, deep_features)

    @torch.inference_mode()
    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        inputs = engine_inputs(self.spec, self.device,
                               (sample, timestep, encoder_hidden_states, attention_bias, bias_gain))
        return run_bucketed(self._run, inputs, self.profiles).to(sample.dtype)


class CachedAOTIBackend(AOTIBackend):
    """A deep-cache engine: DeepCache's `full` and `shallow` (compinv_rt.unet.deep_cache), a
    package pair per profile, besides the plain call on the full packages."""

    def __init__(self, engine_dir: Path, spec: UNetIOSpec, profiles: list[BatchProfile],
                 device: torch.device):
        super().__init__(engine_dir, spec, profiles, device)
        self.shallow_runners = self._load(SHALLOW_GRAPH)

    @torch.inference_mode()
    def full(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        """(noise_pred, deep_features)."""
        inputs = engine_inputs(self.spec, self.device, (sample, timestep, encoder_hidden_states,
                                                        attention_bias, bias_gain), FULL_GRAPH)
        noise, deep = run_bucketed_outputs(self._runner(self.runners), inputs, self.profiles)
        return noise.to(sample.dtype), deep.to(sample.dtype)

    @torch.inference_mode()
    def shallow(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None,
                deep_features=None):
        """noise_pred from the shallow packages on `deep_features` of an earlier `full`."""
        inputs = engine_inputs(self.spec, self.device, (sample, timestep, encoder_hidden_states,
                                                        attention_bias, bias_gain, deep_features),
                               SHALLOW_GRAPH)
        return run_bucketed(self._runner(self.shallow_runners), inputs, self.profiles).to(sample.dtype)
