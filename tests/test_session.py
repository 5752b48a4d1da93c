"""GenerationSession: requests -> batches -> images; an image depends only on its own request."""

from __future__ import annotations

import numpy as np
import pytest

from compinv_rt.core.errors import ArtifactError, ConfigError
from compinv_rt.generate.session import GenerationSession, Request
from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig
from compinv_rt.spatial.layouts import boxes_layout
from compinv_rt.spatial.plan import SpatialConfig, SpatialOptions

STEPS = SamplingConfig(steps=3)


@pytest.fixture(scope="module")
def session(tiny_model):
    from compinv_rt.models.loading import load_model

    return GenerationSession(load_model(str(tiny_model), device="cpu"), max_batch=4)


def _bias(phrase: str, box, strength: float = 2.0) -> SpatialConfig:
    return SpatialConfig.from_options(SpatialOptions("bias", boxes_layout([phrase], [box]), strength, "1.0"),
                                      total_steps=STEPS.steps)


def _px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_one_request_equals_the_pipeline_bit_for_bit(session):
    req = Request("a red star", seed=3, n=2, negative_prompt="blue", sampling=STEPS)
    got = session.generate(req)
    want = Pipeline(session.model).generate(["a red star"] * 2, [3, 4], STEPS,
                                            negative_prompts=["blue"] * 2)
    assert [r.seed for r in got] == [3, 4]
    for r, w in zip(got, want):
        assert np.array_equal(_px(r.image), _px(w))


def test_packed_requests_depend_only_on_themselves(session):
    """Two clients' requests (prompts, negatives, seeds, layouts, strengths) share one UNet batch;
    each image matches the same request generated alone (up to batch-size numerics)."""
    a = Request("a red star", seed=1, n=2, sampling=STEPS,
                spatial=_bias("red star", (0.0, 0.0, 0.5, 1.0)))
    b = Request("a blue circle", seed=9, n=1, negative_prompt="red", sampling=STEPS,
                spatial=_bias("blue circle", (0.5, 0.0, 1.0, 1.0), strength=4.0))
    tasks = session.tasks(a) + session.tasks(b)
    assert len({session.batch_key(t) for t in tasks}) == 1  # packable together
    mixed = session.run_batch(tasks)
    alone = session.generate(a) + session.generate(b)
    for m, s in zip(mixed, alone):
        assert m.seed == s.seed and m.request is s.request
        assert np.abs(_px(m.image) - _px(s.image)).max() <= 2
    # each image got its own layout (and so its own bias)
    assert [r.layout.concepts[0].phrase for r in mixed] == ["red star", "red star", "blue circle"]
    assert mixed[2].spatial["bias_strength"] == 4.0
    plain = session.generate(Request("a red star", seed=1, n=1, sampling=STEPS))[0]
    assert np.abs(_px(plain.image) - _px(mixed[0].image)).max() > 2  # the bias did act


def test_batch_keys_and_packing(session):
    reqs = [Request("a red star", seed=i, sampling=SamplingConfig(steps=3, guidance=g))
            for i, g in enumerate([7.5, 3.0, 7.5, 7.5, 7.5, 7.5])]
    keys = [session.batch_key(t) for r in reqs for t in session.tasks(r)]
    assert keys[0] != keys[1] and keys[0] == keys[2]
    assert session.batch_key(session.tasks(Request("x", sampling=SamplingConfig(steps=4)))[0]) != keys[0]
    out = list(session.run([t for r in reqs for t in session.tasks(r)]))
    assert [r.seed for r in out] == [0, 2, 3, 4, 5, 1]  # equal keys grouped, input order kept
    with pytest.raises(ConfigError, match="equal batch keys"):
        session.run_batch([session.tasks(reqs[0])[0], session.tasks(reqs[1])[0]])


def test_a_failing_request_is_reported_once_and_the_others_run(session, tmp_path):
    bad = Request("a <nope> heart", seed=0, n=3, sampling=STEPS, concepts=(str(tmp_path / "nope"),))
    good = Request("a red star", seed=7, n=1, sampling=STEPS)
    errors = []
    out = list(session.run(session.tasks(bad) + session.tasks(good),
                           on_error=lambda req, exc: errors.append((req, exc))))
    assert [r.seed for r in out] == [7]
    assert len(errors) == 1 and errors[0][0] is bad and isinstance(errors[0][1], ArtifactError)
    with pytest.raises(ArtifactError):
        session.generate(bad)


def test_sidecar_is_per_image(session):
    req = Request("a red star", seed=2, n=2, sampling=STEPS,
                  spatial=_bias("red star", (0.1, 0.1, 0.6, 0.9)))
    r = session.generate(req)[1]
    side = session.sidecar(r, index=r.index, extra="x")
    assert side["seed"] == 3 and side["index"] == 1 and side["extra"] == "x"
    assert side["settings"]["steps"] == 3 and side["spatial"]["regularized_steps"] == 3
    assert side["spatial"]["layout"]["concepts"][0]["boxes"] == [[0.1, 0.1, 0.6, 0.9]]
