"""CLI surface: fast --help (no heavy imports), doctor, the tokenizer matches real CLIP."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from compinv_rt.apps.cli import app

runner = CliRunner()


def test_help_does_not_import_heavy_libraries():
    """`--help` stays fast because torch/diffusers are imported only inside commands."""
    code = ("import sys; from compinv_rt.apps.cli import app; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'onnx', 'numpy') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "generate" in result.output and "doctor" in result.output


def test_doctor_reports_each_component():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    names = [line[4:].split()[0] for line in lines]
    for name in ("torch", "diffusers", "onnxruntime", "polygraphy", "tensorrt"):
        assert name in names, result.output
    import torch

    torch_line = next(line for line in lines if line[4:].startswith("torch"))
    assert torch.__version__ in torch_line and torch_line.startswith("ok")
    ort_line = next(line for line in lines if line[4:].startswith("onnxruntime"))
    assert "CPUExecutionProvider" in ort_line


def test_clip_tokenizer_matches_real_clip_ids():
    from compinv_rt.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    # Ids of OpenAI's CLIP tokenizer for this sentence.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_progress_writes_plain_lines_to_a_log(monkeypatch):
    """A background job's log (stderr not a terminal) gets newline-terminated progress lines."""
    import io
    import sys

    from compinv_rt.apps import cli_support

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(cli_support, "LOG_PROGRESS_EVERY", 0.0)
    bar = cli_support.progress(4, "eval", unit="unit")
    for _ in range(4):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and "4/4" in text
    assert all(line.startswith("eval:") for line in text.splitlines())
