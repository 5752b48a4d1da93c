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
"shapes": {input: [dims after the batch dimension]}}.
The UNet it computes: noise_pred = 2 * sample + mean(encoder_hidden_states) + bias_gain[0] *
mean(attention_bias) + timestep / 1000, per row, reading the device-memory block as scratch (so it is really used).
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


def flush() -> None:
    """The queued work finishes: outputs land, contexts that ran are warm."""
    while PENDING:
        PENDING.pop(0)()

INPUTS = ("sample", "timestep", "encoder_hidden_states", "attention_bias", "bias_gain")


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
        try:
            plan = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None  # the real runtime logs an error and returns None
        return Engine(plan)


def _array(ptr: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.ctypeslib.as_array((ctypes.c_uint8 * count).from_address(ptr)).view(dtype).reshape(shape)


class Engine:
    def __init__(self, plan: dict):
        self.plan = plan
        self.num_optimization_profiles = len(plan["profiles"])
        self.device_memory_size_v2 = plan["memory"]
        self.contexts = 0  # a count, not references: a context must not keep itself alive here

    def get_tensor_dtype(self, name: str) -> DataType:
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
        if self.profile is None or name not in INPUTS:
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        CALLS.append(("set_tensor_address", self.index, name, ptr))
        if name not in (*INPUTS, "noise_pred") or ptr == 0:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        CALLS.append(("execute_async_v3", self.index, stream, bool(CAPTURING)))
        ready = (self.profile is not None and set(self.shapes) == set(INPUTS)
                 and set(self.addresses) == {*INPUTS, "noise_pred"})
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
        x = {n: _array(addresses[n], shapes[n], np.float32 if n == "timestep" else dt) for n in INPUTS}
        b = shapes["sample"][0]
        gain = x["bias_gain"].astype(np.float32)[:, 0]  # the fixed-bias gain
        rows = (x["encoder_hidden_states"].reshape(b, -1).astype(np.float32).mean(1)
                + gain * x["attention_bias"].reshape(b, -1).astype(np.float32).mean(1) + x["timestep"] / 1000)
        scratch = _array(memory[0], (b,), np.float32) if memory else np.empty(b, np.float32)
        scratch[:] = rows  # through the shared block, like activations
        result = (2 * x["sample"].astype(np.float32) + scratch[:, None, None, None]).astype(dt)
        out = _array(addresses["noise_pred"], shapes["sample"], dt)
        out[:] = np.nan  # not there yet: the kernels are queued, not done

        def land():
            out[:] = result
            if warm:
                self.warm = (shapes, addresses, memory)

        PENDING.append(land)
