"""`compinv-rt generate`: parity with stock diffusers, determinism, files written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.cli import app

runner = CliRunner()


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _generate(model, out, *extra):
    args = ["generate", "a red star and a blue circle on grass", "--model", str(model),
            "--out", str(out), "-n", "3", "--steps", "8", "--seed", "11", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return sorted(out.glob("*_1[123].png"))


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "dpm-karras", "unipc", "euler"])
@pytest.mark.parametrize("which", ["tiny_model", "tiny_vpred_model"])
def test_matches_stock_diffusers(request, which, scheduler, tmp_path, stock_pipeline_cls):
    """Same seeds, same sampler: our images equal StableDiffusionPipeline's to <= 1/255."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    model = request.getfixturevalue(which)
    ours = _generate(model, tmp_path / "ours", "--scheduler", scheduler, "--guidance", "6.0")
    assert len(ours) == 3

    pipe = stock_pipeline_cls.from_pretrained(model, safety_checker=None)
    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "dpm-karras": DPMSolverMultistepScheduler,
           "unipc": UniPCMultistepScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **(
        {"use_karras_sigmas": True} if scheduler == "dpm-karras" else {}))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red star and a blue circle on grass", num_images_per_prompt=3,
               num_inference_steps=8, guidance_scale=6.0,
               generator=[torch.Generator().manual_seed(s) for s in (11, 12, 13)]).images
    for path, ref_img in zip(ours, ref):
        diff = np.abs(_pixels(path) - np.asarray(ref_img, dtype=np.int16)).max()
        assert diff <= 1, f"{path.name}: max pixel difference {diff}/255"
    # The comparison is only meaningful if the images are not flat.
    assert _pixels(ours[0]).std() > 5


def test_same_seed_same_images_and_files(tiny_model, tmp_path):
    a = _generate(tiny_model, tmp_path / "a")
    b = _generate(tiny_model, tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        assert np.array_equal(_pixels(pa), _pixels(pb))
    assert not np.array_equal(_pixels(a[0]), _pixels(a[1])), "different seeds gave the same image"

    side = json.loads(a[0].with_suffix(".json").read_text())
    assert side["prompt"] == "a red star and a blue circle on grass"
    assert side["seed"] == 11 and side["settings"]["steps"] == 8
    assert side["settings"]["height"] == 128 and side["settings"]["scheduler"] == "ddim"
    assert len(side["model"]["hash"]) == 64
    grids = list((tmp_path / "a").glob("*grid.png"))
    assert len(grids) == 1
    w, h = _pixels(grids[0]).shape[1], _pixels(grids[0]).shape[0]
    assert w > 128 and h > 128  # 3 images tiled 2x2


def test_image_depends_only_on_its_seed(tiny_model, tmp_path):
    """Image with seed 12 is the same whether generated alone or inside a batch of three."""
    batch = _generate(tiny_model, tmp_path / "batch")
    result = runner.invoke(app, ["generate", "a red star and a blue circle on grass", "--model",
                                 str(tiny_model), "--out", str(tmp_path / "one"), "-n", "1",
                                 "--steps", "8", "--seed", "12"])
    assert result.exit_code == 0, result.output
    single = _pixels(next((tmp_path / "one").glob("*_12.png")))
    assert np.abs(single - _pixels(batch[1])).max() <= 1


def test_custom_size_and_negative_prompt(tiny_model, tmp_path):
    out = tmp_path / "o"
    res = runner.invoke(app, ["generate", "a cat", "--model", str(tiny_model), "--out", str(out),
                              "-n", "1", "--steps", "3", "--height", "64", "--width", "192",
                              "--negative-prompt", "blurry"])
    assert res.exit_code == 0, res.output
    png = next(out.glob("a-cat_0.png"))
    assert _pixels(png).shape == (64, 192, 3)
    assert json.loads(png.with_suffix(".json").read_text())["negative_prompt"] == "blurry"
    assert str(out) in res.output


def test_bf16_precision_generates_close_to_fp32(tiny_model, tmp_path):
    """--precision bf16 loads every component in bfloat16 (recorded in the sidecar); images stay
    close to fp32 (bf16 keeps 8 mantissa bits, so not bit-identical)."""
    fp32 = _generate(tiny_model, tmp_path / "fp32")
    bf16 = _generate(tiny_model, tmp_path / "bf16", "--precision", "bf16")
    assert json.loads(bf16[0].with_suffix(".json").read_text())["dtype"] == "bfloat16"
    diffs = [np.abs(_pixels(a) - _pixels(b)) for a, b in zip(fp32, bf16)]
    assert max(d.mean() for d in diffs) < 8, [float(d.mean()) for d in diffs]
    assert any(d.max() > 0 for d in diffs), "bf16 run was identical to fp32: precision not applied"


def test_many_images_run_in_bounded_batches_and_a_bounded_grid(tiny_model, tmp_path, monkeypatch):
    """Issue 28: -n N runs in batches of --max-batch (memory independent of N), every image is
    written, the grid tiles at most GRID_MAX of them."""
    from compinv_rt.generate import generation
    from compinv_rt.generate.session import GenerationSession

    sizes: list[int] = []
    real = GenerationSession.run_batch

    def spy(self, tasks, *a, **k):
        sizes.append(len(tasks))
        return real(self, tasks, *a, **k)

    monkeypatch.setattr(GenerationSession, "run_batch", spy)
    monkeypatch.setattr(generation, "GRID_MAX", 4)
    out = tmp_path / "many"
    res = runner.invoke(app, ["generate", "a red star", "--model", str(tiny_model), "--out", str(out),
                              "-n", "7", "--max-batch", "3", "--steps", "2", "--seed", "20"])
    assert res.exit_code == 0, res.output
    assert sizes == [3, 3, 1]
    assert len(list(out.glob("a-red-star_2[0-6].png"))) == 7 and len(list(out.glob("*.json"))) == 7
    from PIL import Image

    grid = Image.open(next(out.glob("*_grid.png")))
    one = Image.open(out / "a-red-star_20.png")
    assert grid.width < 3 * one.width + 10  # 4 tiles: 2 x 2, not 7 (3 x 3)
