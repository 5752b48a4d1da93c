"""TensorRT backend: a deserialized plan, torch tensors bound by address, CUDA graphs for static
shapes. One execution context per optimization profile (batch bucket).

Written against TensorRT 10's Python API (set_input_shape / set_tensor_address /
execute_async_v3); TensorRT cannot be installed on the development machines, so this module is
exercised only by the tests marked `tensorrt`, on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import torch

from compinv_rt.errors import EngineMismatch
from compinv_rt.export.iospec import INPUTS, OUTPUTS, BatchProfile, UNetIOSpec
from compinv_rt.export.tensorrt import PLAN_FILE
from compinv_rt.runtime.bucketing import run_bucketed


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, engine_dir: Path, spec: UNetIOSpec, profiles: list[BatchProfile],
                 device: torch.device, cuda_graphs: bool = True):
        import tensorrt as trt

        self.spec, self.profiles, self.device = spec, profiles, device
        self.cuda_graphs = cuda_graphs
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((Path(engine_dir) / PLAN_FILE).read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT could not deserialize {engine_dir}/{PLAN_FILE}")
        # All contexts share one device-memory block: only one runs at a time.
        self._contexts = {}
        stream = torch.cuda.current_stream(device).cuda_stream
        for index, profile in enumerate(profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(index, stream)
            self._contexts[profile] = ctx
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _bind(self, batch: int):
        """Static buffers for one batch size, bound once; CUDA graphs replay on these addresses."""
        profile = next(p for p in self.profiles if p.accepts(batch))
        ctx = self._contexts[profile]
        shapes = self.spec.shapes(batch)
        bufs = {n: torch.empty(shapes[n], dtype=self.spec.dtype(n), device=self.device)
                for n in INPUTS + OUTPUTS}
        for n in INPUTS:
            ctx.set_input_shape(n, shapes[n])
        for n, t in bufs.items():
            ctx.set_tensor_address(n, t.data_ptr())
        self._buffers[batch] = bufs
        return ctx, profile, bufs

    def _run(self, *inputs):
        batch = inputs[0].shape[0]
        if batch in self._buffers:
            profile = next(p for p in self.profiles if p.accepts(batch))
            ctx, bufs = self._contexts[profile], self._buffers[batch]
        else:
            ctx, profile, bufs = self._bind(batch)
        for n, x in zip(INPUTS, inputs):
            bufs[n].copy_(x)
        stream = torch.cuda.current_stream(self.device)
        if self.cuda_graphs and profile.static:
            graph = self._graphs.get(batch)
            if graph is None:
                ctx.execute_async_v3(stream.cuda_stream)  # warm-up outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream)
                self._graphs[batch] = graph
            graph.replay()
        elif not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return bufs[OUTPUTS[0]].clone()

    @torch.inference_mode()
    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        if attention_bias is None:
            attention_bias = self.spec.default_input("attention_bias", sample.shape[0], self.device)
        if bias_gain is None:
            bias_gain = self.spec.default_input("bias_gain", sample.shape[0], self.device)
        inputs = tuple(t.to(self.device, self.spec.dtype(n)).contiguous()
                       for n, t in zip(INPUTS, (sample, timestep, encoder_hidden_states, attention_bias,
                                                bias_gain)))
        return run_bucketed(self._run, inputs, self.profiles).to(sample.dtype)
