"""Issue 23: DeepCache (deep-feature caching across steps) in the contract and the denoise loop.
The engines' graphs of the same split are tested in tests/test_deep_cache_engines.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compinv_rt.apps.cli import app
from compinv_rt.sampling.denoise import BiasedModel, deep_cache_plan

PROMPT = "a red star and a blue circle on grass"


@pytest.fixture(scope="module")
def backend(tiny_model):
    from compinv_rt.models.loading import load_model
    from compinv_rt.unet.backends import TorchBackend

    model = load_model(str(tiny_model), "cpu")
    return model, TorchBackend(model.unet)


def _inputs(model, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = model.unet.config
    h = 8
    return (torch.randn(batch, u.in_channels, h, h, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, model.files.text_len, u.cross_attention_dim, generator=g),
            torch.randn(batch, model.files.text_len, h, h, generator=g),
            torch.tensor([[1.0, 0.5]]).expand(batch, 2))


@pytest.mark.parametrize("with_bias", ["none", "fixed", "adaptive"])
def test_full_path_is_the_unet_bit_for_bit(backend, with_bias):
    """`full` re-walks diffusers' forward block by block: its noise is BiasedUNet's, bit for bit,
    and the shallow path fed its own step's deep features gives that same noise back."""
    model, b = backend
    x, t, ctx, bias, gain = _inputs(model, 3)
    extra = {"none": (), "fixed": (bias,), "adaptive": (bias, gain)}[with_bias]
    ref = b(x, t, ctx, *extra)
    noise, deep = b.full(x, t, ctx, *extra)
    assert torch.equal(noise, ref)
    assert deep.shape == (3, model.unet.config.block_out_channels[1], 8, 8)
    assert torch.equal(b.shallow(x, t, ctx, *extra, deep_features=deep), ref)
    # the shallow path really reads the features: other features, other noise
    assert not torch.allclose(b.shallow(x, t, ctx, *extra, deep_features=deep * 0.5), ref)


def test_shallow_path_costs_a_fraction_of_the_flops(backend):
    from torch.utils.flop_counter import FlopCounterMode

    model, b = backend
    x, t, ctx, _, _ = _inputs(model, 1)
    with FlopCounterMode(display=False) as full:
        _, deep = b.full(x, t, ctx)
    with FlopCounterMode(display=False) as shallow:
        b.shallow(x, t, ctx, deep_features=deep)
    assert 0 < shallow.get_total_flops() < 0.5 * full.get_total_flops()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.integers(1, 10))
def test_plan_never_reuses_features_that_do_not_cover_the_step(guided, interval):
    plan = deep_cache_plan(guided, interval)
    assert len(plan) == len(guided) and plan[0]
    last_full_guided = None
    for i, (g, full) in enumerate(zip(guided, plan)):
        if i % interval == 0:
            assert full
        if full:
            last_full_guided = g
        else:  # reuse only features of at least this step's rows ([uncond; cond] covers cond)
            assert last_full_guided or not g
    assert sum(plan) <= -(-len(guided) // interval) + sum(1 for a, b in zip(guided, guided[1:]) if b and not a)


def test_interval_one_and_all_full_plans_are_the_uncached_loop(backend):
    """A plan with every step full runs `full` each step: the same bits as no caching."""
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig

    model, b = backend
    pipe = Pipeline(model, b)
    cfg = SamplingConfig(steps=4, guidance=6.0, height=32, width=32)
    ref = pipe.generate([PROMPT] * 2, [1, 2], cfg)
    sched, latents, den = pipe.start([PROMPT] * 2, [1, 2], cfg.resolved(model.files))
    den.model = BiasedModel(b, None, sched.timesteps[0], [True] * 4)
    from compinv_rt.sampling.denoise import denoise

    got = pipe.decode(denoise(den, sched, latents))
    assert all(np.array_equal(np.asarray(a), np.asarray(c)) for a, c in zip(ref, got))


def test_cached_run_calls_full_and_shallow_as_planned(backend):
    """Guidance on the first half, a full step every 3: the UNet rows and paths the loop runs are
    the plan's, and an unguided step after a guided full step reuses the conditional half."""
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig

    model, b = backend
    calls: list[tuple[str, int]] = []

    class Spy:
        name = "torch"

        def __call__(self, x, *a):
            raise AssertionError("a cached run calls full or shallow")

        def full(self, x, *a):
            calls.append(("full", x.shape[0]))
            return b.full(x, *a)

        def shallow(self, x, *a, deep_features):
            calls.append(("shallow", x.shape[0]))
            assert deep_features.shape[0] == x.shape[0]
            return b.shallow(x, *a, deep_features=deep_features)

    cfg = SamplingConfig(steps=6, guidance=6.0, guidance_interval=(0.0, 0.5), cache_interval=3,
                         height=32, width=32)
    images = Pipeline(model, Spy()).generate([PROMPT] * 2, [1, 2], cfg)
    assert calls == [("full", 4), ("shallow", 4), ("shallow", 4), ("full", 2), ("shallow", 2), ("shallow", 2)]
    assert cfg.full_steps() == [True, False, False, True, False, False]
    assert cfg.unet_flops(1.0, 0.0) == 2 + 1  # full sample-evaluations: 2 rows at step 0, 1 at step 3
    assert all(np.asarray(im).std() > 1 for im in images)


def test_cached_images_stay_close_to_uncached(backend):
    """Caching approximates: on 8 steps with a full step every 2, images differ from the uncached
    run but stay near it (mean |diff| in 8-bit pixels), unlike another seed's image."""
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig

    model, b = backend
    pipe = Pipeline(model, b)
    base = SamplingConfig(steps=8, guidance=6.0, height=32, width=32)
    a = np.asarray(pipe.generate([PROMPT], [5], base)[0], np.float32)
    c = np.asarray(pipe.generate([PROMPT], [5], SamplingConfig(**{**base.__dict__, "cache_interval": 2}))[0],
                   np.float32)
    other = np.asarray(pipe.generate([PROMPT], [6], base)[0], np.float32)
    assert 0 < np.abs(a - c).mean() < 0.5 * np.abs(a - other).mean()


def test_backend_without_shallow_path_is_refused(backend):
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig

    model, b = backend

    class Plain:
        name = "compile"

        def __call__(self, *a):
            return b(*a)

    with pytest.raises(ConfigError, match="cache-interval.*compile"):
        Pipeline(model, Plain()).generate([PROMPT], [1], SamplingConfig(steps=2, cache_interval=2))


def test_cli_cache_interval_bounds_and_sidecar(tiny_model, tmp_path):
    runner = CliRunner()
    for bad in ("0", "11"):
        res = runner.invoke(app, ["generate", PROMPT, "--model", str(tiny_model), "--cache-interval", bad,
                                  "--out", str(tmp_path / bad)])
        assert res.exit_code != 0 and "cache-interval" in res.output.replace("_", "-"), res.output
    out = tmp_path / "ok"
    res = runner.invoke(app, ["generate", PROMPT, "--model", str(tiny_model), "-n", "1", "--steps", "4",
                              "--cache-interval", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    import json

    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["settings"]["cache_interval"] == 2
    assert sidecar["settings"]["steps"] == 4 and sidecar["settings"]["guidance_interval"] == [0.0, 1.0]
