"""The UNet's roofline on this machine (issue 23): FLOPs per evaluation, the attainable matmul peak
at the model's own GEMM shapes, and the fraction of that peak a backend reaches.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one eager UNet evaluation. torch's table
  has no entry for the CPU flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`),
  so its two batched matmuls (QK^T, AV) are added with torch's own SDPA formula (+3.7 % on the
  embedded model: 0.278 instead of 0.268 GFLOPs per sample-evaluation at 16x16 latents).
- GEMM shapes: the same pass records every matmul as (batch, M, K, N): linears (mm/addmm), bmm,
  attention's two products, and each convolution's im2col-equivalent GEMM (M = N*Ho*Wo,
  K = Cin/groups*kh*kw, N = Cout/groups, `groups` of them).
- Attainable peak: each distinct shape timed as a torch matmul at the run's dtype and thread count
  (best of a few repeats), combined FLOP-weighted: the GFLOP/s of the UNet if it were nothing but
  its GEMMs, each as fast as a bare torch matmul of its shape. One large square matmul is timed too,
  for reference (the machine's practical GEMM ceiling).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten
_CPU_SDPA = aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class Gemm:
    """`batch` independent (M x K) @ (K x N) products."""

    batch: int
    m: int
    k: int
    n: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


@dataclass(frozen=True)
class UNetProfile:
    """One UNet evaluation at one UNet batch: its FLOPs and its GEMMs (shape -> calls)."""

    unet_batch: int
    flops: int
    gemms: dict[Gemm, int]

    @property
    def gemm_flops(self) -> int:
        return sum(g.flops * n for g, n in self.gemms.items())


def _conv_gemm(args, out: torch.Tensor) -> Gemm:
    x, w = args[0], args[1]
    transposed, groups = bool(args[6]), int(args[8])
    if transposed:  # the GEMM of the adjoint: every input pixel times the (Cout/g * k) patch
        spatial = x.shape[2:].numel()
        return Gemm(groups, x.shape[0] * spatial, w.shape[0] // groups, w.shape[1:].numel())
    return Gemm(groups, out.shape[0] * out.shape[2:].numel(), w.shape[1:].numel(), w.shape[0] // groups)


def gemms_of(func, args, out) -> list[Gemm]:
    """The GEMMs one aten call performs (empty for everything that is not a matmul)."""
    packet = getattr(func, "overloadpacket", None)
    if packet is aten.mm:
        return [Gemm(1, args[0].shape[0], args[0].shape[1], args[1].shape[1])]
    if packet is aten.addmm:
        return [Gemm(1, args[1].shape[0], args[1].shape[1], args[2].shape[1])]
    if packet is aten.bmm:
        return [Gemm(args[0].shape[0], args[0].shape[1], args[0].shape[2], args[1].shape[2])]
    if packet is aten.convolution:
        return [_conv_gemm(args, out)]
    if packet is _CPU_SDPA:  # q (B, H, L, D), k (B, H, S, D), v (B, H, S, Dv)
        q, k, v = args[:3]
        heads = q.shape[0] * q.shape[1]
        return [Gemm(heads, q.shape[2], q.shape[3], k.shape[2]),
                Gemm(heads, q.shape[2], k.shape[2], v.shape[3])]
    return []


class GemmRecorder(TorchDispatchMode):
    """Counts the GEMMs of every aten call made under it."""

    def __init__(self):
        super().__init__()
        self.gemms: Counter[Gemm] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.gemms.update(gemms_of(func, args, out))
        return out


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count(fn: Callable[[], object]) -> tuple[int, dict[Gemm, int]]:
    """(FLOPs, GEMM shape -> calls) of running `fn()` once, without autograd."""
    counter = FlopCounterMode(display=False, custom_mapping={_CPU_SDPA: _cpu_sdpa_flops})
    recorder = GemmRecorder()
    with torch.no_grad(), counter, recorder:  # (inference_mode hides the ops from the recorder)
        fn()
    return int(counter.get_total_flops()), dict(recorder.gemms)


def profile_unet(unet, unet_batch: int, latent_hw: tuple[int, int], text_len: int) -> UNetProfile:
    """Count the FLOPs and GEMMs of one eager evaluation of a diffusers UNet at `unet_batch`
    (zeros in, at the UNet's dtype and device)."""
    cfg = unet.config
    param = next(unet.parameters())
    x = torch.zeros(unet_batch, cfg.in_channels, *latent_hw, dtype=param.dtype, device=param.device)
    context = torch.zeros(unet_batch, text_len, cfg.cross_attention_dim, dtype=param.dtype,
                          device=param.device)
    flops, gemms = count(lambda: unet(x, torch.tensor([500], device=param.device), context))
    return UNetProfile(unet_batch, flops, gemms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_gemm(g: Gemm, dtype: torch.dtype, device: torch.device = torch.device("cpu"), repeats: int = 3,
              min_s: float = 2e-3) -> tuple[float, float]:
    """(wall, CPU) seconds per call of a torch matmul of this shape, each the best of `repeats`
    timings long enough to read (calls are repeated to at least `min_s`). CPU: this thread's CPU
    time (`time.thread_time`), which leaves out the time a shared machine made it wait for a core;
    it is the whole cost with one thread only."""
    shape_a = (g.batch, g.m, g.k) if g.batch > 1 else (g.m, g.k)
    shape_b = (g.batch, g.k, g.n) if g.batch > 1 else (g.k, g.n)
    a = torch.randn(shape_a).to(device=device, dtype=dtype)
    b = torch.randn(shape_b).to(device=device, dtype=dtype)
    with torch.inference_mode():
        t0 = time.perf_counter()
        torch.matmul(a, b)  # warm-up, and a first estimate of the call's time
        _sync(device)
        calls = max(1, min(1000, int(min_s / max(time.perf_counter() - t0, 1e-7))))
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                torch.matmul(a, b)
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / calls)
            best_cpu = min(best_cpu, (time.thread_time() - c0) / calls)
    return best, max(best_cpu, 1e-9)


def attainable_gflops(profile: UNetProfile, dtype: torch.dtype, device: torch.device = torch.device("cpu"),
                      repeats: int = 3) -> tuple[float, float]:
    """GFLOP/s of the profile's GEMMs, each at its measured matmul speed, FLOP-weighted (total GEMM
    FLOPs / total GEMM time): (by wall time, by CPU time)."""
    times = [(n, time_gemm(g, dtype, device, repeats)) for g, n in profile.gemms.items()]
    wall, cpu = sum(n * t[0] for n, t in times), sum(n * t[1] for n, t in times)
    return profile.gemm_flops / wall / 1e9, profile.gemm_flops / cpu / 1e9


def square_gflops(dtype: torch.dtype, device: torch.device = torch.device("cpu"), repeats: int = 3,
                  call_s: float = 0.02, max_size: int = 4096) -> tuple[int, float]:
    """(size, GFLOP/s) of one square matmul: the machine's practical GEMM ceiling at this dtype. The
    size doubles from 256 until a call takes `call_s` (cheap where the dtype is slow)."""
    size = 256
    while size < max_size and time_gemm(Gemm(1, size, size, size), dtype, device, 1, 0.0)[0] < call_s:
        size *= 2
    g = Gemm(1, size, size, size)
    return size, g.flops / time_gemm(g, dtype, device, repeats, min_s=0.0)[0] / 1e9


def fraction_of_peak(flops: float, seconds: float, peak_gflops: float) -> float:
    """Achieved FLOP/s over the attainable peak."""
    return flops / seconds / 1e9 / peak_gflops


@dataclass
class Roofline:
    """One bench run's roofline: the UNet's profile per UNet batch (counted once, on the reference
    model's eager UNet: every backend runs the same network) and the attainable peak per
    (precision, UNet batch) and of one square matmul per precision, each measured once."""

    unet: Any
    latent_hw: tuple[int, int]
    text_len: int
    dtypes: dict[str, torch.dtype]  # precision name -> dtype
    device: torch.device = torch.device("cpu")
    profiles: dict[int, UNetProfile] = field(default_factory=dict)
    peaks: dict[tuple[str, int], float] = field(default_factory=dict)
    cpu_peaks: dict[tuple[str, int], float] = field(default_factory=dict)  # by this thread's CPU time
    square: dict[str, tuple[int, float]] = field(default_factory=dict)
    seconds: float = 0.0  # spent counting and measuring

    def profile(self, unet_batch: int) -> UNetProfile:
        if unet_batch not in self.profiles:
            t0 = time.perf_counter()
            self.profiles[unet_batch] = profile_unet(self.unet, unet_batch, self.latent_hw, self.text_len)
            self.seconds += time.perf_counter() - t0
        return self.profiles[unet_batch]

    def peak(self, precision: str, unet_batch: int) -> float:
        """Attainable GFLOP/s at this precision and UNet batch (measured on first use)."""
        if (precision, unet_batch) not in self.peaks:
            profile = self.profile(unet_batch)
            t0 = time.perf_counter()
            self.peaks[precision, unet_batch], self.cpu_peaks[precision, unet_batch] = attainable_gflops(
                profile, self.dtypes[precision], self.device)
            if precision not in self.square:
                self.square[precision] = square_gflops(self.dtypes[precision], self.device)
            self.seconds += time.perf_counter() - t0
        return self.peaks[precision, unet_batch]

    def calls(self, precision: str, unet_batches: list[int]) -> tuple[int, float, float]:
        """(FLOPs, wall seconds at the attainable peak, CPU seconds at the CPU-time peak) of UNet
        calls at these UNet batches."""
        flops = sum(self.profile(b).flops for b in unet_batches)
        seconds = sum(self.profile(b).flops / (self.peak(precision, b) * 1e9) for b in unet_batches)
        cpu_s = sum(self.profile(b).flops / (self.cpu_peaks[precision, b] * 1e9) for b in unet_batches)
        return flops, seconds, cpu_s

    def as_meta(self) -> dict:
        first = next(iter(self.profiles.values()), None)
        return {
            "method": "torch matmul at the UNet's GEMM shapes (im2col for convolutions), best of 3, "
                      "FLOP-weighted; FLOPs: torch.utils.flop_counter + CPU flash attention",
            "threads": torch.get_num_threads(), "seconds": round(self.seconds, 2),
            "gflops_per_sample_evaluation": first and first.flops / first.unet_batch / 1e9,
            "attainable_gflops_per_s": [{"precision": p, "unet_batch": b, "gflops_per_s": v,
                                         "cpu_time_gflops_per_s": self.cpu_peaks[p, b]}
                                        for (p, b), v in sorted(self.peaks.items())],
            "square_matmul": [{"precision": p, "size": n, "gflops_per_s": v}
                              for p, (n, v) in self.square.items()],
        }
