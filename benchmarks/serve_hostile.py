"""A hostile client against `compinv-rt serve` (issue 27), bounded and on loopback only.

Starts a real server (a `compinv-rt serve` subprocess on 127.0.0.1, the embedded model, a token)
and checks, measuring the server's RSS from /proc:

1. bodies: 8 concurrent 200 MB POST bodies without a token (declared Content-Length), 8 with the
   token (declared), 8 chunked with the token: answered 401/413 without being buffered;
2. starvation: 12 closed-loop clients at guidance 7.5 keep a full batch always waiting; a client
   at guidance 3.0 (another batch key) must be answered within the bound
   max_wait + (STARVATION_BATCHES + 2) x mean batch: the wait after which it goes first, the batch
   running at that moment, and its own batch;
3. concepts: uploads whose token is a substring of ordinary words ("ircl"), a real word or not of
   the <name> shape are refused; a good one is served; "a blue circle on grass" is the same bytes
   before, with and after it.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_hostile.py \
        --out benchmarks/results/serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from compinv_rt.apps.serve.batcher import STARVATION_BATCHES
from compinv_rt.apps.serve.run import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import rss_mb  # noqa: E402  (the load benchmark's RSS reader, a sibling script)

CLI = [sys.executable, "-m", "compinv_rt.apps.cli"]
TOKEN = "hostile-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 1 << 20




class Sampler(threading.Thread):
    """The server's RSS every 50 ms while running."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self):
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))


def bodies(url: str, n: int, size_mb: int, headers: dict, declared: bool, pid: int) -> dict:
    """n concurrent POSTs of size_mb each; what the client saw and the server's RSS."""
    chunk = b"x" * MB

    async def gen():
        for _ in range(size_mb):
            yield chunk

    async def one(client):
        h = {"content-type": "application/json", **headers}
        if declared:
            h["content-length"] = str(size_mb * MB)
        try:
            r = await client.post(f"{url}/v1/generate", content=gen(), headers=h)
            return str(r.status_code)
        except httpx.HTTPError as exc:  # the server answered and closed while we were sending
            return type(exc).__name__

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(n)))

    before = rss_mb(pid)
    sampler = Sampler(pid)
    sampler.start()
    t0 = time.monotonic()
    outcomes = asyncio.run(main())
    seconds = time.monotonic() - t0
    time.sleep(0.5)
    sampler.done.set()
    sampler.join()
    after = rss_mb(pid)
    return {"requests": n, "mb_each": size_mb, "declared_length": declared, "token": bool(headers),
            "outcomes": {o: outcomes.count(o) for o in set(outcomes)}, "seconds": round(seconds, 2),
            "rss_before_mb": round(before, 1), "rss_peak_mb": round(max(sampler.peak, after), 1),
            "rss_after_mb": round(after, 1),
            "growth_mb": round(max(sampler.peak, after) - before, 1)}


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def starvation(url: str, steps: int, clients: int, seconds: float, max_wait_ms: float) -> dict:
    """Closed-loop clients at guidance 7.5 for `seconds`; a guidance-3.0 request every so often."""
    stop = threading.Event()
    ok = [0]

    def loop(i):
        with httpx.Client(timeout=120, headers=AUTH) as c:
            seed = 1000 * i
            while not stop.is_set():
                seed += 1
                if c.post(f"{url}/v1/generate", json={"prompt": "a red star", "seed": seed,
                                                      "steps": steps}).status_code == 200:
                    ok[0] += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(min(10.0, seconds / 4))  # the load is on: batches are full
    rare = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/generate", headers=AUTH, timeout=120,
                       json={"prompt": "a blue circle", "seed": 7, "steps": steps, "guidance": 3.0})
        rare.append((r.status_code, round(time.monotonic() - t0, 2)))
        time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(150)
    mean = metric(url, "compinv_batch_seconds_sum") / metric(url, "compinv_batch_seconds_count")
    bound = max_wait_ms / 1000 + (STARVATION_BATCHES + 2) * mean  # + the running batch + its own
    worst = max(s for _, s in rare)
    return {"clients": clients, "steps": steps, "busy_requests_ok": ok[0],
            "rare_requests": rare, "mean_batch_s": round(mean, 2), "bound_s": round(bound, 2),
            "worst_rare_s": worst, "within_bound": all(c == 200 for c, _ in rare) and worst <= bound}


def make_concept(work: Path) -> Path:
    from compinv_rt.apps.world.photos import make_photos

    photos = work / "photos"
    make_photos(photos, count=3, size=64)
    out = work / "trained"
    subprocess.run([*CLI, "train", "--images", str(photos), "--token", "<my-heart>", "--class-word",
                    "heart", "--out", str(out), "--steps", "4", "--batch", "2", "--variants", "2",
                    "--device", "cpu", "--no-augment"], check=True, timeout=900,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def concepts(url: str, trained: Path) -> dict:
    emb = (trained / "embeddings.safetensors").read_bytes()
    art = json.loads((trained / "artifact.json").read_text())
    plain = {"prompt": "a blue circle on grass", "seed": 3, "steps": 10, "response": "png"}

    def image():
        return httpx.post(f"{url}/v1/generate", json=plain, headers=AUTH, timeout=120).content

    def put(name, token):
        a = {**art, "token": token, "tokens": [token] + [f"{token}_{i}" for i in range(1, art["vectors"])]}
        r = httpx.put(f"{url}/v1/concepts/{name}", headers=AUTH, timeout=60, files={
            "embeddings": ("e", emb), "artifact": ("a", json.dumps(a).encode())})
        return r.status_code, r.json().get("error", "")[:90]

    before = image()
    out: dict = {"uploads": {}}
    for name, token in (("innocent", "ircl"), ("word", "circle"), ("half", "<ircl"),
                        ("spaced", "<a b>"), ("good", "<my-heart>")):
        out["uploads"][token] = put(name, token)
    with_concept = image()
    used = httpx.post(f"{url}/v1/generate", headers=AUTH, timeout=120, json={
        "prompt": "a <my-heart> heart", "concepts": ["good"], "steps": 10})
    deleted = httpx.delete(f"{url}/v1/concepts/good", headers=AUTH).status_code
    after = image()
    out.update({"concept_request": used.status_code, "delete": deleted,
                "plain_same_with_concept_served": with_concept == before,
                "plain_same_after_delete": after == before,
                "reupload_same_token": put("good2", "<my-heart>")[0]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--starve-seconds", type=float, default=60)
    ap.add_argument("--skip-bodies", action="store_true", help="(for a server without body limits)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-hostile-"))
    result: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    trained = make_concept(work)
    (work / "token").write_text(TOKEN)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([*CLI, "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--token-file", str(work / "token"), "--concepts-dir", str(work / "concepts"),
                             "--max-batch", str(args.max_batch), "--max-wait-ms", "20",
                             "--queue-size", "64", "--timeout", "120", "--device", "cpu",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        httpx.post(f"{url}/v1/generate", headers=AUTH, timeout=120, json={"prompt": "warm", "steps": 2})
        result["rss_idle_mb"] = round(rss_mb(proc.pid), 1)
        if not args.skip_bodies:
            result["bodies"] = [bodies(url, 8, 200, {}, True, proc.pid),
                                bodies(url, 8, 200, AUTH, True, proc.pid),
                                bodies(url, 8, 200, AUTH, False, proc.pid)]
        result["concepts"] = concepts(url, trained)
        result["starvation"] = starvation(url, args.steps, args.clients, args.starve_seconds, 20)
        result["rss_end_mb"] = round(rss_mb(proc.pid), 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_hostile_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
