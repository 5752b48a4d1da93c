"""ONNX Runtime backend: the exported ONNX UNet, with IO binding straight to torch tensors, on the
CPU provider or (onnxruntime-gpu, the `[gpu]` extra) the TensorRT / CUDA providers."""

from __future__ import annotations

from pathlib import Path

import torch

from compinv_rt.core.errors import BackendUnavailable
from compinv_rt.export.onnx_export import onnx_file
from compinv_rt.unet.iospec import FULL_GRAPH, SHALLOW_GRAPH, GraphIO, UNetIOSpec


def requested_providers(device: torch.device, available: list[str], engine_dir: Path | None = None) -> list:
    """The providers to ask for, best first: on CUDA, TensorRT (when onnxruntime-gpu has it) then
    CUDA; on CPU, the CPU provider only. Raises before anything is built or exported when
    onnxruntime cannot serve the device at all (e.g. the CPU wheel for --device cuda)."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(
            f"onnxruntime here has no CUDA provider (has {', '.join(available)}); install the GPU "
            "build (pip install 'compinv-rt[gpu]', which replaces onnxruntime by onnxruntime-gpu) "
            "or use --device cpu")
    index = device.index or 0
    providers: list = []
    if "TensorrtExecutionProvider" in available:
        # No trt_fp16_enable: the graph's own dtypes (the engine's precision) are kept.
        trt: dict = {"device_id": index}
        if engine_dir is not None:  # its engines are cached beside the ONNX file
            trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(Path(engine_dir) / "ort-trt"))
        providers.append(("TensorrtExecutionProvider", trt))
    providers.append(("CUDAExecutionProvider", {"device_id": index}))
    return providers


def check_device(device: torch.device) -> None:
    """Cheap check before an export: can onnxruntime here serve this device at all?"""
    import onnxruntime as ort

    requested_providers(device, ort.get_available_providers())


class OnnxRuntimeBackend:
    """`provider` is the execution provider the session actually runs on (read back from the
    session, not assumed): a CUDA provider that fails to load (missing cuDNN, driver mismatch)
    makes onnxruntime fall back to CPU with a log line only; here that is an error. On a
    deep-cache engine the plain call runs the full graph (unet.onnx) and drops the deep features."""

    name = "onnxruntime"

    def __init__(self, engine_dir: Path, spec: UNetIOSpec, device: torch.device, threads: int = 0):
        import numpy as np
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # errors only: its graph warnings are noise
        self.spec, self.device, self.engine_dir = spec, device, Path(engine_dir)
        if spec.precision.value == "bf16":
            raise BackendUnavailable("the onnxruntime backend runs fp32 or fp16 engines, not bf16")
        self._threads = threads
        # The inputs each session's graph has: the exporter drops inputs a graph never reads (the
        # embedded model's shallow path has no cross-attention: no text, bias or gain input).
        self._reads: dict[str, set[str]] = {}  # graph stem -> its inputs
        self.session = self._session(spec.main_graph)
        self.provider = self.session.get_providers()[0]
        self._np_types = {torch.float32: np.float32, torch.float16: np.float16}
        self._defaults: dict[tuple[str, int], torch.Tensor] = {}

    def _session(self, graph: GraphIO):
        import onnxruntime as ort

        providers = requested_providers(self.device, ort.get_available_providers(), self.engine_dir)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Same thread budget as torch (OMP_NUM_THREADS / torch.set_num_threads), one knob for all.
        opts.intra_op_num_threads = self._threads or torch.get_num_threads()
        session = ort.InferenceSession(str(self.engine_dir / onnx_file(graph)), opts, providers=providers)
        self._reads[graph.stem] = {i.name for i in session.get_inputs()}
        active = session.get_providers()
        wanted = [p[0] if isinstance(p, tuple) else p for p in providers]
        if active[0] not in wanted:
            raise BackendUnavailable(
                f"onnxruntime could not start {' or '.join(wanted)} on {self.device} (the session runs on "
                f"{', '.join(active)}; see onnxruntime's log for why, e.g. a missing CUDA/cuDNN "
                "library); refusing to fall back to the CPU silently")
        return session

    def _or_default(self, name, batch, given):
        """The IO spec's default for an optional input left out (zero bias, gain [1, 0]), cached."""
        if given is not None:
            return given
        if (name, batch) not in self._defaults:
            self._defaults[(name, batch)] = self.spec.default_input(name, batch, self.device)
        return self._defaults[(name, batch)]

    def _feeds(self, sample, timestep, encoder_hidden_states, attention_bias, bias_gain) -> tuple:
        n = sample.shape[0]
        return (sample, timestep, encoder_hidden_states, self._or_default("attention_bias", n, attention_bias),
                self._or_default("bias_gain", n, bias_gain))

    def _run(self, session, graph: GraphIO, feeds: tuple) -> tuple[torch.Tensor, ...]:
        """One run of `graph` with IO binding: its outputs, in the engine's dtypes."""
        binding = session.io_binding()
        dev, idx = self.device.type, self.device.index or 0
        keep = []  # contiguous copies must outlive run_with_iobinding
        reads = self._reads[graph.stem]
        for name, t in zip(graph.inputs, feeds):
            if name not in reads:
                continue
            t = t.to(device=self.device, dtype=self.spec.dtype(name)).contiguous()
            keep.append(t)
            binding.bind_input(name, dev, idx, self._np_types[t.dtype], tuple(t.shape), t.data_ptr())
        shapes = self.spec.shapes(feeds[0].shape[0])
        outs = tuple(torch.empty(shapes[name], dtype=self.spec.dtype(name), device=self.device)
                     for name in graph.outputs)
        for name, out in zip(graph.outputs, outs):
            binding.bind_output(name, dev, idx, self._np_types[out.dtype], tuple(out.shape), out.data_ptr())
        if self.device.type == "cuda":
            # The inputs were written on torch's stream; onnxruntime runs on its own stream and
            # would read them before those kernels finished. (Its output is synchronized: ORT
            # waits for its stream before run_with_iobinding returns.)
            torch.cuda.current_stream(self.device).synchronize()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outs

    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        feeds = self._feeds(sample, timestep, encoder_hidden_states, attention_bias, bias_gain)
        return self._run(self.session, self.spec.main_graph, feeds)[0].to(sample.dtype)


class CachedOnnxRuntimeBackend(OnnxRuntimeBackend):
    """A deep-cache engine: DeepCache's `full` (unet.onnx) and `shallow` (unet_shallow.onnx), see
    compinv_rt.unet.deep_cache, besides the plain call on the full graph."""

    def __init__(self, engine_dir: Path, spec: UNetIOSpec, device: torch.device, threads: int = 0):
        super().__init__(engine_dir, spec, device, threads)
        self.shallow_session = self._session(SHALLOW_GRAPH)

    def full(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        """(noise_pred, deep_features)."""
        feeds = self._feeds(sample, timestep, encoder_hidden_states, attention_bias, bias_gain)
        noise, deep = self._run(self.session, FULL_GRAPH, feeds)
        return noise.to(sample.dtype), deep.to(sample.dtype)

    def shallow(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None,
                deep_features=None):
        """noise_pred from the shallow graph on `deep_features` of an earlier `full`."""
        if deep_features is None:
            raise ValueError("the shallow path needs the deep_features of an earlier full step")
        feeds = self._feeds(sample, timestep, encoder_hidden_states, attention_bias, bias_gain)
        return self._run(self.shallow_session, SHALLOW_GRAPH, (*feeds, deep_features))[0].to(sample.dtype)
