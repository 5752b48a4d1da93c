"""A stand-in `tensorrt` module (the TensorRT 10 Python API surface the runtime uses), for CPU tests.

It behaves like the real one where the runtime's correctness depends on it:
- a context keeps the shapes and addresses it was last given; `execute_async_v3` reads the inputs
  at those addresses with those shapes and writes the output at the bound output address, so a
  stale binding gives a wrong (or stale) result, as on a GPU;
- `set_optimization_profile_async`, `set_input_shape`, `set_tensor_address` and
  `execute_async_v3` return False on bad calls (the real API's failure mode), never raise;
  `set_input_shape` checks every dimension against the profile's min/max, not only the batch;
- USER_MANAGED contexts refuse to run without device memory, or with less than the engine needs;
- execution is asynchronous: `execute_async_v3` reads its inputs when it is called (what was queued
  before it on the stream is done) but writes its output as NaN, and the result only lands at
  `flush()`: the stand-in torch.cuda.synchronize, or the stand-in for torch work ordered after it on
  the same stream (the runtime's `CudaOps.ordered`). Reading the output any other way reads NaN;
- inside a (stand-in) CUDA graph capture nothing runs: the call is recorded with the bindings it
  had, and `replay()` re-runs it with those frozen bindings. A capture is refused (False) unless
  the context already ran, and finished (flushed), a plain execution with the same bindings: the
  warm-up run TensorRT needs for its shape-dependent set-up outside the graph.

The "plan" is JSON: {"profiles": [[min, max], ...], "dtype": "FLOAT"|"HALF", "memory": bytes,
"shapes": {input: [dims after the batch dimension]}}, optionally with "inputs" and "outputs" (the
graph's tensor names; default the plain UNet's) and followed by a NUL byte and an ONNX model.
The UNet it computes: with an ONNX model, that model (onnxruntime on CPU: `build_plan` makes such a
plan from an exported graph, so a DeepCache engine's two plans compute the real UNet halves);
without, noise_pred = 2 * sample + mean(encoder_hidden_states) + bias_gain[0] *
mean(attention_bias) + timestep / 1000, per row. Either reads the device-memory block as scratch
(so it is really used).
"""

from __future__ import annotations

import ctypes
import enum
import json

import numpy as np

__version__ = "10.99.0-standin"

CALLS: list[tuple] = []  # every API call, in order, across contexts
CAPTURING: list = []  # the open graph capture, if any (set by the torch.cuda stand-in)
PENDING: list = []  # queued executions' output writes, in stream order


MAIN_STREAM, CAPTURE_STREAM = 7, 99  # the recording torch.cuda's streams (`install`)


class FakeGraph:
    """The stand-in torch.cuda.CUDAGraph: replays the executions recorded during its capture."""

    def __init__(self):
        self.work = []

    def replay(self):
        CALLS.append(("replay",))
        for w in self.work:
            w()


def install(monkeypatch):
    """Inject this module as `tensorrt` and a torch.cuda that records instead of touching a GPU
    (streams, synchronize, graph capture); start with no calls recorded. Returns the module."""
    import sys
    from contextlib import contextmanager
    from types import SimpleNamespace

    import torch

    from compinv_rt.engines.trt_backend import CudaOps

    this = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "tensorrt", this)
    CALLS.clear()
    CAPTURING.clear()
    PENDING.clear()

    @contextmanager
    def graph(g, *args, **kwargs):
        CALLS.append(("capture_begin",))
        CAPTURING.append(g)
        try:
            yield
        finally:
            CAPTURING.pop()
            CALLS.append(("capture_end",))

    def synchronize(device=None):
        CALLS.append(("synchronize",))
        flush()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(
        cuda_stream=CAPTURE_STREAM if CAPTURING else MAIN_STREAM))
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(CudaOps, "ordered", lambda self: flush())  # torch work after it on the stream
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return this


def flush() -> None:
    """The queued work finishes: outputs land, contexts that ran are warm."""
    while PENDING:
        PENDING.pop(0)()

INPUTS = ("sample", "timestep", "encoder_hidden_states", "attention_bias", "bias_gain")
OUTPUTS = ("noise_pred",)


def build_plan(onnx_path, profiles, dtype: str = "FLOAT", memory: int = 4096) -> bytes:
    """The stand-in's plan for an ONNX graph: `profiles` are polygraphy Profiles (input -> (min,
    opt, max) shapes), as the runtime's builder passes them to CreateConfig."""
    import onnx

    model = onnx.load(str(onnx_path))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    shapes = {n: list(profiles[0][n].min[1:]) for n in inputs}
    header = {"profiles": [[p[inputs[0]].min[0], p[inputs[0]].max[0]] for p in profiles], "dtype": dtype,
              "memory": memory, "shapes": shapes, "inputs": inputs, "outputs": outputs}
    return json.dumps(header).encode() + b"\0" + model.SerializeToString()


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    BF16 = 7


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Logger:
    WARNING = 2

    def __init__(self, severity=None):
        self.severity = severity


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        header, _, model = bytes(data).partition(b"\0")
        try:
            plan = json.loads(header)
        except (ValueError, UnicodeDecodeError):
            return None  # the real runtime logs an error and returns None
        return Engine(plan, model or None)


def _array(ptr: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.ctypeslib.as_array((ctypes.c_uint8 * count).from_address(ptr)).view(dtype).reshape(shape)


class Engine:
    def __init__(self, plan: dict, onnx_model: bytes | None = None):
        self.plan = plan
        self.num_optimization_profiles = len(plan["profiles"])
        self.device_memory_size_v2 = plan["memory"]
        self.contexts = 0  # a count, not references: a context must not keep itself alive here
        self.inputs = tuple(plan.get("inputs", INPUTS))
        self.outputs = tuple(plan.get("outputs", OUTPUTS))
        self.session = None
        if onnx_model is not None:
            import onnxruntime

            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = 1
            self.session = onnxruntime.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, index: int) -> str:
        return (*self.inputs, *self.outputs)[index]

    def get_tensor_dtype(self, name: str) -> DataType | None:
        if name not in (*self.inputs, *self.outputs):
            return None  # no such tensor: no dtype the runtime accepts
        return DataType.FLOAT if name == "timestep" else DataType[self.plan["dtype"]]

    def get_tensor_profile_shape(self, name: str, index: int):
        lo, hi = self.plan["profiles"][index]
        dims = tuple(self.plan["shapes"][name])
        return [(lo, *dims), ((lo + hi) // 2, *dims), (hi, *dims)]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        ctx = Context(self, strategy)
        self.contexts += 1
        CALLS.append(("create_execution_context", ctx.index, strategy.name))
        return ctx


class Context:
    def __init__(self, engine: Engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.index = engine.contexts
        self.profile = None
        self.warm: tuple | None = None  # the bindings of the last finished plain run
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None

    def set_device_memory(self, ptr: int, size: int) -> None:
        CALLS.append(("set_device_memory", self.index, ptr, size))
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        CALLS.append(("set_optimization_profile_async", self.index, index))
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(shape)
        CALLS.append(("set_input_shape", self.index, name, shape))
        if self.profile is None or name not in self.engine.inputs:
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        CALLS.append(("set_tensor_address", self.index, name, ptr))
        if name not in (*self.engine.inputs, *self.engine.outputs) or ptr == 0:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        CALLS.append(("execute_async_v3", self.index, stream, bool(CAPTURING)))
        engine = self.engine
        ready = (self.profile is not None and set(self.shapes) == set(engine.inputs)
                 and set(self.addresses) == {*engine.inputs, *engine.outputs})
        if self.strategy is ExecutionContextAllocationStrategy.USER_MANAGED:
            ready = ready and self.memory is not None and self.memory[1] >= self.engine.device_memory_size_v2
        if not ready:
            return False
        frozen = (dict(self.shapes), dict(self.addresses), self.memory)
        if CAPTURING:
            if self.warm != frozen:
                return False  # no finished warm-up run with these bindings before the capture
            CAPTURING[-1].work.append(lambda: self._compute(*frozen))
        else:
            self._compute(*frozen, warm=True)
        return True

    def _compute(self, shapes, addresses, memory, warm=False) -> None:
        dt = np.float16 if self.engine.plan["dtype"] == "HALF" else np.float32
        engine = self.engine
        x = {n: _array(addresses[n], shapes[n], np.float32 if n == "timestep" else dt) for n in engine.inputs}
        b = shapes[engine.inputs[0]][0]
        scratch = _array(memory[0], (b,), np.float32) if memory else np.empty(b, np.float32)
        if engine.session is not None:  # the real graph
            scratch[:] = 0  # through the shared block, like activations
            results = engine.session.run(list(engine.outputs), {n: v.copy() for n, v in x.items()})
            results = [r + scratch.reshape(b, *[1] * (r.ndim - 1)).astype(r.dtype) for r in results]
        else:
            gain = x["bias_gain"].astype(np.float32)[:, 0]  # the fixed-bias gain
            rows = (x["encoder_hidden_states"].reshape(b, -1).astype(np.float32).mean(1)
                    + gain * x["attention_bias"].reshape(b, -1).astype(np.float32).mean(1) + x["timestep"] / 1000)
            scratch[:] = rows  # through the shared block, like activations
            results = [(2 * x["sample"].astype(np.float32) + scratch[:, None, None, None]).astype(dt)]
        outs = []
        for name, result in zip(engine.outputs, results):
            out = _array(addresses[name], result.shape, dt)
            out[:] = np.nan  # not there yet: the kernels are queued, not done
            outs.append((out, result))

        def land():
            for out, result in outs:
                out[:] = result
            if warm:
                self.warm = (shapes, addresses, memory)

        PENDING.append(land)
