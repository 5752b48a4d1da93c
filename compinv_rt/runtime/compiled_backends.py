"""Compiled PyTorch backends: torch.compile in-process, and AOTInductor packages from `export`."""

from __future__ import annotations

from pathlib import Path

import torch

from compinv_rt.export.iospec import INPUTS, BatchProfile, UNetIOSpec
from compinv_rt.runtime.bucketing import run_bucketed
from compinv_rt.spatial.attention import BiasedUNet


class CompileBackend:
    """torch.compile of the BiasedUNet wrapper. On CUDA: channels_last and mode="reduce-overhead"
    (CUDA graphs), the fastest stock PyTorch path. On CPU: Inductor freezing (weights become
    constants prepacked for oneDNN; inference only). Compiles on first call per shape."""

    name = "compile"

    def __init__(self, unet, device: torch.device):
        if device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
            mode, options = "reduce-overhead", None
        else:
            mode, options = None, {"freezing": True}
        self.module = torch.compile(BiasedUNet(unet), mode=mode, dynamic=False, options=options)

    @torch.inference_mode()
    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        out = self.module(sample, timestep, encoder_hidden_states, attention_bias, bias_gain)
        return out.clone()  # CUDA-graph outputs are overwritten by the next replay


class AOTIBackend:
    """AOTInductor packages, one per batch profile; batches are split/padded to fit them."""

    name = "aoti"

    def __init__(self, engine_dir: Path, spec: UNetIOSpec, profiles: list[BatchProfile],
                 device: torch.device):
        from compinv_rt.export.aoti import package_name

        self.spec, self.profiles, self.device = spec, profiles, device
        self.runners = {
            p: torch._inductor.aoti_load_package(str(Path(engine_dir) / package_name(p)))
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
