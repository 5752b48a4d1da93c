"""No stale, overwritten or substituted results (issue 28 item 3). Each test fails on the code
before the fix: one prompt's files overwrote another's, an engine file changed in place with its
mtime put back passed the check, an fp32 engine ran under an fp16 label, a bf16 ONNX export built
an engine nothing could run."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.cli import app
from compinv_rt.core.errors import EngineMismatch
from compinv_rt.core.types import Precision

runner = CliRunner()


def test_prompts_that_slug_alike_do_not_overwrite_each_other(tiny_model, tmp_path):
    out = tmp_path / "o"
    for prompt in ("a red star!", "a red star?"):
        r = runner.invoke(app, ["generate", prompt, "--model", str(tiny_model), "--out", str(out),
                                "-n", "1", "--steps", "2"])
        assert r.exit_code == 0, r.output
    sidecars = sorted(out.glob("*_0.json"))
    assert len(sidecars) == 2, sidecars
    assert {json.loads(p.read_text())["prompt"] for p in sidecars} == {"a red star!", "a red star?"}
    again = runner.invoke(app, ["generate", "a red star!", "--model", str(tiny_model), "--out", str(out),
                                "-n", "1", "--steps", "2"])
    assert again.exit_code == 0 and len(list(out.glob("*_0.json"))) == 2  # same prompt: same name


def test_an_engine_file_changed_in_place_is_caught_despite_its_mtime(tmp_path, monkeypatch):
    from compinv_rt.export.manifest import file_sha256

    monkeypatch.setenv("COMPINV_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "unet.onnx"
    f.write_bytes(b"\x00" * 4096)
    st = f.stat()
    before = file_sha256(f)
    f.write_bytes(b"\x01" + b"\x00" * 4095)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime
    assert file_sha256(f) != before


def test_an_engine_of_another_precision_is_refused(tiny_model, monkeypatch):
    from compinv_rt.engines import registry
    from compinv_rt.models.loading import inspect_model_dir
    from compinv_rt.unet.iospec import UNetIOSpec

    files = inspect_model_dir(tiny_model)
    fp32 = UNetIOSpec.for_model(files, 128, 128, Precision.fp32)
    monkeypatch.setattr(registry, "verify_engine", lambda *a, **k: {"io": fp32.to_dict(), "profiles": []})
    monkeypatch.setattr(registry, "profiles_of", lambda m: [])
    monkeypatch.setattr("compinv_rt.models.loading.content_hash", lambda files, cached=True: "0" * 64)
    model = SimpleNamespace(files=files, precision=Precision.fp16, device=torch.device("cpu"))
    with pytest.raises(EngineMismatch, match="runs fp32; this run asks for fp16"):
        registry.open_backend("aoti", model, registry.BatchShape(128, 128, 1), engine=tiny_model)


def test_a_bf16_onnx_export_is_refused_before_building(tiny_model, tmp_path):
    r = runner.invoke(app, ["export", "--format", "onnx", "--precision", "bf16", "--model", str(tiny_model),
                            "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "not bf16" in r.stderr, r.output
    assert not (tmp_path / "e").exists()


def test_a_prompt_run_into_a_folder_in_use_is_refused(tiny_model, tmp_path):
    from compinv_rt.core.outputs import FolderLock

    out = tmp_path / "o"
    out.mkdir()
    with FolderLock(out):  # another run holds it
        r = runner.invoke(app, ["generate", "a red star", "--model", str(tiny_model), "--out", str(out),
                                "-n", "1", "--steps", "2"])
    assert r.exit_code == 1 and "in use by another compinv-rt run" in r.stderr, r.output
    assert not list(out.glob("*.png"))


def test_a_training_into_a_folder_in_use_is_refused(tiny_model, photos, tmp_path):
    from compinv_rt.core.outputs import FolderLock

    out = tmp_path / "c"
    out.mkdir()
    with FolderLock(out):  # another `train --resume` of this concept is running
        r = runner.invoke(app, ["train", "--images", str(photos), "--token", "<t>", "--class-word", "heart",
                                "--out", str(out), "--model", str(tiny_model), "--steps", "2", "--batch", "1",
                                "--resolution", "64", "--variants", "1", "--device", "cpu", "--resume"])
    assert r.exit_code == 1 and "in use by another compinv-rt run" in r.stderr, r.output
    assert not (out / "checkpoints").exists()
