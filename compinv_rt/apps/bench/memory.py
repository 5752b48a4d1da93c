"""Peak memory of one measured section: host RSS sampled by a thread; on CUDA the torch
allocator's peak and the device-wide used memory (cudaMemGetInfo, sampled by the same thread),
which also sees what ONNX Runtime's and TensorRT's own allocators take. Both CUDA numbers are the
increase over the section's start: what the measured work needed on top of what was resident
(weights loaded before it are in `device_start`)."""

from __future__ import annotations

import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then pm.rss_mb / pm.cuda_mb."""

    def __init__(self, device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.rss_peak = 0
        self.cuda_peak = 0  # torch allocator, increase over the start
        self.device_start = self.device_peak = 0  # device-wide used bytes (every allocator)
        self._stop = threading.Event()

    def _device_used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self):
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, current_rss())
            if self.device.type == "cuda":
                self.device_peak = max(self.device_peak, self._device_used())
            time.sleep(self.interval)

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
            self.device_start = self.device_peak = self._device_used()
        self.rss_peak = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        self.rss_peak = max(self.rss_peak, current_rss())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_peak = max(self.device_peak, self._device_used())
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_start

    @property
    def rss_mb(self) -> float:
        return self.rss_peak / 2**20

    @property
    def cuda_mb(self) -> float:
        return self.cuda_peak / 2**20

    @property
    def device_mb(self) -> float:
        return (self.device_peak - self.device_start) / 2**20

    @property
    def resident_mb(self) -> float:
        return self.device_start / 2**20
