"""Adaptive bias vs fixed bias vs guidance: presence, region and per-step cost in one run.

    # tuning (knobs of the adaptive bias, on the tuning prompts)
    .venv/bin/python benchmarks/spatial/adaptive.py --split tune --prompts 44 --k 2 \\
        --variants "none;bias;adaptive:s=1;adaptive:s=2;adaptive:s=2,decay=4,steps=0.4" \\
        --out /tmp/tune.json
    # report (held-out prompts, the chosen defaults)
    .venv/bin/python benchmarks/spatial/adaptive.py --split report --prompts 50 --k 4 \\
        --variants "none;bias;adaptive;guidance" --out benchmarks/spatial/adaptive.json

Prompts: every two-object prompt the shapes world holds out (176: two seen objects whose pairing
was never shown in training), shuffled with a fixed seed and split once: the first 44 are the
tuning set, the other 132 the report set. Knobs are chosen on `--split tune` only.
A variant is `mode[:key=value,...]` with mode none, bias, adaptive or guidance and keys s
(strength), steps (fraction or count), decay (adaptive only). Unset keys are the CLI defaults.

Judging is presence.py's (`score`): presence = both stated objects found with the right colours;
region = present and each object's centre inside its box (the reference's fixed boxes).

Cost: the variants run interleaved prompt by prompt (same prompt, seeds and batch), so background
load on a shared machine hits them alike. Each UNet step is timed (the `on_step` callback); the
cost of a variant is the median duration of its regularized steps (the first `steps` steps) over
the median of the same steps of `none`, and its whole denoising loop over none's. Times are the
process's CPU time (`time.process_time`, one thread): on a shared machine, wall time mostly
measures the other jobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presence import score  # noqa: E402

SPLIT_SEED = 2026
N_TUNE = 44


def split_prompts(split: str) -> list[str]:
    from compinv_rt.apps.world.scenes import heldout_prompts

    pool = heldout_prompts("two", 10_000)  # all of them, in a fixed order
    order = np.random.default_rng(SPLIT_SEED).permutation(len(pool))
    chosen = order[:N_TUNE] if split == "tune" else order[N_TUNE:]
    return [pool[i] for i in chosen]


def parse_variant(text: str) -> tuple[str, dict]:
    mode, _, rest = text.strip().partition(":")
    knobs = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    unknown = set(knobs) - {"s", "steps", "decay"}
    if mode not in ("none", "bias", "adaptive", "guidance") or unknown:
        raise SystemExit(f"error: bad variant {text!r}")
    return mode, knobs


def engine_cost(loaded, batch: int, repeats: int) -> dict:
    """ONNX Runtime CPU time per UNet call: this contract (the spread is computed in the graph on
    every call, whatever the gain) vs the same UNet exported without bias_gain (the fixed bias
    only, the previous contract), on identical inputs, interleaved."""
    import tempfile

    import onnxruntime as ort

    from compinv_rt.export.onnx_export import export_onnx
    from compinv_rt.unet.attention import BiasedUNet
    from compinv_rt.unet.iospec import INPUTS, UNetIOSpec, batch_profiles

    spec = UNetIOSpec.for_model(loaded.files, loaded.files.default_size, loaded.files.default_size,
                                "fp32")
    tmp = Path(tempfile.mkdtemp())
    export_onnx(loaded.unet, spec, batch_profiles([batch // 2], True)[0], tmp)
    example = spec.example_inputs(batch)
    with torch.no_grad():
        torch.onnx.export(BiasedUNet(loaded.unet).eval(), example[:4], str(tmp / "fixed.onnx"),
                          input_names=list(INPUTS[:4]), output_names=["noise_pred"],
                          opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = {"bias_gain contract": (ort.InferenceSession(str(tmp / "unet.onnx"), opts), INPUTS),
                "fixed bias only": (ort.InferenceSession(str(tmp / "fixed.onnx"), opts), INPUTS[:4])}
    feeds = {n: t.numpy() for n, t in zip(INPUTS, example)}
    times = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, (sess, names) in sessions.items():
            t0 = time.process_time()
            sess.run(None, {n: feeds[n] for n in names})
            times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "repeats": repeats,
            "cpu_ms_per_call": {k: round(1000 * v, 2) for k, v in med.items()},
            "contract_vs_fixed_only": round(med["bias_gain contract"] / med["fixed bias only"], 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--split", choices=["tune", "report"], required=True)
    ap.add_argument("--prompts", type=int, default=44)
    ap.add_argument("--k", type=int, default=4, help="images per prompt (one batch)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--variants", default="none;bias;adaptive;guidance")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine-repeats", type=int, default=0,
                    help="also time ONNX Runtime with and without the bias_gain input (calls)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tqdm import tqdm

    from compinv_rt.apps.world.judge import load_judge
    from compinv_rt.generate.session import GenerationSession, Request
    from compinv_rt.models.loading import load_model
    from compinv_rt.sampling.pipeline import SamplingConfig
    from compinv_rt.spatial.layouts import fixed_layout
    from compinv_rt.spatial.plan import SpatialConfig, SpatialOptions

    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    if variants[0] != "none":
        raise SystemExit("error: the first variant must be none (the cost baseline)")
    loaded = load_model(args.model)
    judge = load_judge()
    session = GenerationSession(loaded, "torch", max_batch=args.k)
    cfg = SamplingConfig(steps=args.steps, guidance=args.guidance).resolved(loaded.files)
    prompts = split_prompts(args.split)[: args.prompts]
    configs = {}
    for v in variants:
        mode, knobs = parse_variant(v)
        configs[v] = SpatialConfig.from_options(SpatialOptions(
            None if mode == "none" else mode, None,
            None if "s" not in knobs else float(knobs["s"]), knobs.get("steps"),
            decay=None if "decay" not in knobs else float(knobs["decay"])), total_steps=args.steps)
    stats = {v: {"present": 0, "inside": 0, "n": 0, "steps": [], "loops": [], "regularized": 0}
             for v in variants}
    for prompt in tqdm(prompts, desc=f"{args.split} prompts", file=sys.stderr):
        for v in variants:  # seeds 8888.. in every variant, one UNet batch of k images
            stamps = [time.process_time()]
            sp = configs[v]  # the reference's fixed boxes, explicitly (not a shipped layout model)
            if sp.mode.value != "none":
                sp = dataclasses.replace(sp, layout=fixed_layout(prompt))
            results = session.generate(Request(prompt, 8888, args.k, sampling=cfg, spatial=sp),
                                       on_step=lambda d, t: stamps.append(time.process_time()))
            st = stats[v]
            st["steps"].append(np.diff(stamps))
            st["loops"].append(stamps[-1] - stamps[0])
            st["regularized"] = configs[v].regularized_steps(args.steps)
            for p, r in score(judge, [x.image for x in results], prompt, results[0].layout):
                st["n"], st["present"], st["inside"] = st["n"] + 1, st["present"] + p, st["inside"] + r

    base_steps = np.stack(stats["none"]["steps"])  # (prompts, steps)
    base_loop = statistics.median(stats["none"]["loops"])
    result = {"split": args.split, "prompts": len(prompts), "k": args.k, "steps": args.steps,
              "guidance": args.guidance, "threads": args.threads, "torch": torch.__version__,
              "model": str(loaded.root), "variants": {}}
    for v in variants:
        st = stats[v]
        steps = np.stack(st["steps"])
        reg = st["regularized"] or args.steps  # none: all steps are "its" steps
        per_step = float(np.median(steps[:, :reg]))
        base = float(np.median(base_steps[:, :reg]))
        loop = statistics.median(st["loops"])
        result["variants"][v] = {
            "config": configs[v].as_dict(), "samples": st["n"],
            "presence": round(st["present"] / st["n"], 4), "region": round(st["inside"] / st["n"], 4),
            "regularized_steps": st["regularized"],
            "cpu_ms_per_regularized_step": round(1000 * per_step, 2),
            "cost_per_regularized_step_vs_none": round(per_step / base, 3),
            "loop_cpu_seconds_median": round(loop, 3), "loop_vs_none": round(loop / base_loop, 3)}
        print(json.dumps({v: result["variants"][v]}), flush=True)
    if args.engine_repeats:
        result["onnxruntime"] = engine_cost(loaded, 2 * args.k, args.engine_repeats)
        print(json.dumps({"onnxruntime": result["onnxruntime"]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
