"""Load test of `compinv-rt serve` with a real HTTP client (httpx), against 127.0.0.1 only.

In one run, on one backend and one request mix (plain prompts, a trained concept, explicit
layouts; seeds differ):
  offline   `generate --jobs` images/s in steady state (from the sidecars' write times)
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from compinv_rt.apps.serve.run import free_port

CLI = [sys.executable, "-m", "compinv_rt.apps.cli"]
TOKEN = "<my-heart>"
PROMPTS = ["a red star on grass", "a blue circle on sand", "a yellow square on sky",
           "a purple cross on brick"]
LAYOUT = "star=0.05,0.1,0.5,0.9"


GUIDANCES = (3.0, 5.0, 7.5, 9.0)  # --compare's mixed-guidance phase
MIXED = {"guidance": False}  # set per phase by `compare`


def mix(i: int, steps: int) -> dict:
    """Request i of the mix: 2/4 plain, 1/4 with the trained concept, 1/4 with a layout (and,
    in a mixed-guidance phase, guidance scales cycling through GUIDANCES)."""
    kind = i % 4
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i, "steps": steps}
    if MIXED["guidance"]:
        body["guidance"] = GUIDANCES[(i // 4) % len(GUIDANCES)]
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


def make_concept(work: Path, model: str | None) -> Path:
    """A concept trained for a few steps on the served model (its quality does not matter here:
    it exercises concept rows and prompt expansion)."""
    from compinv_rt.apps.world.photos import make_photos

    photos = work / "photos"
    make_photos(photos, count=3, size=64)
    out = work / "concepts" / "heart"
    # In process, as tests/conftest.py trains its concept (same settings as `train` with
    # --steps 4 --batch 2 --variants 2).
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept

    cfg = TrainConfig(token=TOKEN, class_word="heart", vectors=2, steps=4, batch=2, resolution=64,
                      variants=2, checkpoint_every=2)
    train_concept(prepare(cfg, photos, model), out, device="cpu")
    return out


# --- offline ----------------------------------------------------------------------------------

def offline_jobs(work: Path, n: int, steps: int, max_batch: int, backend: str, model,
                 tag: str = "") -> dict:
    """Steady-state images/s of `generate --jobs` on the same mix: sidecars are written as each
    image finishes, so (images after the first batch) / (last sidecar - end of the first batch)
    leaves out start-up and warm-up, as the server's numbers do."""
    concept = work / "concepts" / "heart"
    lines = []
    for i in range(n):
        body = mix(i, steps)
        job = {"id": f"j{i:05d}", "prompt": body["prompt"], "seed": body["seed"], "steps": steps}
        if "concepts" in body:
            job["concepts"] = [str(concept)]
        if "layout" in body:
            job["layout"] = body["layout"]
        lines.append(json.dumps(job))
    jobs = work / f"jobs{tag}.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    out = work / f"offline{tag}"
    args = [*CLI, "generate", "--jobs", str(jobs), "--out", str(out), "--max-batch", str(max_batch),
            "--backend", backend, "--device", "cpu"]
    t0 = time.perf_counter()
    subprocess.run(args + (["--model", model] if model else []), check=True, timeout=3600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    done = sorted(p.stat().st_mtime for p in out.glob("*.json"))
    k = min(max_batch, len(done) - 1)
    return {"images": len(done), "wall_s": wall,
            "images_per_s": (len(done) - k) / max(1e-9, done[-1] - done[k - 1])}


# --- the server -------------------------------------------------------------------------------

class Server:
    def __init__(self, work: Path, max_batch: int, max_wait_ms: float, backend: str, model,  # noqa: PLR0913
                 queue_size: int, extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [*CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--concepts-dir", str(work / "concepts"), "--max-batch", str(max_batch),
                "--max-wait-ms", str(max_wait_ms), "--queue-size", str(queue_size),
                "--backend", backend, "--device", "cpu", "--log-level", "warning",
                "--timeout", "300", *extra]
        self.log = open(work / f"server-b{max_batch}{''.join(extra)}.log", "w")
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
        """(images in UNet calls, calls) so far, from /metrics: whole batches, plus the steps of
        the step loop divided by the steps per image (so a mean stays images per batch)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        vals = {}
        for line in text.splitlines():
            if line.startswith(("compinv_batch_size_sum", "compinv_batch_size_count",
                                "compinv_step_batch_size_sum", "compinv_step_batch_size_count")):
                name, v = line.split()
                vals[name] = float(v)
        return (vals.get("compinv_batch_size_sum", 0.0) + vals.get("compinv_step_batch_size_sum", 0.0),
                vals.get("compinv_batch_size_count", 0.0) + vals.get("compinv_step_batch_size_count", 0.0))

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
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


def saturation(srv: Server, clients: int, count: int, args, start: int) -> dict:
    """Closed loop with `clients` clients (enough to keep the queue full): images/s and the mean
    UNet batch size the server formed meanwhile."""
    b0 = srv.batch_counts()
    res = asyncio.run(closed_loop(f"{srv.url}/v1/generate", clients, count, args.max_phase_s,
                                  args.steps, start))
    b1 = srv.batch_counts()
    res["mean_batch"] = (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1])
    return res


def run_all(work: Path, args, rates: list[float]) -> dict:
    """Both servers run side by side (only one is busy at a time); the throughput comparisons
    are interleaved in rounds (offline, batched server, --max-batch 1 server), so a change in the
    machine's load hits all three alike; ratios are taken per round and as medians."""
    import statistics

    srv = Server(work, args.max_batch, args.max_wait_ms, args.backend, args.model, args.queue_size)
    one = Server(work, 1, args.max_wait_ms, args.backend, args.model, args.queue_size)
    out = {"max_batch": args.max_batch, "rounds": []}
    try:
        for s in (srv, one):
            s.wait_ready()
            asyncio.run(closed_loop(f"{s.url}/v1/generate", 2, 8, 300, args.steps, 0))  # warm-up
        out["single"] = asyncio.run(closed_loop(f"{srv.url}/v1/generate", 1, args.single, 300,
                                                args.steps, 100))
        out["single_b1"] = asyncio.run(closed_loop(f"{one.url}/v1/generate", 1, args.single, 300,
                                                   args.steps, 100))
        for r in range(args.rounds):
            rnd = {}
            if not args.skip_offline:
                rnd["offline"] = offline_jobs(work, args.offline_jobs, args.steps, args.max_batch,
                                              args.backend, args.model, tag=str(r))
            rnd["batched"] = saturation(srv, 3 * args.max_batch, args.saturation, args, 1000)
            rnd["batch1"] = saturation(one, 4, max(8, args.saturation // 3), args, 1000)
            out["rounds"].append(rnd)
            print(f"  round {r}: " + ", ".join(f"{k} {v['images_per_s']:.2f}/s" for k, v in rnd.items()),
                  file=sys.stderr)
        one.stop()
        sat = statistics.median(r["batched"]["images_per_s"] for r in out["rounds"])
        out["saturation_images_per_s"] = sat
        out["open_loop"] = []
        for f in rates:
            # The unloaded latency again, just before: the shared machine's load drifts.
            before = asyncio.run(closed_loop(f"{srv.url}/v1/generate", 1, 4, 120, args.steps, 200))
            b0 = srv.batch_counts()
            res = asyncio.run(open_loop(f"{srv.url}/v1/generate", f * sat, args.open_s, args.steps,
                                        10_000, seed=int(f * 100)))
            b1 = srv.batch_counts()
            res.update(fraction=f, offered_per_s=f * sat, single_before_p50_s=before["p50_s"],
                       mean_batch=(b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]))
            out["open_loop"].append(res)
            print(f"  open loop {f:.0%}: {res}", file=sys.stderr)
        if args.soak_seconds > 0:
            out["soak"] = soak(srv, f"{srv.url}/v1/generate", 0.8 * sat, args.soak_seconds, args.steps)
    finally:
        srv.stop()
        one.stop()
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


COMPARED = {"step": (), "step-unpadded": ("--no-fixed-batch",), "whole-batch": ("--no-step-batching",)}


def compare(work: Path, args, rates: list[float]) -> dict:
    """Step-level batching (padded and not) against today's whole-batch batcher. All servers are
    up side by side (only one busy at a time) and every phase runs on each in turn, so a change
    in the shared machine's load hits all alike: single-request latency, saturation (one
    guidance scale, then mixed scales), then open loop at `rates` x each server's own saturation
    rate, each with the unloaded latency measured again just before."""
    names = [n for n in COMPARED if n in args.servers.split(",")]
    servers = {n: Server(work, args.max_batch, args.max_wait_ms, args.backend, args.model, args.queue_size,
                         COMPARED[n]) for n in names}
    out: dict = {n: {"open_loop": []} for n in names}
    url = lambda n: f"{servers[n].url}/v1/generate"  # noqa: E731
    try:
        for n in names:
            servers[n].wait_ready()
            asyncio.run(closed_loop(url(n), 2, 8, 300, args.steps, 0))  # warm-up
        for n in names:
            out[n]["single"] = asyncio.run(closed_loop(url(n), 1, args.single, 300, args.steps, 100))
        for phase, mixed, start in (("saturation", False, 1000), ("saturation_mixed", True, 2000)):
            MIXED["guidance"] = mixed
            for n in names:
                out[n][phase] = saturation(servers[n], 3 * args.max_batch, args.saturation, args, start)
        MIXED["guidance"] = False
        for f in rates:
            for n in names:
                before = asyncio.run(closed_loop(url(n), 1, 3, 120, args.steps, 200))
                sat = out[n]["saturation"]["images_per_s"]
                b0 = servers[n].batch_counts()
                o = asyncio.run(open_loop(url(n), f * sat, args.open_s, args.steps, 10_000, seed=int(f * 100)))
                b1 = servers[n].batch_counts()
                o.update(fraction=f, offered_per_s=f * sat, single_before_p50_s=before["p50_s"],
                         mean_batch=(b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]))
                out[n]["open_loop"].append(o)
                print(f"  {n} open loop {f:.0%}: {json.dumps(o)}", file=sys.stderr)
    finally:
        for srv in servers.values():
            srv.stop()
    return out


def compare_report(r: dict) -> str:
    rows = ["| server | single p50 s | sat. images/s | sat. mixed-guidance images/s (ratio) | "
            + " | ".join(f"p99 at {o['fraction']:.0%} s (/ single p50)" for o in next(iter(r.values()))["open_loop"])
            + " |", "|---" * (4 + len(next(iter(r.values()))["open_loop"])) + "|"]
    for name, res in r.items():
        single, sat, mixed = res["single"]["p50_s"], res["saturation"], res["saturation_mixed"]
        cells = [f"{o['p99_s']:.2f} ({o['p99_s'] / single:.2f}x; / unloaded just before "
                 f"{o['p99_s'] / o['single_before_p50_s']:.2f}x; {o['ok']}/{o['requests']} ok, "
                 f"mean batch {o['mean_batch']:.1f})" for o in res["open_loop"]]
        rows.append(f"| {name} | {single:.2f} | {sat['images_per_s']:.2f} (mean batch {sat['mean_batch']:.1f}) | "
                    f"{mixed['images_per_s']:.2f} ({mixed['images_per_s'] / sat['images_per_s']:.2f}) | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--backend", default="torch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20)
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--offline-jobs", type=int, default=64, help="images of an offline run")
    p.add_argument("--single", type=int, default=8, help="requests of the single-request phase")
    p.add_argument("--saturation", type=int, default=64, help="requests of a saturation phase")
    p.add_argument("--max-phase-s", type=float, default=240, help="time bound of a closed-loop phase")
    p.add_argument("--rates", default="0.1,0.25,0.5,0.8", help="fractions of the saturation rate")
    p.add_argument("--open-s", type=float, default=60, help="seconds of each open-loop rate")
    p.add_argument("--soak-seconds", type=float, default=0)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="interleaved throughput rounds")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    p.add_argument("--compare", action="store_true", help="step-level vs whole-batch batching only")
    p.add_argument("--servers", default=",".join(COMPARED), help="--compare: which servers")
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu,
              "threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        make_concept(work, args.model)
        if args.compare:
            result["compare"] = compare(work, args, rates)
        else:
            result["server"] = run_all(work, args, rates)
    result["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_load_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(compare_report(result["compare"]) if args.compare else report(result))
    print(f"CPU: {cpu}; OMP_NUM_THREADS={result['threads']}; load average "
          f"{result['load_avg_start'][0]:.1f} -> {result['load_avg_end'][0]:.1f}")
    print(f"\nwritten: {path}")


def report(r: dict) -> str:
    import statistics

    srv = r["server"]
    b = srv["max_batch"]
    rows = ["| run | requests | ok | errors | images/s | mean batch | p50 s | p95 s | p99 s |",
            "|---|---|---|---|---|---|---|---|---|"]

    def row(name, s):
        rows.append(f"| {name} | {s.get('requests', '')} | {s.get('ok', '')} | "
                    f"{sum(s.get('errors', {}).values())} | {s['images_per_s']:.2f} | "
                    f"{s.get('mean_batch', float('nan')):.2f} | {s.get('p50_s', float('nan')):.2f} | "
                    f"{s.get('p95_s', float('nan')):.2f} | {s.get('p99_s', float('nan')):.2f} |")

    row(f"server max-batch {b}: single request at a time", srv["single"])
    row("server max-batch 1: single request at a time", srv["single_b1"])
    for i, rnd in enumerate(srv["rounds"]):
        if "offline" in rnd:
            row(f"round {i}: offline `--jobs` max-batch {b} (steady state)", rnd["offline"])
        row(f"round {i}: server max-batch {b}, saturation ({3 * b} clients)", rnd["batched"])
        row(f"round {i}: server max-batch 1, saturation (4 clients)", rnd["batch1"])
    for o in srv["open_loop"]:
        row(f"open loop {o['fraction']:.0%} of saturation ({o['offered_per_s']:.2f} req/s)", o)
    if "soak" in srv:
        row(f"soak {float(r['args']['soak_seconds']):.0f} s at 80 % ({srv['soak']['rate']:.2f} req/s)",
            srv["soak"])
    lines = ["\n".join(rows), ""]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    rounds = srv["rounds"]
    if all("offline" in x for x in rounds):
        ratio = [x["batched"]["images_per_s"] / x["offline"]["images_per_s"] for x in rounds]
        lines.append(f"- server saturation / offline `--jobs`, per round: "
                     f"{', '.join(f'{100 * v:.0f} %' for v in ratio)}; median {100 * med(ratio):.0f} % "
                     "(target >= 90 %)")
    ratio = [x["batched"]["images_per_s"] / x["batch1"]["images_per_s"] for x in rounds]
    lines.append(f"- server max-batch {b} / max-batch 1 at saturation, per round: "
                 f"{', '.join(f'{v:.2f}x' for v in ratio)}; median {med(ratio):.2f}x (target >= 1.5x)")
    single = srv["single"]["p50_s"]
    for o in srv["open_loop"]:
        now = o.get("single_before_p50_s", single)
        lines.append(f"- open loop {o['fraction']:.0%}: p99 {o['p99_s']:.2f} s / single-request "
                     f"p50 {single:.2f} s = {o['p99_s'] / single:.2f}; / the single-request p50 "
                     f"just before ({now:.2f} s) = {o['p99_s'] / now:.2f} (target <= 1.5)")
    if "soak" in srv:
        s = srv["soak"]
        lines.append(f"- soak: {s['ok']}/{s['requests']} ok, errors {s['errors'] or 'none'}; server RSS "
                     f"{s['rss_start_mb']:.0f} -> {s['rss_end_mb']:.0f} MB (max {s['rss_max_mb']:.0f}, "
                     f"{s['growth_pct']:+.1f} %)")
    lines.append(f"- CPU: {r['cpu']}; OMP_NUM_THREADS={r['threads']}; load average "
                 f"{r['load_avg_start'][0]:.1f} at start, {r['load_avg_end'][0]:.1f} at end")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
