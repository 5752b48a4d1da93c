"""Step-level batching: the continuous loop (compinv_rt.generate.stepper) and the server on it.

An image must not depend on what else is in the loop or when it joined. On torch: bit for bit
against the same request alone and against the whole-batch loop at the same UNet row count, and
within 1/255 of plain `generate` (whose UNet batch has another row count: oneDNN's convolutions
round differently by batch size). On onnxruntime (CPU provider) a row's output does not depend on
the row count at all: bit for bit against plain `generate`, padded or not."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import torch

from compinv_rt.apps.serve.app import create_app
from compinv_rt.apps.serve.run import ServerThread
from compinv_rt.apps.serve.settings import ServeSettings


@pytest.fixture(scope="module")
def session(tiny_model):
    from compinv_rt.generate.session import GenerationSession, SessionOptions

    return GenerationSession.open(SessionOptions(model=str(tiny_model), device="cpu", max_batch=3))


@pytest.fixture(scope="module")
def ort_session(tiny_model, tmp_path_factory):
    """The tiny model on onnxruntime; its engine is exported once for this module."""
    from compinv_rt.generate.session import GenerationSession, SessionOptions

    return GenerationSession.open(SessionOptions(
        model=str(tiny_model), device="cpu", backend="onnxruntime", max_batch=3,
        engines_root=tmp_path_factory.mktemp("engines")))


def _requests(backend: str = "torch"):
    from compinv_rt.generate.requests import RequestSpec, build_request
    from compinv_rt.spatial.plan import SpatialOptions

    specs = [RequestSpec("a red star on grass", seed=3, steps=5),
             RequestSpec("a blue circle on sand", seed=5, steps=3, guidance=3.0, scheduler="euler"),
             RequestSpec("a red star on grass", seed=7, steps=4,
                         spatial=SpatialOptions(layout="star=0.05,0.1,0.5,0.9")),
             RequestSpec("a yellow square", seed=9, steps=4, scheduler="unipc", guidance_interval=(0.0, 0.6),
                         spatial=SpatialOptions(layout="square=0.1,0.1,0.6,0.6", mode="adaptive"))]
    return [build_request(s, backend=backend) for s in specs]


def _px(img) -> np.ndarray:
    return np.asarray(img.image, dtype=np.int16)


def test_images_do_not_depend_on_company_or_join_step(session):
    from compinv_rt.generate.stepper import StepLoop
    from compinv_rt.sampling.rows import FixedRows

    tasks = [session.tasks(r)[0] for r in _requests()]
    # 4 tasks, 3 places: the last waits for a place; the others join at steps 0, 2 and 1
    joined = StepLoop(session, 3).run(tasks, {1: 2, 2: 1})
    alone = [StepLoop(session, 3).run([t])[0] for t in tasks]
    size = session.check(tasks[0].request).size
    backend = session.unet(*size, True)
    try:  # the whole-batch loop (session.generate) at the loop's UNet row count
        for guided in (True, False):
            session._unets[(*size, guided, False)] = FixedRows(backend, 6)
        whole = [session.generate(t.request)[0] for t in tasks]
    finally:
        session._unets.pop((*size, False, False))
        session._unets[(*size, True, False)] = backend
    plain = [session.generate(t.request)[0] for t in tasks]
    for j, a, w, p in zip(joined, alone, whole, plain):
        assert np.array_equal(_px(j), _px(a)) and np.array_equal(_px(j), _px(w))
        assert np.abs(_px(j) - _px(p)).max() <= 1
        assert session.sidecar(j) == session.sidecar(p)


def test_run_admits_no_more_than_max_batch_per_step(session):
    """More tasks than places: each admission takes a place (the rest join as places free)."""
    from compinv_rt.generate.requests import RequestSpec, build_request
    from compinv_rt.generate.stepper import StepLoop

    sizes: list[int] = []
    loop = StepLoop(session, 3, on_step=lambda stats: sizes.append(stats.size))
    images = loop.run(session.tasks(build_request(RequestSpec("a red star", seed=1, n=5, steps=2))))
    assert [img.seed for img in images] == [1, 2, 3, 4, 5] and sizes == [3, 3, 2, 2]


def test_onnxruntime_images_equal_generate_bit_for_bit_whenever_they_join(ort_session):
    """The issue's check on onnxruntime: requests joining at steps 0, 1, 2 (and one waiting for a
    place), padded to 2 x max_batch rows or not, give plain `generate`'s bits and sidecars."""
    from compinv_rt.generate.stepper import StepLoop

    session = ort_session
    tasks = [session.tasks(r)[0] for r in _requests("onnxruntime")]
    joined = StepLoop(session, 3).run(tasks, {1: 2, 2: 1})
    unpadded = StepLoop(session, 3, fixed=False).run(tasks, {1: 2, 2: 1})
    plain = [session.generate(t.request)[0] for t in tasks]
    for j, u, p in zip(joined, unpadded, plain, strict=True):
        assert np.array_equal(_px(j), _px(p)) and np.array_equal(_px(u), _px(p))
        assert session.sidecar(j) == session.sidecar(p)
        assert session.sidecar(j)["backend"] == "onnxruntime"
    # Why: a row's noise prediction is the same at every row count (unlike torch on oneDNN)
    unet = session.unet(*session.check(tasks[0].request).size, True)
    g = torch.Generator().manual_seed(0)
    shapes = unet.spec.shapes(6)
    x, c = torch.randn(shapes["sample"], generator=g), torch.randn(shapes["encoder_hidden_states"], generator=g)
    t = torch.tensor([999.0, 500.0, 20.0, 1.0, 250.0, 750.0])
    alone = unet(x[:1], t[:1], c[:1])
    for rows in range(2, 7):
        assert torch.equal(unet(x[:rows], t[:rows], c[:rows])[:1], alone)


@pytest.mark.parametrize("name", ["ddim", "dpm", "dpm-karras", "unipc", "euler"])
def test_a_scheduler_steps_one_row_as_it_steps_it_in_a_batch(tiny_model, name):
    """What a per-sample scheduler relies on (diffusers' step math is per element)."""
    from compinv_rt.models.loading import inspect_model_dir
    from compinv_rt.sampling.schedulers import make_scheduler

    config = inspect_model_dir(tiny_model).scheduler_config
    g = torch.Generator().manual_seed(0)
    batch = make_scheduler(name, config)
    rows = [make_scheduler(name, config) for _ in range(3)]
    for s in (batch, *rows):
        s.set_timesteps(6)
    lat = torch.randn(3, 4, 8, 8, generator=g) * batch.init_noise_sigma
    each = list(lat.split(1))
    for t in batch.timesteps:
        noise = torch.randn(3, 4, 8, 8, generator=g)
        x = batch.scale_model_input(lat, t)
        assert all(torch.equal(x[k:k + 1], s.scale_model_input(r, t)) for k, (s, r) in enumerate(zip(rows, each)))
        lat = batch.step(noise, t, lat, return_dict=False)[0]
        each = [s.step(noise[k:k + 1], t, r, return_dict=False)[0] for k, (s, r) in enumerate(zip(rows, each))]
        assert all(torch.equal(lat[k:k + 1], r) for k, r in enumerate(each))


# --- the server on the step loop ------------------------------------------------------------

@pytest.fixture(scope="module")
def server(session, tmp_path_factory):
    from compinv_rt.apps.serve.engine import SessionEngine

    engine = SessionEngine(session, tmp_path_factory.mktemp("concepts"))
    with ServerThread(create_app(engine, ServeSettings(max_batch=3))) as srv:
        yield srv


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_stream_reports_each_step_then_the_json_response(server):
    body = {"prompt": "a red star on grass", "seed": 4, "steps": 3}
    r = httpx.post(f"{server.url}/v1/generate", json={**body, "stream": True}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[:-1] == [("progress", {"step": k, "total": 3}) for k in (1, 2, 3)]
    kind, result = events[-1]
    plain = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).json()
    assert kind == "result" and set(result) == set(plain) == {"images", "batch_sizes", "seconds"}
    for got, want in zip(result["images"], plain["images"], strict=True):  # bit for bit
        assert got["png_base64"] == want["png_base64"]
        assert {**got["sidecar"], "created": 0} == {**want["sidecar"], "created": 0}
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a", "concepts": ["nope"], "stream": True})
    assert r.status_code == 400 and "unknown concept" in r.json()["error"]  # before the stream starts
    r = httpx.post(f"{server.url}/v1/generate", timeout=60, json={  # found when it joins the loop
        "prompt": "a star", "layout": "moon=0.1,0.1,0.5,0.5", "steps": 2, "stream": True})
    (kind, data), = _events(r.text)
    assert r.status_code == 200 and kind == "error" and "moon" in data["error"] and set(data) == {"error"}


def test_quality_presets_and_explicit_steps_mean_what_generate_means(server):
    def settings(**extra):
        r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a red star", **extra}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["images"][0]["sidecar"]["settings"]

    fast = settings(quality="fast")
    assert (fast["steps"], fast["scheduler"], fast["guidance_interval"]) == (10, "dpm", [0.0, 0.5])
    default = settings()
    assert (default["steps"], default["scheduler"], default["guidance_interval"]) == (12, "ddim", [0.0, 0.6])
    explicit = settings(steps=3)
    assert (explicit["steps"], explicit["scheduler"], explicit["guidance_interval"]) == (3, "ddim", [0.0, 1.0])


def test_attention_heatmaps_come_with_each_image(server):
    from PIL import Image

    r = httpx.post(f"{server.url}/v1/generate", timeout=60, json={
        "prompt": "a red star", "steps": 2, "n": 2, "attention": True})
    assert r.status_code == 200, r.text
    for image in r.json()["images"]:
        att = image["attention"]
        assert att["tokens"] == ["a", "red", "star"]
        grid = Image.open(__import__("io").BytesIO(base64.b64decode(att["png_base64"])))
        assert grid.format == "PNG" and grid.size[0] > 128
    assert "attention" not in httpx.post(f"{server.url}/v1/generate", timeout=60, json={
        "prompt": "a red star", "steps": 2}).json()["images"][0]


def test_attention_needs_the_torch_backend(tiny_model, tmp_path):
    from compinv_rt.apps.serve.engine import SessionEngine
    from compinv_rt.generate.session import GenerationSession, SessionOptions

    session = GenerationSession.open(SessionOptions(model=str(tiny_model), device="cpu",
                                                    backend="onnxruntime", engines_root=tmp_path))
    with ServerThread(create_app(SessionEngine(session, tmp_path / "c"), ServeSettings())) as srv:
        r = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a star", "attention": True})
    assert r.status_code == 400 and "need torch" in r.json()["error"]


def test_metrics_export_queue_wait_and_step_occupancy(server):
    httpx.post(f"{server.url}/v1/generate", json={"prompt": "a star", "steps": 2, "n": 2}, timeout=60)
    text = httpx.get(f"{server.url}/metrics").text
    assert "compinv_queue_wait_seconds_count" in text
    occupancy = [line for line in text.splitlines() if line.startswith("compinv_step_occupancy_count")]
    assert occupancy and float(occupancy[0].split()[1]) >= 2


def test_a_request_whose_client_leaves_leaves_the_loop(session, tmp_path):
    import time

    from compinv_rt.apps.serve.engine import SessionEngine

    engine = SessionEngine(session, tmp_path / "c")
    with ServerThread(create_app(engine, ServeSettings(max_batch=3))) as srv:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a star", "steps": 100, "n": 3}, timeout=0.5)
        deadline = time.monotonic() + 10
        while engine.loop.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.loop.active  # out at a step boundary, long before its 100 steps
        ok = httpx.post(f"{srv.url}/v1/generate", json={"prompt": "a star", "steps": 2}, timeout=60)
        assert ok.status_code == 200 and ok.json()["batch_sizes"] == [1]
        assert "compinv_cancelled_images_total 3.0" in httpx.get(f"{srv.url}/metrics").text


def test_requests_with_different_guidance_share_steps_and_keep_their_bits(server):
    import threading
    import time

    bodies = [{"prompt": "a red star on grass", "seed": s, "steps": 12, "guidance": g, "scheduler": sch}
              for s, g, sch in ((1, 3.0, "ddim"), (2, 7.5, "euler"), (3, 9.0, "dpm"))]
    together = {}

    def post(k):
        together[k] = httpx.post(f"{server.url}/v1/generate", json=bodies[k], timeout=120).json()

    threads = []
    for k in range(3):  # each joins the running loop a little later than the one before
        threads.append(threading.Thread(target=post, args=(k,)))
        threads[-1].start()
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    assert max(together[k]["batch_sizes"][0] for k in range(3)) >= 2
    for k, body in enumerate(bodies):
        alone = httpx.post(f"{server.url}/v1/generate", json=body, timeout=120).json()
        assert alone["batch_sizes"] == [1]
        assert alone["images"][0]["png_base64"] == together[k]["images"][0]["png_base64"]
