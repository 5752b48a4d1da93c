"""Presence and region rates of two-object prompts for spatial none / bias / guidance, judged by
the shapes-world judge.

    .venv/bin/python benchmarks/spatial/presence.py [--model DIR] --prompts 25 --k 4 \
        --out benchmarks/spatial/presence.json

Prompts: the world's held-out two-object prompts ("a red circle and a green star on sand": seen
objects, a pairing never seen together). Layout: the reference's fixed boxes, given explicitly
(`fixed_layout`: first concept left 0.1,0.2,0.5,0.8; second right 0.6,0.2,0.95,0.8), which is what
`--layout auto` gave before the embedded model shipped a layout model.
Per sample:
- presence: the judge finds both stated objects (colour and shape), any background;
- region: present, and each object's detected centre lies inside its concept's box.
Same seeds in every mode. One thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def score(judge, images, prompt: str, layout) -> list[tuple[bool, bool]]:
    """(present, in region) per image of `prompt`, judged against the layout's boxes."""
    from compinv_rt.apps.world.scenes import parse_prompt

    verdicts = judge(np.stack([np.asarray(im) for im in images]))
    spec = parse_prompt(prompt)
    boxes = ([c.boxes[0] for c in layout.concepts] if layout is not None
             else [(0.1, 0.2, 0.5, 0.8), (0.6, 0.2, 0.95, 0.8)])
    out = []
    for v in verdicts:
        found = [next((d for d in v.objects if d.colour == colour and d.shape == shape), None)
                 for colour, shape, _ in spec.objects]
        present, ok = all(found), all(found)
        if present:
            js = judge.config.size
            for d, (x0, y0, x1, y1) in zip(found, boxes):
                cx, cy = (d.box[0] + d.box[2]) / 2 / js, (d.box[1] + d.box[3]) / 2 / js
                ok &= x0 <= cx <= x1 and y0 <= cy <= y1
        out.append((present, ok))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--k", type=int, default=4, help="images per prompt")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--strength", type=float, default=2.0)
    ap.add_argument("--bias-steps", default="0.2")
    ap.add_argument("--modes", default="none,bias,guidance")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guidance-layers", default="default",
                    help="default (the reference's choice), all, or comma-separated layer names")
    ap.add_argument("--guidance-scale", type=float, default=30.0)
    ap.add_argument("--guidance-iterations", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import dataclasses

    from compinv_rt.apps.world.judge import load_judge
    from compinv_rt.apps.world.scenes import heldout_prompts
    from compinv_rt.generate.session import GenerationSession, Request
    from compinv_rt.models.loading import load_model
    from compinv_rt.sampling.pipeline import SamplingConfig
    from compinv_rt.spatial.guidance import GuidanceConfig
    from compinv_rt.spatial.layouts import fixed_layout
    from compinv_rt.spatial.plan import SpatialConfig, SpatialOptions
    from compinv_rt.unet.capture import cross_attention_layers

    loaded = load_model(args.model)
    judge = load_judge()
    session = GenerationSession(loaded, max_batch=args.k)
    cfg = SamplingConfig(steps=args.steps, guidance=args.guidance).resolved(loaded.files)
    prompts = heldout_prompts("two", args.prompts)
    result = {"model": str(loaded.root), "prompts": len(prompts), "k": args.k,
              "steps": args.steps, "guidance": args.guidance, "bias_strength": args.strength,
              "bias_steps": args.bias_steps, "guidance_layers": args.guidance_layers,
              "guidance_scale": args.guidance_scale, "guidance_iterations": args.guidance_iterations,
              "modes": {}}
    module = session.unet(cfg.height, cfg.width, True).module
    layers = {"default": None, "all": tuple(cross_attention_layers(module))}.get(
        args.guidance_layers, tuple(args.guidance_layers.split(",")))
    for mode in args.modes.split(","):
        t0 = time.time()
        spatial = SpatialConfig.from_options(SpatialOptions(None if mode == "none" else mode, None, args.strength,
                                                            args.bias_steps), total_steps=args.steps)
        spatial = dataclasses.replace(spatial, guidance=GuidanceConfig(
            iterations=args.guidance_iterations, scale=args.guidance_scale, layers=layers))
        present = inside = n = 0
        for prompt in prompts:
            sp = spatial if mode == "none" else dataclasses.replace(spatial, layout=fixed_layout(prompt))
            results = session.generate(Request(prompt, 8888, args.k, sampling=cfg, spatial=sp))
            images = [r.image for r in results]
            layout = results[0].layout
            for p, r in score(judge, images, prompt, layout):
                n, present, inside = n + 1, present + p, inside + r
        result["modes"][mode] = {"samples": n, "presence": round(present / n, 4),
                                 "region": round(inside / n, 4), "seconds": round(time.time() - t0, 1)}
        print(json.dumps({mode: result["modes"][mode]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
