"""Bad input: one clear line on stderr, exit code 1, no output written, no traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from compinv_rt.apps.cli import app

runner = CliRunner()


def _fails(args, out, expect: str):
    result = runner.invoke(app, ["generate", *args, "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert "\n" not in err, f"expected one line, got:\n{err}"
    assert err.startswith("error: ") and expect in err, err
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir()), "partial output left behind"
    return err


def test_missing_model_folder(tmp_path):
    _fails(["a cat", "--model", str(tmp_path / "nope")], tmp_path / "o", "model folder not found")


def test_empty_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(["a cat", "--model", str(tmp_path / "empty")], tmp_path / "o", "is empty")


def test_hub_id_is_refused_without_network(tmp_path):
    _fails(["a cat", "--model", "runwayml/stable-diffusion-v1-5"], tmp_path / "o", "hub id")


def test_folder_missing_a_component(model_copy, tmp_path):
    import shutil

    shutil.rmtree(model_copy / "vae")
    _fails(["a cat", "--model", str(model_copy)], tmp_path / "o", "missing its vae/ component")


def test_folder_missing_weights(model_copy, tmp_path):
    (model_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _fails(["a cat", "--model", str(model_copy)], tmp_path / "o", "has no weights")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weight_file(model_copy, tmp_path, damage):
    f = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    err = _fails(["a cat", "--model", str(model_copy)], tmp_path / "o", "corrupt weight file")
    assert "unet" in err


def test_weights_of_another_architecture(model_copy, tmp_path):
    """Headers parse but shapes do not match the config: caught at load, still one line."""
    cfg = model_copy / "unet" / "config.json"
    c = json.loads(cfg.read_text())
    c["block_out_channels"] = [16, 32]
    cfg.write_text(json.dumps(c))
    _fails(["a cat", "--model", str(model_copy)], tmp_path / "o", "cannot load unet")


def test_corrupt_config(model_copy, tmp_path):
    (model_copy / "model_index.json").write_text("{not json")
    _fails(["a cat", "--model", str(model_copy)], tmp_path / "o", "not valid JSON")


def test_empty_prompt(tiny_model, tmp_path):
    _fails(["   ", "--model", str(tiny_model)], tmp_path / "o", "prompt is empty")


def test_zero_images(tiny_model, tmp_path):
    _fails(["a cat", "-n", "0", "--model", str(tiny_model)], tmp_path / "o", "--num-images")


def test_zero_steps(tiny_model, tmp_path):
    _fails(["a cat", "--steps", "0", "--model", str(tiny_model)], tmp_path / "o", "--steps")


@pytest.mark.parametrize("opt", ["--height", "--width"])
def test_size_not_multiple_of_model_factor(tiny_model, tmp_path, opt):
    # tiny model: VAE x8, two UNet levels -> factor 16
    err = _fails(["a cat", opt, "120", "--model", str(tiny_model)], tmp_path / "o", "multiple of 16")
    assert opt in err


def test_unknown_precision(tiny_model, tmp_path):
    _fails(["a cat", "--precision", "int4", "--model", str(tiny_model)], tmp_path / "o", "--precision")


def test_unwritable_output(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    _fails(["a cat", "--model", str(tiny_model)], blocker / "out", "cannot write to output folder")


def test_unknown_scheduler_is_a_usage_error(tiny_model, tmp_path):
    result = runner.invoke(app, ["generate", "a cat", "--scheduler", "pndm", "--model", str(tiny_model)])
    assert result.exit_code == 2 and "pndm" in result.output
