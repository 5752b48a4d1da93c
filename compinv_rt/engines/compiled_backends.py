"""Compiled PyTorch backends: torch.compile in-process, and AOTInductor packages from `export`."""

from __future__ import annotations

from pathlib import Path

import torch

from compinv_rt.core.errors import BackendUnavailable
from compinv_rt.unet.attention import BiasedUNet
from compinv_rt.unet.bucketing import run_bucketed
from compinv_rt.unet.iospec import INPUTS, BatchProfile, UNetIOSpec


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
    """AOTInductor packages, one per batch profile; batches are split/padded to fit them.

    Each package holds its own copy of the weights (frozen into constants on CPU, where freezing
    prepacks them for oneDNN; AOTInductor has no API to read a loaded package's constants back,
    so they cannot be shared): `export --format aoti --dynamic` builds one package for every
    batch size, hence one copy."""

    name = "aoti"

    def __init__(self, engine_dir: Path, spec: UNetIOSpec, profiles: list[BatchProfile],
                 device: torch.device):
        from compinv_rt.export.aoti import package_name

        self.spec, self.profiles, self.device = spec, profiles, device
        # --device cuda:N: the package's weights and kernels go to that GPU (-1 = current device).
        index = device.index if device.type == "cuda" and device.index is not None else -1
        self.runners = {
            p: torch._inductor.aoti_load_package(str(Path(engine_dir) / package_name(p)),
                                                 device_index=index)
            for p in profiles
        }

    def _run(self, *inputs):
        batch = inputs[0].shape[0]
        runner = next(r for p, r in self.runners.items() if p.accepts(batch))
        return runner(*inputs)

    @torch.inference_mode()
    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        n = sample.shape[0]
        if attention_bias is None:
            attention_bias = self.spec.default_input("attention_bias", n, self.device)
        if bias_gain is None:
            bias_gain = self.spec.default_input("bias_gain", n, self.device)
        inputs = tuple(t.to(self.device, self.spec.dtype(name)).contiguous() for name, t in zip(
            INPUTS, (sample, timestep, encoder_hidden_states, attention_bias, bias_gain)))
        return run_bucketed(self._run, inputs, self.profiles).to(sample.dtype)
