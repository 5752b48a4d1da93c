"""`train --format diffusers|a1111|both`: each copy loads in stock diffusers (no project code)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.cli import app

TOKEN = "<my-star>"
pytestmark = pytest.mark.slow  # trains a concept (tiny model, 2 steps)


@pytest.fixture(scope="module")
def concept(tiny_model, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("portable") / "concept"
    res = CliRunner().invoke(app, [
        "train", "--images", str(photos), "--token", TOKEN, "--class-word", "star", "--out", str(out),
        "--model", str(tiny_model), "--vectors", "2", "--steps", "2", "--batch", "2",
        "--resolution", "64", "--variants", "1", "--no-augment", "--checkpoint-every", "2",
        "--device", "cpu", "--format", "both"])
    assert res.exit_code == 0, res.output
    return out


def _vectors(concept):
    from safetensors.torch import load_file

    return load_file(str(concept / "embeddings.safetensors"))[TOKEN]


def _rows(pipe, n):
    ids = [pipe.tokenizer.convert_tokens_to_ids(TOKEN)] + [
        pipe.tokenizer.convert_tokens_to_ids(f"{TOKEN}_{i}") for i in range(1, n)]
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach()


@pytest.mark.parametrize("how", ["diffusers-folder", "a1111-pt", "a1111-safetensors"])
def test_stock_diffusers_loads_each_format(concept, tiny_model, stock_pipeline_cls, how):
    vectors = _vectors(concept)
    pipe = stock_pipeline_cls.from_pretrained(tiny_model, safety_checker=None)
    if how == "diffusers-folder":  # learned_embeds.safetensors is the name diffusers looks for
        pipe.load_textual_inversion(str(concept))
    elif how == "a1111-pt":  # the token comes from the file's "name"
        pipe.load_textual_inversion(str(concept / "my-star.pt"))
    else:  # "emb_params" does not name the token: A1111 uses the file name, diffusers token=
        pipe.load_textual_inversion(str(concept / "my-star.safetensors"), token=TOKEN)
    torch.testing.assert_close(_rows(pipe, 2), vectors)


def test_a1111_layout_and_artifact_hashes(concept):
    from safetensors import safe_open

    from compinv_rt.models.artifact import read_artifact

    pt = torch.load(concept / "my-star.pt", weights_only=True)
    assert set(pt) >= {"string_to_token", "string_to_param", "name", "step"}
    assert pt["name"] == TOKEN and pt["step"] == 2 and pt["string_to_param"]["*"].shape == (2, 64)
    with safe_open(str(concept / "my-star.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.metadata()["name"] == TOKEN
    files = read_artifact(concept)["files"]
    assert {"learned_embeds.safetensors", "my-star.pt", "my-star.safetensors"} <= set(files)
    assert json.loads((concept / "artifact.json").read_text())["files"] == files


def test_bad_format_is_one_error_line(tiny_model, photos, tmp_path):
    res = CliRunner().invoke(app, ["train", "--images", str(photos), "--token", TOKEN, "--class-word",
                                   "star", "--out", str(tmp_path / "c"), "--model", str(tiny_model),
                                   "--format", "ckpt"])
    assert res.exit_code == 1 and "--format must be diffusers, a1111 or both" in res.stderr
    assert not (tmp_path / "c").exists()
