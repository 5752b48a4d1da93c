"""Batch-generation benchmarks for benchmarks/README.md (run on a quiet machine):

  throughput  images/s of `generate --jobs` at --max-batch 1, 4, 8 (torch and onnxruntime backends)
              vs stock diffusers StableDiffusionPipeline called once per job, same prompts/seeds/steps
  memory      peak RSS of a 2,000-job run sampled when 100 and when 2,000 images are done
  ray         images/s of `--ray` with 2 workers vs 1

Usage: .venv/bin/python benchmarks/jobs_bench.py throughput|memory|ray [--model DIR] [--out DIR]
Each mode prints a markdown table and writes JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red star on grass", "a blue circle and a yellow square on sand",
           "photo of a small green heart on brick", "a purple cross on sky", "a white triangle on night"]
CLI = [sys.executable, "-m", "compinv_rt.apps.cli"]


def write_jobs(path: Path, n: int, steps: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "seed": i,
                                        "id": f"j{i:05d}", "steps": steps}) + "\n" for i in range(n)))
    return path


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_jobs(jobs: Path, out: Path, extra: list[str], model: str | None, sample_at=()) -> dict:
    """Run `generate --jobs` in a subprocess; wall time and RSS peaks at the given image counts."""
    args = [*CLI, "generate", "--jobs", str(jobs), "--out", str(out), *extra]
    if model:
        args += ["--model", model]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, marks = 0.0, {}
    while proc.poll() is None:
        try:
            peak = max(peak, rss_mb(proc.pid))
        except OSError:
            break
        done = len(list(out.glob("*.json"))) if sample_at else 0
        for mark in sample_at:
            if done >= mark and mark not in marks:
                marks[mark] = peak
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr.read().decode()[-3000:])
    images = len(list(out.glob("*.png")))
    return {"wall_s": wall, "images": images, "images_per_s": images / wall, "peak_rss_mb": peak,
            "rss_mb_at": {str(k): v for k, v in marks.items()}}


def stock_per_job(model: str | None, n: int, steps: int) -> dict:
    """The obvious alternative: diffusers' pipeline, one call per job, same prompts and seeds."""
    code = f"""
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from compinv_rt.models.loading import resolve_model_dir
pipe = StableDiffusionPipeline.from_pretrained(str(resolve_model_dir({model!r})), safety_checker=None)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
prompts = {PROMPTS!r}
for i in range({n}):
    pipe(prompts[i % len(prompts)], num_inference_steps={steps}, guidance_scale=7.5,
         generator=torch.Generator().manual_seed(i)).images[0].save(f"/tmp/stock_{{i}}.png")
"""
    t0 = time.perf_counter()  # the whole process, imports included, as for run_jobs
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "images": n, "images_per_s": n / wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["throughput", "memory", "ray"])
    ap.add_argument("--model")
    ap.add_argument("--jobs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    rows = []
    if a.mode == "throughput":
        jobs = write_jobs(tmp / "jobs.jsonl", a.jobs, a.steps)
        stock = stock_per_job(a.model, a.jobs, a.steps)
        rows.append({"runner": "stock diffusers, one call per job", "max_batch": 1, **stock})
        for backend in ("torch", "onnxruntime"):
            for mb in (1, 4, 8):
                r = run_jobs(jobs, tmp / f"{backend}-{mb}",
                             ["--max-batch", str(mb), "--backend", backend], a.model)
                rows.append({"runner": f"compinv-rt --jobs --backend {backend}", "max_batch": mb, **r})
        base = rows[0]["images_per_s"]
        print("| runner | --max-batch | images | wall (s) | images/s | vs stock |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['runner']} | {r['max_batch']} | {r['images']} | {r['wall_s']:.1f} | "
                  f"{r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f}x |")
    elif a.mode == "memory":
        jobs = write_jobs(tmp / "jobs.jsonl", a.jobs, a.steps)
        r = run_jobs(jobs, tmp / "mem", ["--max-batch", "8"], a.model, sample_at=(100, a.jobs))
        rows.append(r)
        print(json.dumps(r, indent=2))
    else:
        jobs = write_jobs(tmp / "jobs.jsonl", a.jobs, a.steps)
        for workers in (1, 2):
            r = run_jobs(jobs, tmp / f"ray{workers}", ["--max-batch", "4", "--ray", "--workers",
                                                       str(workers)], a.model)
            rows.append({"workers": workers, **r})
        print("| Ray workers | images | wall (s) | images/s |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['workers']} | {r['images']} | {r['wall_s']:.1f} | {r['images_per_s']:.2f} |")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"jobs-{a.mode}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
