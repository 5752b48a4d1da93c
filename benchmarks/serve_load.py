"""Load test of `compinv-rt serve` with a real HTTP client (httpx), against 127.0.0.1 only.

In one run, on one backend and one request mix (plain prompts, a trained concept, explicit
layouts; seeds differ):
  offline   `generate --jobs` images/s (marginal: two job-file sizes, so start-up cancels out)
  for the server at --max-batch B and at --max-batch 1:
    single      latency of one request at a time (the unloaded latency)
    saturation  closed loop, 2 x max-batch clients: images/s and mean UNet batch size
  open loop (--max-batch B): Poisson arrivals at fractions of the measured saturation rate:
    p50/p95/p99 latency, throughput, mean batch size, errors
  soak (--soak-seconds): open loop at 80 % of saturation, the server's RSS sampled throughout

Every request loop is bounded in count and in time and stops by itself. Results: a JSON file and a
markdown table on stdout. Usage (see benchmarks/serve.md for the recorded runs):
  nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py --out benchmarks/results/serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CLI = [sys.executable, "-m", "compinv_rt.cli"]
TOKEN = "<my-heart>"
PROMPTS = ["a red star on grass", "a blue circle on sand", "a yellow square on sky",
           "a purple cross on brick"]
LAYOUT = "star=0.05,0.1,0.5,0.9"


def mix(i: int, steps: int) -> dict:
    """Request i of the mix: 2/4 plain, 1/4 with the trained concept, 1/4 with a layout."""
    kind = i % 4
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i, "steps": steps}
    if kind == 1:
        body.update(prompt=f"photo of a {TOKEN} heart on grass", concepts=["heart"])
    elif kind == 3:
        body.update(prompt="a red star on grass", layout=LAYOUT)
    return body


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_concept(work: Path, model: str | None) -> Path:
    """A concept trained for a few steps on the served model (its quality does not matter here:
    it exercises concept rows and prompt expansion)."""
    from compinv_rt.world.photos import make_photos

    photos = work / "photos"
    make_photos(photos, count=3, size=64)
    out = work / "concepts" / "heart"
    args = [*CLI, "train", "--images", str(photos), "--token", TOKEN, "--class-word", "heart",
            "--out", str(out), "--steps", "4", "--batch", "2", "--variants", "2", "--device", "cpu"]
    subprocess.run(args + (["--model", model] if model else []), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    return out


# --- offline ----------------------------------------------------------------------------------

def offline_jobs(work: Path, n: int, steps: int, max_batch: int, backend: str, model) -> dict:
    """Marginal images/s of `generate --jobs`: (2n - n) images / (t(2n) - t(n))."""
    concept = work / "concepts" / "heart"
    walls = {}
    for count in (n, 2 * n):
        jobs = work / f"jobs{count}.jsonl"
        lines = []
        for i in range(count):
            body = mix(i, steps)
            job = {"id": f"j{i:05d}", "prompt": body["prompt"], "seed": body["seed"], "steps": steps}
            if "concepts" in body:
                job["concepts"] = [str(concept)]
            if "layout" in body:
                job["layout"] = body["layout"]
            lines.append(json.dumps(job))
        jobs.write_text("\n".join(lines) + "\n")
        args = [*CLI, "generate", "--jobs", str(jobs), "--out", str(work / f"offline{count}"),
                "--max-batch", str(max_batch), "--backend", backend, "--device", "cpu"]
        t0 = time.perf_counter()
        subprocess.run(args + (["--model", model] if model else []), check=True, timeout=3600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls[count] = time.perf_counter() - t0
    return {"images": 2 * n, "wall_s": walls,
            "images_per_s": n / max(1e-9, walls[2 * n] - walls[n])}


# --- the server -------------------------------------------------------------------------------

class Server:
    def __init__(self, work: Path, max_batch: int, max_wait_ms: float, backend: str, model,
                 queue_size: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [*CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--concepts-dir", str(work / "concepts"), "--max-batch", str(max_batch),
                "--max-wait-ms", str(max_wait_ms), "--queue-size", str(queue_size),
                "--backend", backend, "--device", "cpu", "--log-level", "warning",
                "--timeout", "300"]
        self.log = open(work / f"server-b{max_batch}.log", "w")
        self.proc = subprocess.Popen(args + (["--model", model] if model else []),
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}: see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not become ready")

    def batch_counts(self) -> tuple[float, float]:
        """(images in batches, batches) so far, from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        vals = {}
        for line in text.splitlines():
            if line.startswith(("compinv_batch_size_sum", "compinv_batch_size_count")):
                name, v = line.split()
                vals[name] = float(v)
        return vals.get("compinv_batch_size_sum", 0.0), vals.get("compinv_batch_size_count", 0.0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _one(client, url, body, results):
    t0 = time.perf_counter()
    try:
        r = await client.post(url, json=body)
        ok = r.status_code == 200
        results.append({"t0": t0, "t1": time.perf_counter(), "ok": ok, "code": r.status_code})
    except httpx.HTTPError as exc:
        results.append({"t0": t0, "t1": time.perf_counter(), "ok": False, "code": type(exc).__name__})


def _summary(results: list[dict], wall: float) -> dict:
    lat = sorted(r["t1"] - r["t0"] for r in results if r["ok"])
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    errors = {}
    for r in results:
        if not r["ok"]:
            errors[str(r["code"])] = errors.get(str(r["code"]), 0) + 1
    return {"requests": len(results), "ok": len(lat), "errors": errors,
            "p50_s": pct(0.50), "p95_s": pct(0.95), "p99_s": pct(0.99),
            "images_per_s": len(lat) / wall if wall > 0 else 0.0, "wall_s": wall}


async def closed_loop(url: str, clients: int, count: int, max_s: float, steps: int, start: int):
    """`clients` concurrent clients, each sending its next request when the last one returns,
    until `count` requests are sent or `max_s` has passed."""
    results, sent = [], iter(range(start, start + count))
    deadline = time.perf_counter() + max_s

    async def client_loop(client):
        for i in sent:
            if time.perf_counter() > deadline:
                return
            await _one(client, url, mix(i, steps), results)

    async with httpx.AsyncClient(timeout=max_s + 60, limits=httpx.Limits(max_connections=clients)) as c:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(c) for _ in range(clients))), max_s + 120)
        return _summary(results, time.perf_counter() - t0)


async def open_loop(url: str, rate: float, duration: float, steps: int, start: int, seed: int = 0,
                    on_tick=None):
    """Poisson arrivals at `rate` requests/s for `duration` s (at most rate x duration x 1.5
    requests), each sent on time whatever the others are doing; waits for the stragglers at most
    60 s + the server's request timeout."""
    rng = random.Random(seed)
    results, tasks = [], []
    limit = int(rate * duration * 1.5) + 1
    async with httpx.AsyncClient(timeout=360, limits=httpx.Limits(max_connections=None)) as c:
        t0 = time.perf_counter()
        at = 0.0
        for i in range(limit):
            at += rng.expovariate(rate)
            if at > duration:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(c, url, mix(start + i, steps), results)))
            if on_tick is not None:
                on_tick()
        if tasks:
            await asyncio.wait(tasks, timeout=420)
        for t in tasks:
            t.cancel()
        return _summary(results, time.perf_counter() - t0)


def measure_server(work, args, max_batch: int, rates: list[float], soak_s: float = 0.0) -> dict:
    srv = Server(work, max_batch, args.max_wait_ms, args.backend, args.model, args.queue_size)
    out = {"max_batch": max_batch}
    try:
        srv.wait_ready()
        url = f"{srv.url}/v1/generate"
        asyncio.run(closed_loop(url, 2, 8, 300, args.steps, 0))  # warm-up: every batch shape
        single = asyncio.run(closed_loop(url, 1, args.single, 300, args.steps, 100))
        out["single"] = single
        b0 = srv.batch_counts()
        sat = asyncio.run(closed_loop(url, 2 * max_batch, args.saturation, args.max_phase_s,
                                      args.steps, 1000))
        b1 = srv.batch_counts()
        sat["mean_batch"] = (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1])
        out["saturation"] = sat
        out["open_loop"] = []
        for f in rates:
            rate = f * sat["images_per_s"]
            b0 = srv.batch_counts()
            res = asyncio.run(open_loop(url, rate, args.open_s, args.steps, 10_000, seed=int(f * 100)))
            b1 = srv.batch_counts()
            res.update(fraction=f, offered_per_s=rate,
                       mean_batch=(b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]))
            out["open_loop"].append(res)
            print(f"  b{max_batch} open loop {f:.0%}: {res}", file=sys.stderr)
        if soak_s > 0:
            out["soak"] = soak(srv, url, 0.8 * sat["images_per_s"], soak_s, args.steps)
    finally:
        srv.stop()
    return out


def soak(srv: Server, url: str, rate: float, seconds: float, steps: int) -> dict:
    samples = []
    last = [0.0]

    def tick():
        now = time.perf_counter()
        if now - last[0] > 5:
            last[0] = now
            samples.append((now, rss_mb(srv.proc.pid)))

    tick()
    res = asyncio.run(open_loop(url, rate, seconds, steps, 100_000, seed=7, on_tick=tick))
    samples.append((time.perf_counter(), rss_mb(srv.proc.pid)))
    first = samples[0][1]
    res.update(rate=rate, rss_start_mb=first, rss_end_mb=samples[-1][1],
               rss_max_mb=max(s for _, s in samples),
               growth_pct=100 * (samples[-1][1] - first) / first, samples=len(samples))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--backend", default="torch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20)
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--offline-jobs", type=int, default=48, help="n: the runs make n and 2n images")
    p.add_argument("--single", type=int, default=8, help="requests of the single-request phase")
    p.add_argument("--saturation", type=int, default=96, help="requests of the saturation phase")
    p.add_argument("--max-phase-s", type=float, default=240, help="time bound of a closed-loop phase")
    p.add_argument("--rates", default="0.25,0.5,0.8", help="fractions of the saturation rate")
    p.add_argument("--open-s", type=float, default=60, help="seconds of each open-loop rate")
    p.add_argument("--soak-seconds", type=float, default=0)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu,
              "threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        make_concept(work, args.model)
        if not args.skip_offline:
            result["offline"] = offline_jobs(work, args.offline_jobs, args.steps, args.max_batch,
                                             args.backend, args.model)
            print(f"offline: {result['offline']}", file=sys.stderr)
        result["batched"] = measure_server(work, args, args.max_batch, rates, args.soak_seconds)
        result["batch1"] = measure_server(work, args, 1, [])
    result["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_load_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"\nwritten: {path}")


def report(r: dict) -> str:
    b, one = r["batched"], r["batch1"]
    rows = ["| run | requests | ok | errors | images/s | mean batch | p50 s | p95 s | p99 s |",
            "|---|---|---|---|---|---|---|---|---|"]

    def row(name, s):
        rows.append(f"| {name} | {s['requests']} | {s['ok']} | {sum(s['errors'].values())} | "
                    f"{s['images_per_s']:.2f} | {s.get('mean_batch', float('nan')):.2f} | "
                    f"{s['p50_s']:.2f} | {s['p95_s']:.2f} | {s['p99_s']:.2f} |")

    row(f"max-batch {b['max_batch']}: single request", b["single"])
    row(f"max-batch {b['max_batch']}: saturation (closed loop)", b["saturation"])
    for o in b["open_loop"]:
        row(f"max-batch {b['max_batch']}: open loop {o['fraction']:.0%} ({o['offered_per_s']:.2f}/s)", o)
    row("max-batch 1: single request", one["single"])
    row("max-batch 1: saturation (closed loop)", one["saturation"])
    lines = ["\n".join(rows), ""]
    sat = b["saturation"]["images_per_s"]
    if "offline" in r:
        off = r["offline"]["images_per_s"]
        lines.append(f"- offline `--jobs` (max-batch {b['max_batch']}): {off:.2f} images/s; "
                     f"server at saturation = {100 * sat / off:.0f} % of it (target >= 90 %)")
    lines.append(f"- server max-batch {b['max_batch']} vs max-batch 1 at saturation: "
                 f"{sat / one['saturation']['images_per_s']:.2f}x (target >= 1.5x)")
    single = b["single"]["p50_s"]
    for o in b["open_loop"]:
        lines.append(f"- open loop {o['fraction']:.0%}: p99 / single-request latency = "
                     f"{o['p99_s'] / single:.2f} (target <= 1.5)")
    if "soak" in b:
        s = b["soak"]
        lines.append(f"- soak {r['args']['soak_seconds']} s at {s['rate']:.2f} req/s: "
                     f"{s['ok']}/{s['requests']} ok, errors {s['errors']}, RSS "
                     f"{s['rss_start_mb']:.0f} -> {s['rss_end_mb']:.0f} MB (max "
                     f"{s['rss_max_mb']:.0f}, {s['growth_pct']:+.1f} %)")
    lines.append(f"- CPU: {r['cpu']}; OMP_NUM_THREADS={r['threads']}; load average "
                 f"{r['load_avg_start'][0]:.1f} at start, {r['load_avg_end'][0]:.1f} at end")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
