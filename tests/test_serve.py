"""`compinv-rt serve`: HTTP behaviour with a scripted engine (fast), and the real engine on the
tiny model (same seed = same image as `generate`, concept uploads)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from compinv_rt.apps.serve.app import create_app
from compinv_rt.apps.serve.batcher import Cancelled
from compinv_rt.apps.serve.run import ServerThread
from compinv_rt.apps.serve.settings import ServeSettings

TOKEN = "t" * 24


class ScriptedEngine:
    """Items are (prompt, seed); a batch can be held until `release` is set, `boom` prompts
    raise, and a held batch whose clients all left stops (as the real engine does per step)."""

    def __init__(self, hold: bool = False):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.stopped_early = threading.Event()
        if not hold:
            self.release.set()

    def describe(self):
        return {"model": {"path": "scripted", "hash": "0" * 64}, "backend": "scripted"}

    def plan(self, req):
        return [(req.prompt, req.seed + i) for i in range(req.n)], (req.steps,)

    def run(self, items, should_stop):
        self.batches.append(list(items))
        self.started.set()
        while not self.release.wait(0.01):
            if should_stop():
                self.stopped_early.set()
                raise Cancelled()
        if any(p == "boom" for p, _ in items):
            raise RuntimeError("the UNet exploded")
        return [(b"\x89PNG", {"prompt": p, "seed": s}, len(items)) for p, s in items]

    def list_concepts(self):
        return []

    def add_concept(self, name, files):
        raise ValueError("scripted engine")

    def remove_concept(self, name):
        raise KeyError(name)


def _server(engine, **settings):
    return ServerThread(create_app(engine, ServeSettings(**settings)))


def _post_in_thread(url, body, results, key, timeout=30.0, headers=None):
    def go():
        try:
            results[key] = httpx.post(url, json=body, timeout=timeout, headers=headers)
        except httpx.HTTPError as exc:
            results[key] = exc
    t = threading.Thread(target=go)
    t.start()
    return t


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _depth(srv):
    return srv.app.state.batcher.depth


def test_schema_errors_are_400_with_one_message():
    with _server(ScriptedEngine()) as srv:
        url = f"{srv.url}/v1/generate"
        cases = [
            ({"prompt": "a cat", "promt": "x"}, "promt: unknown field"),
            ({"prompt": "a cat", "steps": "25"}, "steps: Input should be a valid integer"),
            ({"prompt": "a cat", "n": 99}, "n: Input should be less than or equal to 4"),
            ({"prompt": "a cat", "steps": 1000}, "steps: Input should be less than or equal to 100"),
            ({"prompt": "a cat", "concepts": ["../../etc"]}, "invalid concept name '../../etc'"),
            ({"prompt": "a cat", "concepts": ["a/b"]}, "not a path"),
            ({"prompt": "   "}, "prompt: String should match pattern"),
            ({"prompt": "a cat", "n": True}, "n: Input should be a valid integer"),
            ({}, "prompt: Field required"),
            ({"prompt": "a cat", "n": 2, "response": "png"}, "response=png returns one image"),
        ]
        for body, message in cases:
            r = httpx.post(url, json=body)
            assert r.status_code == 400, (body, r.text)
            assert set(r.json()) == {"error"} and message in r.json()["error"], (body, r.text)
        r = httpx.post(url, content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        r = httpx.get(f"{srv.url}/openapi.json")
        schema = r.json()["components"]["schemas"]["GenerateRequest"]
        assert schema["properties"]["n"]["maximum"] == 4 and schema["additionalProperties"] is False


def test_compatible_requests_share_a_batch_and_others_do_not():
    engine = ScriptedEngine(hold=True)
    with _server(engine, max_batch=4, max_wait_ms=50) as srv:
        url, results = f"{srv.url}/v1/generate", {}
        first = _post_in_thread(url, {"prompt": "warm-up", "steps": 5}, results, "w")
        engine.started.wait(10)  # the worker is busy: the next requests queue up together
        threads = [_post_in_thread(url, {"prompt": f"p{i}", "seed": i, "steps": 5}, results, i)
                   for i in range(3)]
        threads.append(_post_in_thread(url, {"prompt": "other", "steps": 7}, results, "other"))
        _wait(lambda: _depth(srv) == 4)
        engine.release.set()
        for t in [first, *threads]:
            t.join(30)
    sizes = sorted(len(b) for b in engine.batches)
    assert sizes == [1, 1, 3], engine.batches  # warm-up; p0-p2 together; 'other' (7 steps) alone
    assert all(results[i].json()["batch_sizes"] == [3] for i in range(3))
    assert results[1].json()["images"][0]["sidecar"] == {"prompt": "p1", "seed": 1}


def test_full_queue_answers_503_with_retry_after():
    engine = ScriptedEngine(hold=True)
    with _server(engine, max_batch=1, queue_size=2, max_wait_ms=0) as srv:
        url, results = f"{srv.url}/v1/generate", {}
        running = _post_in_thread(url, {"prompt": "a"}, results, "running")
        engine.started.wait(10)
        queued = _post_in_thread(url, {"prompt": "b", "n": 2}, results, "queued")
        _wait(lambda: _depth(srv) == 2)
        r = httpx.post(url, json={"prompt": "c"})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "queue is full" in r.json()["error"]
        engine.release.set()
        running.join(30)
        queued.join(30)
        assert results["running"].status_code == 200 and results["queued"].status_code == 200
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert "compinv_rejected_total 1.0" in metrics


def test_client_disconnect_cancels_queued_and_running_work():
    engine = ScriptedEngine(hold=True)
    with _server(engine, max_batch=1, max_wait_ms=0) as srv:
        url, results = f"{srv.url}/v1/generate", {}
        # The running batch's only client leaves: the engine is told to stop between steps.
        t1 = _post_in_thread(url, {"prompt": "running"}, results, 1, timeout=1.5)
        engine.started.wait(10)
        # A queued request whose client leaves (before the running one's) never reaches the engine.
        t2 = _post_in_thread(url, {"prompt": "queued"}, results, 2, timeout=0.3)
        t2.join(10)
        t1.join(10)
        assert isinstance(results[1], httpx.TimeoutException)
        assert engine.stopped_early.wait(10), "the abandoned running batch was not stopped"
        engine.release.set()
        r = httpx.post(url, json={"prompt": "after"}, timeout=30)
        assert r.status_code == 200
        assert [b[0][0] for b in engine.batches] == ["running", "after"]  # 'queued' never ran
        assert "compinv_cancelled_images_total 2.0" in httpx.get(f"{srv.url}/metrics").text


def test_request_timeout_is_504():
    engine = ScriptedEngine(hold=True)
    with _server(engine, timeout_s=0.3) as srv:
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "slow"}, timeout=30)
        engine.release.set()
    assert r.status_code == 504 and "timeout" in r.json()["error"]


def test_failing_batch_fails_its_requests_with_500_not_the_server():
    with _server(ScriptedEngine()) as srv:
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "boom"})
        # The exception's type, not its text (which may hold server paths): that is in the log.
        assert r.status_code == 500 and "RuntimeError" in r.json()["error"]
        assert r.headers["x-request-id"] in r.json()["error"]
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "fine"})
        assert r.status_code == 200
        assert "compinv_batch_errors_total 1.0" in httpx.get(f"{srv.url}/metrics").text


def test_graceful_shutdown_finishes_in_flight_requests():
    engine = ScriptedEngine(hold=True)
    srv = _server(engine).start()
    results = {}
    t = _post_in_thread(f"{srv.url}/v1/generate", {"prompt": "in flight"}, results, "r")
    engine.started.wait(10)
    url = srv.url
    srv.server.should_exit = True  # what SIGTERM does
    time.sleep(0.3)
    engine.release.set()
    t.join(30)
    srv.thread.join(30)
    assert results["r"].status_code == 200
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_token_required_off_localhost():
    from compinv_rt.core.errors import ConfigError

    for host in ("0.0.0.0", "192.168.1.20", "::"):
        with pytest.raises(ConfigError, match="without a token"):
            ServeSettings(host=host).checked()
    ServeSettings(host="0.0.0.0", token=TOKEN).checked()
    ServeSettings(host="127.0.0.1").checked()
    ServeSettings(host="localhost").checked()
    from typer.testing import CliRunner

    from compinv_rt.apps.cli import app

    res = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", "/nonexistent"])
    assert res.exit_code == 1 and "refusing to listen on 0.0.0.0 without a token" in res.stderr
    with _server(ScriptedEngine(), token=TOKEN) as srv:
        url = f"{srv.url}/v1/generate"
        assert httpx.post(url, json={"prompt": "a"}).status_code == 401
        assert httpx.post(url, json={"prompt": "a"},
                          headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        ok = httpx.post(url, json={"prompt": "a"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        assert httpx.get(f"{srv.url}/health").status_code == 200  # liveness needs no token


# --- the real engine on the tiny model ------------------------------------------------------

def _pixels_png(data: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture
def served(tiny_model, trained, tmp_path):
    """A real engine on the tiny model with the trained concept served as 'heart'."""
    import shutil

    from compinv_rt.apps.serve.engine import SessionEngine
    from compinv_rt.generate.session import GenerationSession, SessionOptions

    concepts = tmp_path / "concepts"
    shutil.copytree(trained.out, concepts / "heart")
    session = GenerationSession.open(SessionOptions(model=str(tiny_model), device="cpu", max_batch=3))
    return SessionEngine(session, concepts)


def _post_all(url, bodies):
    results = {}
    threads = [_post_in_thread(url, b, results, i, timeout=120) for i, b in enumerate(bodies)]
    for t in threads:
        t.join(150)
    return [results[i] for i in range(len(bodies))]


@pytest.mark.slow  # trains the concept fixture
def test_same_seed_gives_the_same_image_as_generate_whatever_the_batch(served, tiny_model, tmp_path):
    import base64

    from typer.testing import CliRunner

    from compinv_rt.apps.cli import app

    heart = "photo of a <my-heart> heart on grass"
    bodies = [
        {"prompt": "a red star on grass", "seed": 7, "steps": 4},
        {"prompt": heart, "seed": 2, "steps": 4, "concepts": ["heart"], "negative_prompt": "blue"},
        {"prompt": "a blue circle", "seed": 11, "steps": 4, "n": 1},
    ]
    # max-wait is long: the batch leaves when it is full, so all three share one UNet batch.
    with ServerThread(create_app(served, ServeSettings(max_batch=3, max_wait_ms=5000))) as srv:
        responses = _post_all(f"{srv.url}/v1/generate", bodies)
        png = httpx.post(f"{srv.url}/v1/generate", timeout=120, json={
            "prompt": "a red star on grass", "seed": 7, "steps": 4, "response": "png"})
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.json()["batch_sizes"] == [3]
    runner = CliRunner()
    concept = str(served.concepts_dir / "heart")
    for body, r in zip(bodies, responses):
        out = tmp_path / f"gen{body['seed']}"
        args = ["generate", body["prompt"], "--model", str(tiny_model), "--out", str(out), "-n", "1",
                "--seed", str(body["seed"]), "--steps", "4", "--device", "cpu",
                "--negative-prompt", body.get("negative_prompt", "")]
        if body.get("concepts"):
            args += ["--concept", concept]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        ref = next(p for p in out.glob(f"*_{body['seed']}.png"))
        got = r.json()["images"][0]
        assert abs(_pixels_png(base64.b64decode(got["png_base64"])) -
                   _pixels_png(ref.read_bytes())).max() <= 1
        want = __import__("json").loads(ref.with_suffix(".json").read_text())
        for k in ("prompt", "negative_prompt", "seed", "settings", "image"):
            assert got["sidecar"][k] == want[k], k
        # The server names its model and concepts instead of showing its paths.
        assert got["sidecar"]["model"] == {"name": tiny_model.name, "hash": want["model"]["hash"]}
        assert got["sidecar"]["concepts"] == [{**{k: c[k] for k in ("token", "vectors")}, "name": "heart"}
                                              for c in want["concepts"]]
    # response=png: the bytes of the same image, batched alone this time; sidecar in a header
    assert png.headers["content-type"] == "image/png"
    assert abs(_pixels_png(png.content) -
               _pixels_png(base64.b64decode(responses[0].json()["images"][0]["png_base64"]))).max() <= 1
    assert __import__("json").loads(png.headers["X-Compinv-Sidecar"])["seed"] == 7


@pytest.mark.slow  # trains the concept fixture
def test_unknown_concepts_and_bad_layouts_are_400(served):
    with ServerThread(create_app(served, ServeSettings(max_wait_ms=0))) as srv:
        url = f"{srv.url}/v1/generate"
        for body, message in [
            ({"prompt": "a cat", "concepts": ["nope"]}, "unknown concept 'nope'"),
            ({"prompt": "a star", "layout": "star=0.1,0.1"}, "star"),
            ({"prompt": "a star", "layout": "star=0.5,0.5,0.1,0.1"}, "star"),
            ({"prompt": "a star", "layout": "moon=0.1,0.1,0.5,0.5", "steps": 2}, "moon"),
            ({"prompt": "a star", "height": 100}, "multiple of"),
        ]:
            r = httpx.post(url, json=body, timeout=60)
            assert r.status_code == 400 and message in r.json()["error"], (body, r.text)


@pytest.mark.slow  # trains the concept fixture
def test_bad_uploads_are_refused_and_the_concept_list_is_unchanged(served, trained, tmp_path):
    import hashlib
    import json

    emb = (trained.out / "embeddings.safetensors").read_bytes()
    art = json.loads((trained.out / "artifact.json").read_text())
    other_model = {**art, "base_model": {**art["base_model"], "hash": "f" * 64}}
    flipped = bytearray(emb)
    flipped[-3] ^= 0xFF

    def files(e, a):
        return {"embeddings": ("embeddings.safetensors", bytes(e)),
                "artifact": ("artifact.json", a if isinstance(a, bytes) else json.dumps(a).encode())}

    settings = ServeSettings(max_wait_ms=0, upload_max_bytes=len(emb) + 4096)
    with ServerThread(create_app(served, settings)) as srv:
        base = f"{srv.url}/v1/concepts"
        before = httpx.get(base).json()
        assert [c["name"] for c in before["concepts"]] == ["heart"]
        cases = [
            ("h2", files(flipped, art), 400, "does not match the hash"),
            ("h2", files(emb, other_model), 400, "another base model"),
            ("h2", files(emb, b"{not json"), 400, "not valid JSON"),
            ("h2", files(b"not safetensors", {**art, "files": {}}), 400, "must list embeddings"),
            ("h2", files(b"not safetensors", {**art, "files": {  # the hash matches the garbage
                "embeddings.safetensors": hashlib.sha256(b"not safetensors").hexdigest()}}),
             400, "corrupt embedding"),
            ("h2", {"embeddings": ("e", emb)}, 400, "lacks the file 'artifact'"),
            ("h2", files(emb + b"\0" * 8192, art), 413, "limit"),
            ("..x", files(emb, art), 400, "invalid concept name"),
            ("%2E%2E%2Fx", files(emb, art), 404, "Not Found"),  # a slash never reaches the name
            ("heart", files(emb, art), 409, "already served"),
            ("h2", files(emb, art), 400, "already"),  # same token as 'heart'
        ]
        for name, upload, code, message in cases:
            r = httpx.put(f"{base}/{name}", files=upload)
            assert r.status_code == code and message in r.json()["error"], (name, r.text)
            assert httpx.get(base).json() == before
        assert sorted(p.name for p in served.concepts_dir.iterdir()) == ["heart"]  # no leftovers
        # Removing it: gone from the list, the folder and requests.
        assert httpx.delete(f"{base}/heart").status_code == 204
        assert httpx.get(base).json() == {"concepts": []}
        assert httpx.delete(f"{base}/heart").status_code == 404
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a <my-heart>", "concepts": ["heart"]})
        assert r.status_code == 400 and "unknown concept" in r.json()["error"]


@pytest.mark.slow  # trains the concept fixture
def test_an_uploaded_concept_is_live_without_restart(tiny_model, trained, tmp_path):
    from compinv_rt.apps.serve.engine import SessionEngine
    from compinv_rt.generate.session import GenerationSession, SessionOptions

    session = GenerationSession.open(SessionOptions(model=str(tiny_model), device="cpu"))
    engine = SessionEngine(session, tmp_path / "concepts")
    with ServerThread(create_app(engine, ServeSettings(max_wait_ms=0))) as srv:
        body = {"prompt": "photo of a <my-heart> heart", "seed": 1, "steps": 3, "concepts": ["mine"]}
        assert httpx.post(f"{srv.url}/v1/generate", json=body, timeout=60).status_code == 400
        r = httpx.put(f"{srv.url}/v1/concepts/mine", files={
            "embeddings": ("e", (trained.out / "embeddings.safetensors").read_bytes()),
            "artifact": ("a", (trained.out / "artifact.json").read_bytes())})
        assert r.status_code == 201 and r.json()["token"] == "<my-heart>", r.text
        r = httpx.post(f"{srv.url}/v1/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["images"][0]["sidecar"]["concepts"][0]["token"] == "<my-heart>"
        assert "compinv_concepts 1.0" in httpx.get(f"{srv.url}/metrics").text


@pytest.mark.parametrize("starvation_batches, first", [(1000, "A"), (0, "B")])
def test_batcher_prefers_full_batches_but_never_starves_a_key(starvation_batches, first, monkeypatch):
    """After a busy batch: B1 (oldest), A1, A2 wait. Normally the larger group (A) goes first;
    once B1 has waited more than STARVATION_BATCHES batch times, B goes first."""
    import asyncio

    from compinv_rt.apps.serve import batcher
    from compinv_rt.apps.serve.batcher import Batcher

    monkeypatch.setattr(batcher, "STARVATION_BATCHES", starvation_batches)
    gate, ran = threading.Event(), []

    def run(items, should_stop):
        ran.append([k for k, _ in items])
        gate.wait(10)
        return list(items)

    async def scenario():
        b = Batcher(run, max_batch=3, max_wait_s=0.0, capacity=10)
        b.start()
        busy = b.submit([("X", 0)], "X")
        await asyncio.sleep(0.05)
        futures = b.submit([("B", 1)], "B") + b.submit([("A", 1), ("A", 2)], "A")
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.gather(*busy, *futures)
        await b.close()

    asyncio.run(scenario())
    assert ran[0] == ["X"] and ran[1][0] == first and sorted(map(len, ran[1:])) == [1, 2]


class _FakeLoop:
    """The step-loop API of SessionEngine over a fake loop: each item takes `steps` steps of
    `step_s` seconds; `sizes` records the images in each step."""

    def __init__(self, max_batch: int, steps: int, step_s: float):
        self.max_batch, self.steps, self.step_s = max_batch, steps, step_s
        self.active: list = []
        self.sizes: list[int] = []

    def steppable(self, key):
        return True

    def room(self, item):
        return len(self.active) < self.max_batch

    def admit(self, item):
        from types import SimpleNamespace

        slot = SimpleNamespace(item=item, done=0, total=self.steps)
        self.active.append(slot)
        return slot

    def step(self):
        time.sleep(self.step_s)
        self.sizes.append(len(self.active))
        for slot in self.active:
            slot.done += 1
        finished = [s for s in self.active if s.done >= s.total]
        self.active = [s for s in self.active if s.done < s.total]
        return finished

    def result(self, slot):
        return slot.item

    def drop(self, slot):
        if slot in self.active:
            self.active.remove(slot)


def _step_batcher_run(max_wait_s: float, arrivals: list[float], max_batch: int = 4, steps: int = 3,
                      step_s: float = 0.05, close_at_once: bool = False):
    """Item k is submitted `arrivals[k]` s after the start; returns (fake loop, each item's queue
    wait, the run's seconds)."""
    import asyncio

    from compinv_rt.apps.serve.step_batcher import StepBatcher

    engine, waits = _FakeLoop(max_batch, steps, step_s), []

    async def scenario():
        b = StepBatcher(engine, max_batch, capacity=16, max_wait_s=max_wait_s, on_admit=waits.append)
        b.start()
        start, futures = time.monotonic(), []
        for k, at in enumerate(arrivals):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            futures += b.submit([k], key="k")
        if close_at_once:
            await b.close()
        assert await asyncio.gather(*futures) == list(range(len(arrivals)))
        await b.close()

    started = time.monotonic()
    asyncio.run(scenario())
    return engine, waits, time.monotonic() - started


def test_an_idle_step_loop_waits_max_wait_for_company_a_running_one_never():
    """--max-wait-ms on the step loop: an idle loop's first request waits for company (so two
    requests 0.1 s apart start at the same step); a running loop admits at the next step."""
    engine, waits, _ = _step_batcher_run(1.0, [0.0, 0.1])
    assert engine.sizes[0] == 2 and waits[0] >= 1.0  # nothing more came: it waited max_wait
    engine, waits, _ = _step_batcher_run(0.0, [0.0, 0.3])  # 0: the loop starts at once
    assert engine.sizes[0] == 1 and waits[0] < 0.3
    # max_batch items queued: no reason to wait
    engine, waits, seconds = _step_batcher_run(30.0, [0.0, 0.0], max_batch=2)
    assert engine.sizes[0] == 2 and seconds < 10
    # the second arrives while the first's loop runs: admitted at the next step, not max_wait later
    engine, waits, _ = _step_batcher_run(1.0, [0.0, 1.4], steps=10, step_s=0.1)
    assert engine.sizes[0] == 1 and waits[0] >= 1.0 and waits[1] < 0.5
    _, _, seconds = _step_batcher_run(30.0, [0.0], close_at_once=True)  # closing: no more waiting
    assert seconds < 10


@pytest.mark.slow  # starts a local Ray cluster
def test_ray_serve_replicas_serve_the_same_app(tiny_model, tmp_path):
    import ray
    from ray import serve

    from compinv_rt.apps.serve.ray_serve import run_ray_serve
    from compinv_rt.apps.serve.run import free_port
    from compinv_rt.generate.session import SessionOptions

    port = free_port()
    settings = ServeSettings(port=port, max_wait_ms=0, concepts_dir=tmp_path / "concepts")
    options = SessionOptions(model=str(tiny_model), device="cpu", max_batch=2,
                             engines_root=tmp_path / "engines")
    try:
        run_ray_serve(options, settings, replicas=1, cpus_per_replica=0.5, blocking=False)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=60).json()["status"] == "ok"
        # A local cluster behind a loopback --host binds its ports to loopback (issue 27).
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a red star", "steps": 2, "seed": 3},
                       timeout=120)
        assert r.status_code == 200 and r.json()["images"][0]["sidecar"]["seed"] == 3
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a red star", "n": 99}, timeout=60)
        assert r.status_code == 400 and "n:" in r.json()["error"]
    finally:
        serve.shutdown()
        ray.shutdown()


def test_adaptive_spatial_request_matches_generate(tiny_model, tmp_path):
    """The serve API offers every spatial mode generate has; adaptive uses the mode's own defaults."""
    import base64

    from typer.testing import CliRunner

    from compinv_rt.apps.cli import app
    from compinv_rt.apps.serve.engine import SessionEngine
    from compinv_rt.generate.session import GenerationSession, SessionOptions

    session = GenerationSession.open(SessionOptions(model=str(tiny_model), device="cpu", max_batch=2))
    engine = SessionEngine(session, tmp_path / "concepts")
    layout = "star=0.05,0.1,0.5,0.9"
    body = {"prompt": "a red star on grass", "seed": 3, "steps": 4, "layout": layout, "spatial": "adaptive"}
    with ServerThread(create_app(engine, ServeSettings(max_batch=2, max_wait_ms=10))) as srv:
        r = httpx.post(f"{srv.url}/v1/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = r.json()["images"][0]
    assert got["sidecar"]["spatial"]["mode"] == "adaptive"
    out = tmp_path / "gen"
    res = CliRunner().invoke(app, ["generate", body["prompt"], "--model", str(tiny_model), "--out", str(out),
                                   "-n", "1", "--seed", "3", "--steps", "4", "--device", "cpu",
                                   "--layout", layout, "--spatial", "adaptive"])
    assert res.exit_code == 0, res.output
    ref = next(out.glob("*_3.png"))
    assert abs(_pixels_png(base64.b64decode(got["png_base64"])) - _pixels_png(ref.read_bytes())).max() <= 1
    want = __import__("json").loads(ref.with_suffix(".json").read_text())
    assert got["sidecar"]["spatial"] == want["spatial"]
