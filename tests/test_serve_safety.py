"""Issue 27: serve safety. One test (or more) per defect found by attacking `compinv-rt serve` as a
hostile client: concepts leaking into other requests, pre-auth memory, starvation, unbounded
requests, names and folders, Retry-After, and the smaller ones (paths, logs, Host, OpenAPI, NaN).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time

import httpx
import pytest
from test_serve import TOKEN, ScriptedEngine, _pixels_png

from compinv_rt.apps.serve.app import create_app
from compinv_rt.apps.serve.run import ServerThread
from compinv_rt.apps.serve.settings import ServeSettings

# --- 1. concepts are per request --------------------------------------------------------------


def _engine(tiny_model, concepts_dir):
    from compinv_rt.apps.serve.engine import SessionEngine
    from compinv_rt.generate.session import GenerationSession, SessionOptions

    session = GenerationSession.open(SessionOptions(model=str(tiny_model), device="cpu", max_batch=2))
    return SessionEngine(session, concepts_dir)


def _upload(url, folder, name):
    return httpx.put(f"{url}/v1/concepts/{name}", timeout=60, files={
        "embeddings": ("e", (folder / "embeddings.safetensors").read_bytes()),
        "artifact": ("a", (folder / "artifact.json").read_bytes())})


def _retokened(trained, tmp_path, token):
    """The trained concept under another token (artifact.json hashes only the embeddings)."""
    out = tmp_path / f"concept-{token.strip('<>')}"
    shutil.copytree(trained.out, out)
    art = json.loads((out / "artifact.json").read_text())
    art["token"], art["tokens"] = token, [token] + [f"{token}_{i}" for i in range(1, art["vectors"])]
    (out / "artifact.json").write_text(json.dumps(art))
    return out


PLAIN = {"prompt": "a blue circle on grass", "seed": 3, "steps": 3, "response": "png"}


@pytest.mark.slow  # trains the concept fixture
def test_a_concept_never_changes_another_request_and_delete_leaves_no_trace(
        tiny_model, trained, tmp_path):
    """Defect 1: a concept whose token is a substring of ordinary words ("ircl" in "circle") is
    refused; a served concept changes no other request's image, and after DELETE every image is
    bit for bit what a fresh server makes; its token can be uploaded again at once."""
    with ServerThread(create_app(_engine(tiny_model, tmp_path / "fresh"),
                                 ServeSettings(max_wait_ms=0))) as srv:
        fresh = httpx.post(f"{srv.url}/v1/generate", json=PLAIN, timeout=60).content
    with ServerThread(create_app(_engine(tiny_model, tmp_path / "concepts"),
                                 ServeSettings(max_wait_ms=0))) as srv:
        url = srv.url
        r = _upload(url, _retokened(trained, tmp_path, "ircl"), "innocent")
        assert r.status_code == 400 and "reserved shape" in r.json()["error"], r.text
        assert httpx.post(f"{url}/v1/generate", json=PLAIN, timeout=60).content == fresh
        assert _upload(url, trained.out, "heart").status_code == 201
        mine = {"prompt": "a <my-heart> heart", "seed": 3, "steps": 3, "concepts": ["heart"]}
        assert httpx.post(f"{url}/v1/generate", json=mine, timeout=60).status_code == 200
        assert httpx.post(f"{url}/v1/generate", json=PLAIN, timeout=60).content == fresh
        # A prompt may not use a token of a concept it does not name (it would be read as text).
        r = httpx.post(f"{url}/v1/generate", json={**mine, "concepts": []}, timeout=60)
        assert r.status_code == 400 and "<my-heart>" in r.json()["error"]
        assert httpx.delete(f"{url}/v1/concepts/heart").status_code == 204
        assert httpx.post(f"{url}/v1/generate", json=PLAIN, timeout=60).content == fresh
        # Nothing of it lingers: the same token may come back under another name.
        assert _upload(url, trained.out, "heart2").status_code == 201


@pytest.mark.slow  # trains the concept fixture
def test_the_session_tokenizer_knows_a_concept_only_inside_its_batch(tiny_model, trained):
    """The root cause of defect 1: one tokenizer that every concept joined for good."""
    import torch

    from compinv_rt.generate.session import GenerationSession, Request, SessionOptions
    from compinv_rt.sampling.pipeline import SamplingConfig

    session = GenerationSession.open(SessionOptions(model=str(tiny_model), device="cpu"))
    tok = session.model.tokenizer
    base_len = len(tok)
    table = session.model.text_encoder.get_input_embeddings().weight.detach().clone()
    steps = SamplingConfig(steps=2)
    plain = Request("a blue circle", seed=1, sampling=steps)
    first = session.run_batch(session.tasks(plain))[0].image.tobytes()
    with_concept = Request("a <my-heart> heart", seed=1, sampling=steps, concepts=(str(trained.out),))
    both = session.run_batch([*session.tasks(with_concept), *session.tasks(plain)])
    assert len(both) == 2
    assert len(tok) == base_len and len(tok.tokenize("<my-heart>")) > 1  # gone after the batch
    now = session.model.text_encoder.get_input_embeddings().weight
    assert torch.equal(now[:base_len], table[:base_len]) and not now[base_len:].any()
    assert session.run_batch(session.tasks(plain))[0].image.tobytes() == first
    # Batched with a concept: the same image (up to batch-size rounding, as `generate` promises).
    import numpy as np

    diff = np.asarray(both[1].image, np.int16) - np.asarray(session.run_batch(session.tasks(plain))[0].image,
                                                            np.int16)
    assert abs(diff).max() <= 1


@pytest.mark.slow  # trains the concept fixture
def test_jobs_see_only_their_own_concepts(tiny_model, trained, tmp_path):
    """Defect 1 in `generate --jobs`: a concept of one job changes no other job's image."""
    from typer.testing import CliRunner

    from compinv_rt.apps.cli import app

    bad = _retokened(trained, tmp_path, "ircl")
    lines = [{"id": "plain", "prompt": "a blue circle on grass", "seed": 4},
             {"id": "sub", "prompt": "a ircl heart", "seed": 5, "concepts": [str(bad)]},
             {"id": "mine", "prompt": "a <my-heart> heart", "seed": 6, "concepts": [str(trained.out)]}]
    outs = {}
    for name, jobs in (("alone", lines[:1]), ("mixed", lines)):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("\n".join(json.dumps(j) for j in jobs))
        outs[name] = tmp_path / f"out-{name}"
        res = CliRunner().invoke(app, ["generate", "--jobs", str(f), "--model", str(tiny_model),
                                       "--steps", "2", "--max-batch", "3", "--device", "cpu",
                                       "--out", str(outs[name])])
        assert res.exit_code == (0 if name == "alone" else 1), res.output
    assert "reserved shape" in (outs["mixed"] / "failures.jsonl").read_text()
    assert (outs["mixed"] / "mine_000.png").exists()
    # Equal up to batch-size rounding (<= 1/255; an "ircl" that reached it differed by ~200).
    assert abs(_pixels_png((outs["mixed"] / "plain_000.png").read_bytes()) -
               _pixels_png((outs["alone"] / "plain_000.png").read_bytes())).max() <= 1


# --- 2. no pre-auth memory: token and size checked before the body is read ----------------------

async def _asgi(app, method, path, headers, chunks):
    """Call the ASGI app directly; returns (status, chunks of the body it pulled)."""
    pulled, sent = [0], []

    async def receive():
        if pulled[0] < len(chunks):
            pulled[0] += 1
            return {"type": "http.request", "body": chunks[pulled[0] - 1],
                    "more_body": pulled[0] < len(chunks)}
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in
                         {"host": "127.0.0.1:8000", **headers}.items()]}
    await asyncio.wait_for(app(scope, receive, send), 30)
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), pulled[0]


MB = b"x" * (1 << 20)


def test_no_body_is_read_before_the_token_and_size_checks():
    """Defect 2: a 100 MB body without a token is answered 401 without reading it; with the token,
    a declared or chunked body over the limit is a 413 after at most the limit."""
    app = create_app(ScriptedEngine(), ServeSettings(token=TOKEN))
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    status, pulled = asyncio.run(_asgi(app, "POST", "/v1/generate", {}, [MB] * 100))
    assert (status, pulled) == (401, 0)
    status, pulled = asyncio.run(_asgi(app, "POST", "/v1/generate",
                                       {**auth, "content-length": str(100 << 20)}, [MB] * 100))
    assert (status, pulled) == (413, 0)
    status, pulled = asyncio.run(_asgi(app, "POST", "/v1/generate", auth, [MB] * 100))  # chunked
    assert status == 413 and pulled <= 1
    status, pulled = asyncio.run(_asgi(app, "PUT", "/v1/concepts/x", {}, [MB] * 100))
    assert (status, pulled) == (401, 0)


# --- 3. the starvation bound holds under load ----------------------------------------------------

def test_an_old_item_goes_before_full_batches_of_another_key(monkeypatch):
    """Defect 3: with a full batch of A always waiting, B (waited past the bound) still goes next."""
    from compinv_rt.apps.serve import batcher
    from compinv_rt.apps.serve.batcher import Batcher

    monkeypatch.setattr(batcher, "STARVATION_BATCHES", 0)  # the bound: max_wait (0) + 0 batches
    gate, ran = threading.Event(), []

    def run(items, should_stop):
        ran.append([k for k, _ in items])
        gate.wait(10)
        return list(items)

    async def scenario():
        b = Batcher(run, max_batch=2, max_wait_s=0.0, capacity=20)
        b.start()
        busy = b.submit([("X", 0)], "X")
        await asyncio.sleep(0.05)
        futures = b.submit([("B", 1)], "B")
        for i in range(4):
            futures += b.submit([("A", i)], "A")
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.gather(*busy, *futures)
        await b.close()

    asyncio.run(scenario())
    assert ran == [["X"], ["B"], ["A", "A"], ["A", "A"]]


# --- 4. bounded requests; a timed-out request leaves the worker at the next step ------------------

def test_a_request_over_the_cost_limit_is_refused(tiny_model, tmp_path):
    """Defect 4: 1024x1024 at 100 steps is within the size and step limits, but its cost is not."""
    from compinv_rt.apps.serve.schemas import generate_request_model
    from compinv_rt.apps.serve.settings import Limits

    engine = _engine(tiny_model, tmp_path / "concepts")
    body = generate_request_model(Limits()).model_validate(
        {"prompt": "a red star", "height": 1024, "width": 1024, "steps": 100})
    with pytest.raises(Exception, match="cost"):
        engine.plan(body)
    engine.plan(generate_request_model(Limits()).model_validate({"prompt": "a red star", "n": 4}))


class SteppingEngine(ScriptedEngine):
    """Each item runs `steps` steps of 20 ms, checking should_stop between steps like the real one."""

    def __init__(self):
        super().__init__()
        self.steps_run = 0

    def plan(self, req):
        return [(req.prompt, req.seed)], (req.steps,)

    def run(self, items, should_stop):
        from compinv_rt.apps.serve.batcher import Cancelled

        for _ in range(items[0][1] if items[0][0] == "long" else 1):
            if should_stop():
                raise Cancelled()
            time.sleep(0.02)
            self.steps_run += 1
        return [(b"png", {}, len(items)) for _ in items]


def test_a_timed_out_request_frees_the_worker_at_the_next_step():
    engine = SteppingEngine()
    with _server(engine, timeout_s=0.5, max_wait_ms=0) as srv:
        url = f"{srv.url}/v1/generate"
        started = time.monotonic()
        r = httpx.post(url, json={"prompt": "long", "seed": 1000}, timeout=30)  # 20 s of steps
        assert r.status_code == 504
        ok = httpx.post(url, json={"prompt": "short"}, timeout=30)
        assert ok.status_code == 200 and time.monotonic() - started < 3
    assert engine.steps_run < 100


# --- 5, 6. names, start-up, atomic delete ---------------------------------------------------------

def test_names_are_matched_whole():
    from compinv_rt.apps.serve.schemas import check_concept_name

    for bad in ("abc\n", "abc\n\n", "a b", ".hidden", "x" * 65):
        with pytest.raises(ValueError, match="invalid concept name"):
            check_concept_name(bad)
    assert check_concept_name("abc") == "abc"
    with _server(ScriptedEngine()) as srv:
        r = httpx.put(f"{srv.url}/v1/concepts/abc%0A", files={"embeddings": ("e", b"x"),
                                                              "artifact": ("a", b"{}")})
        assert r.status_code == 400 and "invalid concept name" in r.json()["error"]


def test_start_up_skips_bad_folders_and_removes_leftovers(tiny_model, tmp_path, caplog):
    """Defect 5/6: a folder with an invalid name, a broken concept, an interrupted upload and an
    interrupted delete: the server starts, serves nothing of them, and clears the leftovers."""
    concepts = tmp_path / "concepts"
    for name in ("bad name", "abc\n", "broken", ".upload-x-1234abcd", ".trash-y-1234abcd"):
        (concepts / name).mkdir(parents=True)
        (concepts / name / "artifact.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="compinv_rt.apps.serve"):
        engine = _engine(tiny_model, concepts)
    assert engine.list_concepts() == []
    assert sorted(p.name for p in concepts.iterdir()) == ["abc\n", "bad name", "broken"]
    assert sum("not serving concept folder" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.slow  # trains the concept fixture
def test_delete_is_atomic(tiny_model, trained, tmp_path, monkeypatch):
    """Defect 6: a delete that dies half-way (here: rmtree removes one file, then fails) leaves no
    half concept behind: the next start serves the others and removes the rest."""
    from compinv_rt.apps.serve import engine as engine_mod

    concepts = tmp_path / "concepts"
    shutil.copytree(trained.out, concepts / "heart")
    engine = _engine(tiny_model, concepts)
    assert [c["name"] for c in engine.list_concepts()] == ["heart"]

    def dies_half_way(path, ignore_errors=False):
        (path / "embeddings.safetensors").unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(engine_mod.shutil, "rmtree", dies_half_way)
    with pytest.raises(SystemExit):
        engine.remove_concept("heart")
    monkeypatch.undo()
    assert not (concepts / "heart").exists()
    assert _engine(tiny_model, concepts).list_concepts() == []
    assert list(concepts.iterdir()) == []


# --- 7. Retry-After ---------------------------------------------------------------------------------

def test_retry_after_ignores_fast_failing_batches():
    """Defect 7: five instant failures after one 0.4 s batch must not shrink the wait estimate."""
    from compinv_rt.apps.serve.batcher import Batcher

    def run(items, should_stop):
        if items[0] == "slow":
            time.sleep(0.4)
            return list(items)
        raise RuntimeError("fails at once")

    async def scenario():
        b = Batcher(run, max_batch=1, max_wait_s=0.0, capacity=10)
        b.start()
        await asyncio.gather(*b.submit(["slow"], "k"))
        mean = b._batch_seconds
        for _ in range(5):
            await asyncio.gather(*b.submit(["bad"], "k"), return_exceptions=True)
        await b.close()
        return mean, b._batch_seconds

    before, after = asyncio.run(scenario())
    assert after == before


# --- 8. the smaller ones ------------------------------------------------------------------------------

def _server(engine, **settings):
    return ServerThread(create_app(engine, ServeSettings(**settings)))


def test_no_server_paths_or_cli_flags_in_responses(tiny_model, tmp_path):
    engine = _engine(tiny_model, tmp_path / "concepts")
    root = str(tiny_model)
    with ServerThread(create_app(engine, ServeSettings(max_wait_ms=0))) as srv:
        health = httpx.get(f"{srv.url}/health").text
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a red star", "steps": 2}, timeout=60)
        bad = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a star", "height": 100})
    assert r.status_code == 200 and bad.status_code == 400
    sidecar = r.json()["images"][0]["sidecar"]
    assert sidecar["model"]["hash"] == engine.session.model.hash
    for text in (health, json.dumps(sidecar), bad.text):
        assert root not in text and str(tmp_path) not in text
    assert "--" not in bad.json()["error"] and "height" in bad.json()["error"]


def test_access_log_has_request_ids(caplog):
    with caplog.at_level(logging.INFO, logger="compinv_rt.apps.serve"), _server(ScriptedEngine()) as srv:
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a"})
        mine = httpx.get(f"{srv.url}/health", headers={"X-Request-ID": "client-id-1"})
    rid = r.headers["x-request-id"]
    assert mine.headers["x-request-id"] == "client-id-1"
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "compinv_rt.apps.serve.access"]
    assert any("POST /v1/generate" in ln and " 200 " in ln and rid in ln for ln in lines), lines
    assert any("client-id-1" in ln for ln in lines)


def test_host_header_allow_list_on_loopback_without_a_token():
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not reach the API."""
    with _server(ScriptedEngine()) as srv:
        assert httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a"}).status_code == 200
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a"}, headers={"Host": "evil.example"})
        assert r.status_code == 400
        assert httpx.get(f"{srv.url}/health", headers={"Host": "localhost:8000"}).status_code == 200
    with _server(ScriptedEngine(), token=TOKEN) as srv:  # with a token the token decides
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a"},
                       headers={"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200


def test_openapi_documents_400_not_422_and_nan_is_clear():
    with _server(ScriptedEngine()) as srv:
        schema = httpx.get(f"{srv.url}/openapi.json").json()
        codes = {c for path in schema["paths"].values() for op in path.values() for c in op["responses"]}
        assert "422" not in codes and "400" in codes
        for value in ("NaN", "Infinity"):
            r = httpx.post(f"{srv.url}/v1/generate", headers={"content-type": "application/json"},
                           content=f'{{"prompt": "a", "guidance": {value}}}'.encode())
            assert r.status_code == 400 and "finite" in r.json()["error"], r.text
