"""TensorRT backend: a deserialized plan, torch tensors bound by address, CUDA graphs for static
profiles.

Written against TensorRT 10.1+'s Python API (set_input_shape / set_tensor_address /
execute_async_v3, USER_MANAGED device memory). One execution context per optimization profile
(batch bucket); all contexts share ONE device-memory block of `device_memory_size_v2` bytes (the
largest any profile needs), since only one runs at a time on one stream: N profiles cost the
activation memory of one, not N.

A context remembers the last shapes and addresses it was given, so every call checks that the
context is bound to this call's batch and rebinds if not: with a dynamic profile, batches
2 -> 4 -> 2 run the third call on batch-2 buffers, not on the batch-4 bindings. Every boolean
result of TensorRT is checked. TensorRT is imported lazily and every CUDA call goes through
`CudaOps` (torch.cuda), so tests/test_trt_runtime.py runs all of this logic on CPU with a stand-in
`tensorrt` module and a recording torch.cuda.

Each graph of the engine (compinv_rt.unet.iospec.GraphIO) is its own plan (`_Plan`): the plain
one, or with deep_cache DeepCache's full and shallow ones (`CachedTensorRTBackend`), whose
contexts all share the one device-memory block (they never run at the same time either).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from compinv_rt.core.errors import EngineMismatch
from compinv_rt.engines.caching import engine_inputs
from compinv_rt.export.tensorrt import plan_file
from compinv_rt.unet.bucketing import run_bucketed, run_bucketed_outputs
from compinv_rt.unet.iospec import FULL_GRAPH, OUTPUTS, SHALLOW_GRAPH, BatchProfile, GraphIO, UNetIOSpec


class CudaOps:
    """The CUDA calls the backend makes, in one place."""

    def __init__(self, device: torch.device):
        self.device = device

    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def ordered(self) -> None:
        """Where torch work queued after the engine's on the same stream reads its results: a no-op
        on a GPU (stream order does it); the CPU tests' stand-in finishes the queued work here."""

    def guard(self):
        """Make this backend's GPU current: TensorRT deserializes, allocates and runs on the current
        device, not on the one the tensors name, so --device cuda:1 ran its engine on cuda:0."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def capture(self):
        """Capture a CUDA graph; inside, `stream()` is the capture stream. Yields the graph."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yield graph


def _torch_dtypes(trt) -> dict:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table


class _Plan:
    """One deserialized plan (one graph of the contract): an execution context per optimization
    profile, IO buffers per batch, CUDA graphs per static batch."""

    def __init__(self, engine, graph: GraphIO, spec: UNetIOSpec, profiles: list[BatchProfile],
                 cuda: CudaOps, cuda_graphs: bool):
        self.engine, self.graph, self.spec, self.profiles = engine, graph, spec, profiles
        self.cuda, self.cuda_graphs = cuda, cuda_graphs
        self.file = plan_file(graph)
        # The graph's inputs the plan has: the ONNX exporter drops inputs a graph never reads (the
        # embedded model's shallow path has no cross-attention: no text, bias or gain input).
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        self.inputs = tuple(n for n in graph.inputs if n in names)
        self._unexpected = sorted(names - set(graph.inputs + graph.outputs))
        self._missing = [n for n in (graph.inputs[0], *graph.outputs) if n not in names]
        self._contexts: dict[BatchProfile, Any] = {}  # tensorrt.IExecutionContext
        self._bound: dict[BatchProfile, int] = {}  # context -> batch its shapes/addresses are for
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._graphs: dict[int, Any] = {}  # torch.cuda.CUDAGraph

    def check(self, trt, engine_dir) -> None:
        """The plan must be the engine the manifest describes: profiles and IO dtypes."""
        engine, where = self.engine, f"{engine_dir}/{self.file}"
        if self._unexpected or self._missing:
            raise EngineMismatch(f"{where} is not the {self.graph.stem} graph of this contract (tensors "
                                 f"{', '.join(self._unexpected)} unexpected, {', '.join(self._missing)} "
                                 "missing); re-export it")
        if engine.num_optimization_profiles != len(self.profiles):
            raise EngineMismatch(f"{where} has {engine.num_optimization_profiles} "
                                 f"optimization profiles, its manifest lists {len(self.profiles)}")
        dtypes = _torch_dtypes(trt)
        for name in self.inputs + self.graph.outputs:
            got = dtypes.get(engine.get_tensor_dtype(name))
            if got != self.spec.dtype(name):
                raise EngineMismatch(f"{where}: tensor {name} is "
                                     f"{engine.get_tensor_dtype(name)}, the manifest says {self.spec.dtype(name)}")
        for index, profile in enumerate(self.profiles):
            lo, _, hi = engine.get_tensor_profile_shape(self.inputs[0], index)
            if (lo[0], hi[0]) != (profile.min, profile.max):
                raise EngineMismatch(f"{where}: profile {index} takes batches "
                                     f"{lo[0]}-{hi[0]}, the manifest says {profile.min}-{profile.max}")
            for name in self.inputs:  # every other dimension is fixed by the spec (size, text length)
                lo, _, hi = engine.get_tensor_profile_shape(name, index)
                want = self.spec.shapes(profile.min)[name][1:]
                if tuple(lo)[1:] != want or tuple(hi)[1:] != want:
                    raise EngineMismatch(f"{where}: input {name} is {tuple(lo)[1:]} per "
                                         f"sample in profile {index}, the manifest says {want}")

    def open_contexts(self, trt, memory: torch.Tensor) -> None:
        """One USER_MANAGED context per profile, all on the shared block `memory`."""
        stream = self.cuda.stream()
        for index, profile in enumerate(self.profiles):
            ctx = self.engine.create_execution_context(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise RuntimeError(f"TensorRT could not create an execution context for profile {index}")
            ctx.set_device_memory(memory.data_ptr(), memory.numel())
            _ok(ctx.set_optimization_profile_async(index, stream),
                f"set_optimization_profile_async({index})")
            self._contexts[profile] = ctx

    def _buffers_for(self, batch: int) -> dict[str, torch.Tensor]:
        bufs = self._buffers.get(batch)
        if bufs is None:
            shapes = self.spec.shapes(batch)
            bufs = {n: torch.empty(shapes[n], dtype=self.spec.dtype(n), device=self.cuda.device)
                    for n in self.inputs + self.graph.outputs}
            self._buffers[batch] = bufs
        return bufs

    def _context_for(self, batch: int):
        """The profile's context, bound (shapes + addresses) to this batch's buffers."""
        profile = next(p for p in self.profiles if p.accepts(batch))
        ctx, bufs = self._contexts[profile], self._buffers_for(batch)
        if self._bound.get(profile) != batch:
            self._bound.pop(profile, None)  # a failure below leaves it unbound, not half-bound
            for n in self.inputs:
                shape = tuple(bufs[n].shape)
                _ok(ctx.set_input_shape(n, shape), f"set_input_shape({n}, {shape})")
            for n, t in bufs.items():
                _ok(ctx.set_tensor_address(n, t.data_ptr()), f"set_tensor_address({n})")
            self._bound[profile] = batch
        return ctx, profile, bufs

    def _execute(self, ctx) -> None:
        _ok(ctx.execute_async_v3(self.cuda.stream()), "execute_async_v3")

    def run(self, *inputs) -> dict[str, torch.Tensor]:
        """Run on one engine-sized batch; returns the batch's IO buffers (outputs valid until the
        next run at this batch: the caller clones what it keeps)."""
        batch = inputs[0].shape[0]
        ctx, profile, bufs = self._context_for(batch)
        for n, x in zip(self.graph.inputs, inputs):
            if n in bufs:
                bufs[n].copy_(x)
        if self.cuda_graphs and profile.static:
            # A graph replays fixed addresses and shapes: only static profiles, whose context is
            # bound to one batch forever. Order: bind, one plain run (TensorRT's shape-dependent
            # set-up must not be captured, and it gives this call's output), sync, then capture;
            # later calls replay.
            graph = self._graphs.get(batch)
            if graph is None:
                self._execute(ctx)
                self.cuda.synchronize()
                with self.cuda.capture() as graph:
                    self._execute(ctx)
                self._graphs[batch] = graph
            else:
                graph.replay()
        else:
            self._execute(ctx)
        self.cuda.ordered()
        return bufs

    def noise(self, *inputs) -> torch.Tensor:
        return self.run(*inputs)[OUTPUTS[0]].clone()

    def outputs(self, *inputs) -> tuple[torch.Tensor, ...]:
        bufs = self.run(*inputs)
        return tuple(bufs[n].clone() for n in self.graph.outputs)

    def close(self) -> None:
        """Graphs, then contexts, then the engine (TensorRT's order), then the IO buffers."""
        self._graphs.clear()
        self._contexts.clear()
        self._bound.clear()
        self.engine = None
        self._buffers.clear()


def _ok(result, what: str) -> None:
    if not result:
        raise RuntimeError(f"TensorRT {what} failed (see the TensorRT log above)")


class TensorRTBackend:
    """The plain UNet call on the engine's main graph (on a deep-cache engine: the full graph,
    whose deep features are dropped)."""

    name = "tensorrt"

    def __init__(self, engine_dir: Path, spec: UNetIOSpec, profiles: list[BatchProfile],
                 device: torch.device, cuda_graphs: bool = True):
        self.spec, self.profiles, self.device = spec, list(profiles), device
        self.cuda_graphs = cuda_graphs
        self.cuda = CudaOps(device)
        with self.cuda.guard():
            self._open(engine_dir)

    def _graphs_to_open(self) -> tuple[GraphIO, ...]:
        return (self.spec.main_graph,)

    def _open(self, engine_dir: Path) -> None:
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        plans = []
        for graph in self._graphs_to_open():
            path = Path(engine_dir) / plan_file(graph)
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineMismatch(f"TensorRT could not deserialize {path}")
            plan = _Plan(engine, graph, self.spec, self.profiles, self.cuda, self.cuda_graphs)
            plan.check(trt, engine_dir)
            plans.append(plan)
        # One scratch block for every context of every plan (USER_MANAGED): sized for the largest.
        size = max(int(p.engine.device_memory_size_v2) for p in plans)
        memory = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.device_memory: torch.Tensor | None = memory
        for plan in plans:
            plan.open_contexts(trt, memory)
        self.cuda.synchronize()  # the profile switch is asynchronous
        self.plans: dict[GraphIO, _Plan] = {p.graph: p for p in plans}
        self.plan: _Plan | None = plans[0]

    def close(self) -> None:
        """Free the engine's GPU memory now (graphs, contexts, engine, scratch block, IO buffers), in
        the order TensorRT needs (contexts before their engine), instead of whenever GC gets to it."""
        with self.cuda.guard():
            for plan in self.plans.values():
                plan.close()
            self.plans.clear()
            self.plan = None
            self.device_memory = None
            self.cuda.empty_cache()

    def _plan(self, graph: GraphIO) -> _Plan:
        if self.plan is None:
            raise RuntimeError("this TensorRT backend was closed")
        return self.plans[graph]

    @torch.inference_mode()
    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        plan = self._plan(self.spec.main_graph)
        with self.cuda.guard():
            inputs = engine_inputs(self.spec, self.device, (sample, timestep, encoder_hidden_states,
                                                            attention_bias, bias_gain))
            return run_bucketed(plan.noise, inputs, self.profiles).to(sample.dtype)


class CachedTensorRTBackend(TensorRTBackend):
    """A deep-cache engine: DeepCache's `full` and `shallow` (compinv_rt.unet.deep_cache), two
    plans, besides the plain call on the full plan."""

    def _graphs_to_open(self) -> tuple[GraphIO, ...]:
        return self.spec.graphs()

    @torch.inference_mode()
    def full(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        """(noise_pred, deep_features)."""
        plan = self._plan(FULL_GRAPH)
        with self.cuda.guard():
            inputs = engine_inputs(self.spec, self.device, (sample, timestep, encoder_hidden_states,
                                                            attention_bias, bias_gain), FULL_GRAPH)
            noise, deep = run_bucketed_outputs(plan.outputs, inputs, self.profiles)
            return noise.to(sample.dtype), deep.to(sample.dtype)

    @torch.inference_mode()
    def shallow(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None,
                deep_features=None):
        """noise_pred from the shallow plan on `deep_features` of an earlier `full`."""
        plan = self._plan(SHALLOW_GRAPH)
        with self.cuda.guard():
            inputs = engine_inputs(self.spec, self.device, (sample, timestep, encoder_hidden_states,
                                                            attention_bias, bias_gain, deep_features),
                                   SHALLOW_GRAPH)
            return run_bucketed(plan.noise, inputs, self.profiles).to(sample.dtype)
