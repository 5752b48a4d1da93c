"""ONNX Runtime backend: the exported ONNX UNet, with IO binding straight to torch tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from compinv_rt.errors import BackendUnavailable
from compinv_rt.export.iospec import INPUTS, OUTPUTS, UNetIOSpec
from compinv_rt.export.onnx_export import ONNX_FILE


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, engine_dir: Path, spec: UNetIOSpec, device: torch.device, threads: int = 0):
        import numpy as np
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # errors only: its graph warnings are noise
        self.spec, self.device = spec, device
        if spec.precision.value == "bf16":
            raise BackendUnavailable("the onnxruntime backend runs fp32 or fp16 engines, not bf16")
        available = ort.get_available_providers()
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailable(
                    f"onnxruntime here has no CUDA provider (has {', '.join(available)}); "
                    "install onnxruntime-gpu or use --device cpu")
            providers: list = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
        else:
            providers = ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Same thread budget as torch (OMP_NUM_THREADS / torch.set_num_threads), one knob for all.
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(Path(engine_dir) / ONNX_FILE), opts,
                                            providers=providers)
        self._np_types = {torch.float32: np.float32, torch.float16: np.float16}
        self._defaults: dict[tuple[str, int], torch.Tensor] = {}

    def _or_default(self, name, batch, given):
        """The IO spec's default for an optional input left out (zero bias, gain [1, 0]), cached."""
        if given is not None:
            return given
        if (name, batch) not in self._defaults:
            self._defaults[(name, batch)] = self.spec.default_input(name, batch, self.device)
        return self._defaults[(name, batch)]

    def __call__(self, sample, timestep, encoder_hidden_states, attention_bias=None, bias_gain=None):
        n = sample.shape[0]
        feeds = (sample, timestep, encoder_hidden_states,
                 self._or_default("attention_bias", n, attention_bias),
                 self._or_default("bias_gain", n, bias_gain))
        binding = self.session.io_binding()
        dev, idx = self.device.type, self.device.index or 0
        keep = []  # contiguous copies must outlive run_with_iobinding
        for name, t in zip(INPUTS, feeds):
            t = t.to(device=self.device, dtype=self.spec.dtype(name)).contiguous()
            keep.append(t)
            binding.bind_input(name, dev, idx, self._np_types[t.dtype], tuple(t.shape), t.data_ptr())
        out = torch.empty(self.spec.shapes(sample.shape[0])["noise_pred"],
                          dtype=self.spec.dtype("noise_pred"), device=self.device)
        binding.bind_output(OUTPUTS[0], dev, idx, self._np_types[out.dtype], tuple(out.shape),
                            out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out.to(sample.dtype)
