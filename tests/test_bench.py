"""`compinv-rt bench`: runs every cell against the in-run stock baseline and writes its reports."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from compinv_rt.apps.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_bench_writes_json_table_and_plot(tiny_model, tmp_path):
    out = tmp_path / "res"
    res = runner.invoke(app, ["bench", "--model", str(tiny_model), "--backends", "torch,onnxruntime",
                              "--batch-sizes", "1,2", "--steps", "2", "--repeats", "1",
                              "--engines", str(tmp_path / "eng"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    cells = data["cells"]
    stock = [c for c in cells if c["backend"] == "diffusers"]
    ours = [c for c in cells if c["backend"] != "diffusers"]
    assert [c["batch"] for c in stock] == [1, 2]
    assert {(c["backend"], c["batch"], c["bias"]) for c in ours} == {
        (b, n, bias) for b in ("torch", "onnxruntime") for n in (1, 2) for bias in (False, True)}
    for c in ours:
        assert c["step_ms_p50"] > 0 and c["e2e_s"] > 0 and c["peak_rss_mb"] > 100
        base = next(s for s in stock if s["batch"] == c["batch"])
        assert abs(c["e2e_speedup"] - base["e2e_s"] / c["e2e_s"]) < 1e-9
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == len(cells) + 1  # header + one row per cell
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["meta"]["model_hash"] and data["meta"]["steps"] == 2


def test_bench_rejects_unknown_backend(tiny_model, tmp_path):
    res = runner.invoke(app, ["bench", "--model", str(tiny_model), "--backends", "torch,openvino",
                              "--out", str(tmp_path)])
    assert res.exit_code == 1 and "openvino" in res.stderr


@pytest.mark.slow
def test_bench_precisions_have_their_own_stock_baseline(tiny_model, tmp_path):
    out = tmp_path / "res"
    res = runner.invoke(app, ["bench", "--model", str(tiny_model), "--backends", "torch,onnxruntime",
                              "--batch-sizes", "1", "--steps", "2", "--repeats", "1", "--bias", "off",
                              "--precisions", "fp32,bf16", "--engines", str(tmp_path / "eng"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    cells = {(c["backend"], c["precision"]): c for c in data["cells"]}
    # onnxruntime has no bf16 kernels: skipped with its reason, never silently run in fp32
    assert set(cells) == {("diffusers", "fp32"), ("diffusers", "bf16"), ("torch", "fp32"),
                          ("torch", "bf16"), ("onnxruntime", "fp32")}
    assert [s.split(":")[0] for s in data["meta"]["skipped"]] == ["onnxruntime bf16"]
    ref, stock_bf16 = cells["diffusers", "fp32"], cells["diffusers", "bf16"]
    bf16 = cells["torch", "bf16"]
    assert abs(bf16["e2e_speedup"] - ref["e2e_s"] / bf16["e2e_s"]) < 1e-9
    assert abs(bf16["e2e_speedup_same_precision"] - stock_bf16["e2e_s"] / bf16["e2e_s"]) < 1e-9
    assert stock_bf16["e2e_speedup"] == ref["e2e_s"] / stock_bf16["e2e_s"]
    assert "Skipped: onnxruntime bf16" in (out / "results.md").read_text()


def test_bench_rejects_unknown_precision(tiny_model, tmp_path):
    res = runner.invoke(app, ["bench", "--model", str(tiny_model), "--precisions", "fp32,int3",
                              "--out", str(tmp_path)])
    assert res.exit_code == 1 and "int3" in res.stderr
