"""Issue 23: guidance in a limited interval of the steps, and the --quality presets."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from compinv_rt.apps.cli import app

runner = CliRunner()
PROMPT = "a red star and a blue circle on grass"


def _run(model, out, *extra):
    res = runner.invoke(app, ["generate", PROMPT, "--model", str(model), "--out", str(out), "-n", "2",
                              "--seed", "3", *extra])
    assert res.exit_code == 0, res.output
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted(out.glob("*_[34].png"))]


def test_unguided_steps_run_the_conditional_pass_alone(tiny_model):
    """Outside the interval the UNet sees the image batch (B), inside it [uncond; cond] (2B), and
    the evaluations counted by SamplingConfig are the ones that ran."""
    import torch

    from compinv_rt.models.loading import load_model
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig
    from compinv_rt.unet.backends import TorchBackend

    model = load_model(str(tiny_model), "cpu")
    inner = TorchBackend(model.unet)
    batches: list[int] = []

    class Spy:
        name = "torch"
        module = inner.module

        def __call__(self, sample, *a):
            batches.append(sample.shape[0])
            return inner(sample, *a)

    pipe = Pipeline(model, Spy())
    cfg = SamplingConfig(steps=8, guidance=6.0, guidance_interval=(0.0, 0.5))
    imgs = pipe.generate([PROMPT] * 3, [1, 2, 3], cfg)
    assert batches == [6] * 4 + [3] * 4
    assert cfg.unet_evaluations() * 3 == sum(batches) == 36
    assert all(np.asarray(im).std() > 1 for im in imgs)
    batches.clear()
    full = pipe.generate([PROMPT] * 3, [1, 2, 3], SamplingConfig(steps=8, guidance=6.0))
    assert batches == [6] * 8
    # skipping guidance on half the steps changes the images (the interval is not ignored)
    assert any(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() > 0 for a, b in zip(imgs, full))
    with torch.no_grad():
        assert SamplingConfig(steps=10, guidance=1.0).unet_evaluations() == 10  # no guidance at all


def test_full_interval_and_reference_preset_are_bit_identical(tiny_model, tmp_path):
    base = _run(tiny_model, tmp_path / "a", "--steps", "25", "--scheduler", "ddim")
    same = [_run(tiny_model, tmp_path / "b", "--quality", "reference"),
            _run(tiny_model, tmp_path / "c", "--steps", "25", "--scheduler", "ddim", "--guidance-interval", "0,1")]
    for imgs in same:
        assert all(np.array_equal(x, y) for x, y in zip(base, imgs))


@pytest.mark.parametrize("bad", ["0.5,0.5", "0.6,0.2", "-0.1,1", "0,1.5", "abc", "0,nan"])
def test_bad_guidance_interval_is_one_error_line(tiny_model, tmp_path, bad):
    res = runner.invoke(app, ["generate", PROMPT, "--model", str(tiny_model), "--out", str(tmp_path / "o"),
                              "--guidance-interval", bad])
    assert res.exit_code == 1 and "error:" in res.output and "--guidance-interval" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_explicit_options_override_the_preset():
    from compinv_rt.sampling.quality import PRESETS, Quality, SamplerPreset, sampler_settings
    from compinv_rt.sampling.schedulers import SchedulerName

    p = sampler_settings(Quality.fast, 7, None, None)
    assert p.steps == 7 and p.scheduler == PRESETS[Quality.fast].scheduler
    assert sampler_settings(None, None, "unipc", (0.0, 0.5)).guidance_interval == (0.0, 0.5)
    assert sampler_settings("reference", None, None, None) == PRESETS[Quality.reference]
    assert sampler_settings(None, None, None, None) == PRESETS[Quality.default]
    # a sampler option without --quality: the reference for the rest (the behaviour before presets)
    assert sampler_settings(None, 30, None, None) == SamplerPreset(SchedulerName.ddim, 30, (0.0, 1.0))
