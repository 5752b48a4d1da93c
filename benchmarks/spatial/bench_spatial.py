"""Cost per denoising step of the spatial modes (none / bias / guidance), on CPU or GPU.

    .venv/bin/python benchmarks/spatial/bench_spatial.py --model DIR [--size 128] [--batch 1]
    .venv/bin/python benchmarks/spatial/bench_spatial.py --arch sd15 --size 256 --steps 3

Every mode runs the same prompt, seeds and sampler through `Pipeline.generate` (the one denoise
loop). `bias` biases every step (so each step pays the bias), `guidance` guides every step with the
reference's settings (up to 5 inner forward+backward passes while the loss is above 0.2),
`adaptive` is `bias` with the per-layer logit-spread scaling (`--spatial adaptive`). Modes
are interleaved over the repeats so background load hits them alike; medians and minima are
reported (on a shared machine the minimum is the least disturbed number). One thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a red star and a blue circle on grass"
LAYOUT = "red star=0.1,0.2,0.5,0.8;blue circle=0.6,0.2,0.95,0.8"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--arch", help="sd15/sd21: architecture-true random weights (timing only)")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strength", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="none,bias,guidance")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the process's CPU time (less disturbed by other jobs on a shared machine)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from compinv_rt.models.loading import load_model
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig
    from compinv_rt.sampling.denoise import AttentionBias, chain_hooks, progress_hook
    from compinv_rt.spatial.bias_maps import BiasSchedule, bias_batch
    from compinv_rt.spatial.guidance import GuidanceConfig, LayoutGuidance
    from compinv_rt.spatial.layouts import parse_layout, resolve_layout
    from compinv_rt.unet.backends import TorchBackend

    model = args.model
    if args.arch:
        from compinv_rt.models.architectures import save_model, sd_components

        model = str(save_model(sd_components(args.arch), Path(tempfile.mkdtemp()) / args.arch))
    loaded = load_model(model)
    size = args.size or loaded.files.default_size
    cfg = SamplingConfig(steps=args.steps, height=size, width=size).resolved(loaded.files)
    f = loaded.files.vae_scale_factor
    h, w = size // f, size // f
    layout = resolve_layout(parse_layout(LAYOUT), loaded.tokenizer, PROMPT)
    backend = TorchBackend(loaded.unet)
    pipe = Pipeline(loaded, backend)
    pipe.decode = lambda latents: latents  # time the denoise loop only
    prompts, seeds = [PROMPT] * args.batch, list(range(args.batch))
    modes = args.modes.split(",")
    times: dict[str, list[float]] = {m: [] for m in modes}
    iters: dict[str, list[int]] = {m: [] for m in modes}

    def run(mode: str) -> None:
        bias, guide = None, None
        if mode in ("bias", "adaptive"):  # adaptive: the spread-scaled bias, gain schedule fed per step
            bias = AttentionBias(bias_batch([layout] * args.batch, args.strength, h, w), args.steps,
                                 BiasSchedule() if mode == "adaptive" else None)
        if mode == "guidance":
            guide = LayoutGuidance(backend.module, [layout] * args.batch, (h, w),
                                   GuidanceConfig(steps=args.steps))
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        stamps = [clock()]
        hook = chain_hooks(progress_hook(lambda d, t: stamps.append(clock())), guide)
        pipe.generate(prompts, seeds, cfg, hook=hook, bias=bias)
        times[mode] += [b - a for a, b in zip(stamps, stamps[1:])]
        if guide is not None:
            per_step = [sum(1 for e in guide.history if e["step"] == s) for s in range(args.steps)]
            iters[mode] += per_step

    run(modes[0])  # warm-up
    times = {m: [] for m in modes}
    iters = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            run(m)
    base = statistics.median(times[modes[0]])
    result = {
        "model": args.arch and f"{args.arch} architecture, random weights" or str(model),
        "size": size, "latent": [h, w], "batch": args.batch, "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads, "device": str(loaded.device),
        "clock": args.clock,
        "torch": torch.__version__,
        "per_step_ms": {m: round(1000 * statistics.median(t), 2) for m, t in times.items()},
        "relative_to_none": {m: round(statistics.median(t) / base, 3) for m, t in times.items()},
        # the fastest step of each mode: the least disturbed by other load on a shared machine
        "per_step_ms_min": {m: round(1000 * min(t), 2) for m, t in times.items()},
        "relative_to_none_min": {m: round(min(t) / min(times[modes[0]]), 3) for m, t in times.items()},
        "guidance_iterations_per_step": (statistics.mean(iters["guidance"])
                                         if iters.get("guidance") else None),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
