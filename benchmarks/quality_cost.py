"""Quality against cost of sampler settings (issue 23): the judge decides how few UNet evaluations
give the same images.

For each setting (sampler, steps, guidance interval): UNet sample-evaluations per image, UNet FLOPs
per image (torch.utils.flop_counter on one evaluation), wall time per image (our torch backend,
batch 1 and 8), and the judged `exact` rate with its 95 % Wilson interval on the shapes world's
held-out words prompts (`world score`'s kinds and checks, generated through compinv-rt's own
pipeline), plus the paired agreement with the reference (the same seeds: fraction of samples whose
verdict equals the reference's). `--concepts` adds the random-concept protocol (`eval` cells of
words and cap_norm+adaptive on concepts trained with 3 seeds, trainings from the eval cache).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/quality_cost.py --out benchmarks/results/quality \
        [--settings ddim:25,dpm:10,...] [--kinds single,two,three] [--k 5] [--concepts]

Setting syntax: SAMPLER:STEPS[@LO-HI] (guidance only on steps in [LO, HI) of the run), e.g.
`dpm:10@0-0.6`. Results are rewritten after every setting (resumable: finished settings are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFERENCE = "ddim:25"
DEFAULT_SETTINGS = ("ddim:25,ddim:15,ddim:10,ddim:8,dpm:15,dpm:10,dpm:8,dpm:6,dpm-karras:10,dpm-karras:8,"
                    "unipc:10,unipc:8,unipc:6,euler:15,euler:10,dpm:10@0-0.6,dpm:10@0-0.8,dpm:8@0-0.75")


def parse_setting(text: str):
    """`SAMPLER:STEPS[cN][@LO-HI]`: N = DeepCache interval (a full UNet step every N steps)."""
    from compinv_rt.sampling.pipeline import SamplingConfig

    head, _, interval = text.partition("@")
    name, _, steps = head.partition(":")
    steps, _, cache = steps.partition("c")
    lo, hi = (float(x) for x in interval.split("-")) if interval else (0.0, 1.0)
    return SamplingConfig(steps=int(steps), guidance=7.5, scheduler=name, guidance_interval=(lo, hi),
                          cache_interval=int(cache or 1))


def family(text: str) -> str:
    head, _, interval = text.partition("@")
    return (head.split(":")[0] + (" + DeepCache" if "c" in head.split(":")[1] else "")
            + (" + guidance interval" if interval else ""))


def unet_flops(model) -> tuple[int, int]:
    """FLOPs of one UNet sample-evaluation at the model's native size (batch 1): the whole UNet,
    and DeepCache's shallow path."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from compinv_rt.unet.backends import TorchBackend

    u, backend = model.unet, TorchBackend(model.unet)
    s = model.files.default_size // model.files.vae_scale_factor
    x = torch.zeros(1, u.config.in_channels, s, s)
    ctx = torch.zeros(1, model.files.text_len, u.config.cross_attention_dim)
    t = torch.tensor([500.0])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        _, deep = backend.full(x, t, ctx)
    with torch.no_grad(), FlopCounterMode(display=False) as fs:
        backend.shallow(x, t, ctx, deep_features=deep)
    return int(fc.get_total_flops()), int(fs.get_total_flops())


def cpu_per_image(pipe, cfg, batch: int, repeats: int = 3) -> float:
    """The process's CPU seconds per image (best of `repeats`), end to end (text encoder, UNet
    steps, VAE). One thread: on a machine shared with other jobs, CPU time is what the setting
    costs; wall time measures the neighbours."""
    prompts, seeds = ["a red star and a blue circle on grass"] * batch, list(range(batch))
    pipe.generate(prompts[:1], seeds[:1], cfg)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        pipe.generate(prompts, seeds, cfg)
        best = min(best, time.process_time() - t0)
    return best / batch


def judged_words(pipe, cfg, prompts, k: int, judge, batch: int = 25) -> list[dict]:
    """One verdict per (prompt, sample): `world score`'s check on images from our pipeline."""
    import numpy as np

    from compinv_rt.apps.world.scenes import parse_prompt
    from compinv_rt.apps.world.score import check

    jobs = [(kind, p, j) for kind, p in prompts for j in range(k)]
    out = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        images = pipe.generate([p for _, p, _ in chunk], [7_000 + i + n for n in range(len(chunk))], cfg)
        arr = np.stack([np.asarray(im) for im in images])
        for (kind, p, _), v in zip(chunk, judge(arr)):
            out.append({"kind": kind, "prompt": p, "exact": bool(check(parse_prompt(p), v)["exact"])})
    return out


def per_kind(verdicts: list[dict]) -> dict:
    kinds = dict.fromkeys(v["kind"] for v in verdicts)
    return {k: sum(v["exact"] for v in verdicts if v["kind"] == k) / sum(v["kind"] == k for v in verdicts)
            for k in kinds}


def concept_quality(cfg_text: str, cfg, out: Path) -> dict:
    """The random report set (11 concepts x 3 training seeds) with the adaptive bias, at this setting."""
    from compinv_rt.apps.eval.protocol import EvalConfig, build_protocol, parse_methods
    from compinv_rt.apps.eval.runner import RunOptions, run_eval

    ec = EvalConfig(samples=4, steps=cfg.steps, train_steps=250, train_seeds=3, scheduler=cfg.scheduler,
                    guidance_interval=cfg.guidance_interval, cache_interval=cfg.cache_interval)
    protocol = build_protocol(False, None, None, world=True, random=8, random_seed=1, objects=2,
                              methods=parse_methods("words,cap_norm+adaptive"))
    res = run_eval(protocol, ec, out / "eval" / cfg_text.replace(":", "_").replace("@", "_"),
                   RunOptions(model=None, cache=Path(".cache/eval")))
    from compinv_rt.apps.world.score import wilson

    out_rows = {}
    for name, m in res["methods"].items():
        a, inv = m["all"], m["inverted"]
        n, ni = int(a["images"]), int(inv["images"])
        out_rows[name] = {
            "prompt_accuracy": a["accuracy"], "identity_all": a["identity"], "coi_pair": inv["coi"],
            "images": n, "images_inverted": ni,
            "ci": {"prompt_accuracy": wilson(round(a["accuracy"] * n), n),
                   "identity_all": wilson(round(a["identity"] * n), n),
                   "coi_pair": wilson(round(inv["coi"] * ni), ni)}}
    return out_rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    fams: dict = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    for fam, rs in sorted(fams.items()):
        rs = sorted(rs, key=lambda r: r["gflops_per_image"])
        x = [r["gflops_per_image"] for r in rs]
        y = [100 * r["words"]["exact"] for r in rs]
        err = [[100 * (r["words"]["exact"] - r["words"]["ci"][0]) for r in rs],
               [100 * (r["words"]["ci"][1] - r["words"]["exact"]) for r in rs]]
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=fam)
        for r, xi, yi in zip(rs, x, y):  # each point's setting: families mix step counts
            ax.annotate(r["setting"].split(":", 1)[1], (xi, yi), textcoords="offset points", xytext=(4, -10),
                        fontsize=6, color=line[0].get_color())
    ref = next(r for r in rows if r["setting"] == REFERENCE)
    ax.axhspan(100 * ref["words"]["ci"][0], 100 * ref["words"]["ci"][1], color="grey", alpha=0.15,
               label="reference 95 % interval")
    ax.set_xlabel("UNet GFLOPs per image")
    ax.set_ylabel("judged prompt accuracy, held-out words prompts (%)")
    ax.set_title("Quality against cost (embedded model, guidance 7.5)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict], header: str) -> str:
    ref = next((r for r in rows if r["setting"] == REFERENCE), None)
    lines = [header, "", "| setting | UNet evals / image | GFLOPs / image | FLOPs vs reference "
             "| CPU s / image, batch 1 | CPU s / image, batch 8 | words exact (95 % interval) "
             "| agreement with reference | concepts: prompt acc. / identity / CoI |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["gflops_per_image"]):
        w = r["words"]
        c = r.get("concepts", {}).get("cap_norm+adaptive")
        cc = (f"{100 * c['prompt_accuracy']:.1f} / {100 * c['identity_all']:.1f} / {100 * c['coi_pair']:.1f}"
              if c else "-")
        red = f"{ref['gflops_per_image'] / r['gflops_per_image']:.2f}x fewer" if ref else "-"
        lines.append(f"| `{r['setting']}` | {r['evals']} | {r['gflops_per_image']:.2f} | {red} | "
                     f"{r.get('s_per_image_b1', float('nan')):.3f} | {r.get('s_per_image_b8', float('nan')):.3f} | "
                     f"{100 * w['exact']:.1f} % ({100 * w['ci'][0]:.1f}-{100 * w['ci'][1]:.1f}), n={w['n']} | "
                     f"{100 * r['agreement']:.1f} % | {cc} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--kinds", default="single,two,three")
    ap.add_argument("--prompts-per-kind", type=int, default=25)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--concepts", action="store_true", help="also the random-concept protocol (slow)")
    ap.add_argument("--retime", action="store_true", help="only re-measure the CPU time of finished settings")
    args = ap.parse_args(argv)

    import platform

    import torch

    from compinv_rt.apps.world.judge import load_judge
    from compinv_rt.apps.world.score import default_prompts, wilson
    from compinv_rt.models.loading import load_model
    from compinv_rt.sampling.pipeline import Pipeline

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if REFERENCE not in settings:
        settings.insert(0, REFERENCE)
    for s in settings:
        parse_setting(s)  # fail before any work
    args.out.mkdir(parents=True, exist_ok=True)
    res_file = args.out / "quality_cost.json"
    done = {r["setting"]: r for r in json.loads(res_file.read_text())["rows"]} if res_file.is_file() else {}
    model = load_model(None, "cpu")
    pipe = Pipeline(model)
    judge = load_judge()
    flops, shallow_flops = unet_flops(model)
    prompts = default_prompts([k for k in args.kinds.split(",") if k], args.prompts_per_kind, 0)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    header = (f"CPU: {cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; kinds {args.kinds}, "
              f"{args.prompts_per_kind} prompts x {args.k} samples per kind; one UNet evaluation = "
              f"{flops / 1e9:.3f} GFLOPs (batch 1), its DeepCache shallow path {shallow_flops / 1e9:.3f}")
    if args.retime:  # timings of every finished setting again, interleaved, in one quiet run
        for s in done:
            cfg = parse_setting(s)
            done[s]["s_per_image_b1"] = cpu_per_image(pipe, cfg, 1)
            done[s]["s_per_image_b8"] = cpu_per_image(pipe, cfg, 8)
            print(f"{s}: {done[s]['s_per_image_b1']:.3f} / {done[s]['s_per_image_b8']:.3f} CPU s per image",
                  file=sys.stderr, flush=True)
        rows = list(done.values())
        res_file.write_text(json.dumps({"header": header, "flops_per_eval": flops, "rows": rows}, indent=1))
        (args.out / "quality_cost.md").write_text(markdown(rows, header))
        plot(rows, args.out / "quality_cost.png")
        settings = []
    ref_verdicts = None
    for s in settings:
        if s in done and "verdicts" in done[s]:
            if s == REFERENCE:
                ref_verdicts = done[s]["verdicts"]
            continue
        cfg = parse_setting(s)
        t0 = time.time()
        verdicts = judged_words(pipe, cfg, prompts, args.k, judge)
        hits = sum(v["exact"] for v in verdicts)
        row = {"setting": s, "family": family(s), "evals": cfg.unet_evaluations(),
               "gflops_per_image": cfg.unet_flops(flops, shallow_flops) / 1e9,
               "s_per_image_b1": cpu_per_image(pipe, cfg, 1), "s_per_image_b8": cpu_per_image(pipe, cfg, 8),
               "words": {"exact": hits / len(verdicts), "ci": list(wilson(hits, len(verdicts))),
                         "n": len(verdicts), "per_kind": per_kind(verdicts)},
               "verdicts": [v["exact"] for v in verdicts]}
        if s == REFERENCE:
            ref_verdicts = row["verdicts"]
        if args.concepts:
            row["concepts"] = concept_quality(s, cfg, args.out)
        row["seconds"] = round(time.time() - t0, 1)
        done[s] = row
        print(f"{s}: {row['evals']} evals, exact {100 * row['words']['exact']:.1f} %, {row['seconds']} s",
              file=sys.stderr, flush=True)
        for r in done.values():
            r["agreement"] = (sum(a == b for a, b in zip(r["verdicts"], ref_verdicts)) / len(ref_verdicts)
                              if ref_verdicts else float("nan"))
        rows = list(done.values())
        res_file.write_text(json.dumps({"header": header, "flops_per_eval": flops, "rows": rows}, indent=1))
        (args.out / "quality_cost.md").write_text(markdown(rows, header))
        if any(r["setting"] == REFERENCE for r in rows):
            plot(rows, args.out / "quality_cost.png")
    print((args.out / "quality_cost.md").read_text())


if __name__ == "__main__":
    main()
