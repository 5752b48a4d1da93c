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


# --- train: inputs that would change what is learned (issue 28 item 2), refused before torch ----


def _train_without_torch(tmp_path, images, *args):
    """`compinv-rt train` with a `torch` that cannot be imported first on the path: every case
    here must be one `error:` line before any model (or torch) loads, with nothing written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    blocker = tmp_path / "blocker"
    (blocker / "torch").mkdir(parents=True, exist_ok=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{root}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "compinv_rt.apps.cli", "train", "--images",
                        str(images), "--class-word", "heart", "--out", str(out), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 1 and err.startswith("error: ") and "\n" not in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("case", ["partial-txt", "null-caption", "bad-utf8", "mask-7x3", "norm",
                                  "token-long", "token-clash", "lr", "variants", "grad-accum"])
def test_train_input_errors_come_before_torch(tmp_path, case):
    from PIL import Image

    imgs = tmp_path / "imgs"
    (imgs / "masks").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(imgs / f"p{i}.png")
        Image.new("L", (64, 64), 255).save(imgs / "masks" / f"p{i}.png")
    args = ["--token", "<ok>"]
    if case == "partial-txt":
        (imgs / "p0.txt").write_text("on sand")
    elif case == "null-caption":
        (imgs / "captions.json").write_text(json.dumps({"p0.png": "a", "p1.png": None, "p2.png": "b"}))
    elif case == "bad-utf8":
        for i in range(3):
            (imgs / f"p{i}.txt").write_bytes(b"on \xff sand" if i == 2 else b"on sand")
    elif case == "mask-7x3":
        Image.new("L", (7, 3), 255).save(imgs / "masks" / "p1.png")
        args += ["--masks", str(imgs / "masks")]
    extra = {"norm": ["--norm", "1e-30"], "token-long": ["--token", "<" + "x" * 200 + ">"],
             "token-clash": ["--token", "<embeddings>", "--format", "a1111"],
             "lr": ["--lr", "1e6"], "variants": ["--variants", "1000000000"],
             "grad-accum": ["--grad-accum", "1000000000"]}.get(case, [])
    expect = {"partial-txt": "p1.png", "null-caption": "p1.png", "bad-utf8": "p2.txt",
              "mask-7x3": "7x3", "norm": "--norm", "token-long": "64 characters",
              "token-clash": "embeddings.safetensors", "lr": "--lr", "variants": "--variants",
              "grad-accum": "--grad-accum"}[case]
    assert expect in _train_without_torch(tmp_path, imgs, *args, *extra)
