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


def test_flops_and_gemms_match_a_hand_count():
    """The roofline's counter on single layers: FLOPs = 2 x multiply-adds, and the GEMM each layer
    is timed as (convolutions as their im2col product, attention as its two batched products)."""
    import torch

    from compinv_rt.apps.bench.roofline import Gemm, count

    linear, x = torch.nn.Linear(64, 32), torch.randn(5, 64)
    assert count(lambda: linear(x)) == (2 * 5 * 64 * 32, {Gemm(1, 5, 64, 32): 1})
    conv, img = torch.nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 10, 10)
    assert count(lambda: conv(img)) == (2 * (2 * 10 * 10) * 16 * (8 * 3 * 3), {Gemm(1, 200, 72, 16): 1})
    grouped = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)  # 5x5 out, 2 groups of 4 -> 8
    assert count(lambda: grouped(img)) == (2 * (2 * 5 * 5) * 16 * (4 * 3 * 3), {Gemm(2, 50, 36, 8): 1})
    q, kv = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)  # torch's own table misses this on CPU
    flops, gemms = count(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv))
    assert flops == 2 * (2 * 6 * 9 * 4) * 2 and gemms == {Gemm(2, 6, 4, 9): 1, Gemm(2, 6, 9, 4): 1}


def test_attainable_peak_of_a_profile_is_finite():
    import math

    import torch

    from compinv_rt.apps.bench.roofline import Gemm, UNetProfile, attainable_gflops, fraction_of_peak

    profile = UNetProfile(1, 0, {Gemm(1, 64, 64, 64): 3, Gemm(2, 16, 32, 8): 1})
    wall, cpu = attainable_gflops(profile, torch.float32, repeats=1)
    assert math.isfinite(wall) and wall > 0 and math.isfinite(cpu) and cpu > 0
    assert fraction_of_peak(2e9, 1.0, 4.0) == 0.5


def test_bench_rejects_unknown_quality(tiny_model, tmp_path):
    res = runner.invoke(app, ["bench", "--model", str(tiny_model), "--quality", "reference,best",
                              "--out", str(tmp_path)])
    assert res.exit_code == 1 and "best" in res.stderr
    assert [line for line in res.stderr.splitlines() if line.strip()] == [res.stderr.strip()]
    assert res.stderr.startswith("error: --quality")


@pytest.mark.slow
def test_bench_runs_every_quality_with_its_roofline(tiny_model, tmp_path):
    """Every backend at each preset, stock once; each row has its FLOPs and fraction of peak."""
    import math

    out = tmp_path / "res"
    res = runner.invoke(app, ["bench", "--model", str(tiny_model), "--backends", "torch",
                              "--batch-sizes", "1", "--steps", "2", "--repeats", "1", "--bias", "off",
                              "--quality", "reference,fast", "--engines", str(tmp_path / "eng"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    rows = {(c["backend"], c["quality"]): c for c in data["cells"]}
    assert len(rows) == len(data["cells"]) == 3
    assert set(rows) == {("diffusers", "reference"), ("torch", "reference"), ("torch", "fast")}
    for c in data["cells"]:
        for key in ("gflops_per_image", "unet_gflops_per_s", "attainable_gflops_per_s", "fraction_of_peak",
                    "fraction_of_peak_cpu"):
            assert math.isfinite(c[key]) and c[key] > 0, (key, c)
    per_eval = data["meta"]["roofline"]["gflops_per_sample_evaluation"]
    # fast = DPM with guidance on the first half: 2 steps -> 2 + 1 evaluations; reference 2 + 2
    assert rows["torch", "fast"]["gflops_per_image"] == pytest.approx(3 * per_eval)
    assert rows["torch", "reference"]["gflops_per_image"] == pytest.approx(4 * per_eval)
    fast, ref = rows["torch", "fast"], rows["torch", "reference"]
    assert fast["images_per_s_vs_reference"] == pytest.approx(fast["images_per_s"] / ref["images_per_s"])
    assert ref["images_per_s_vs_reference"] == 1.0
    table = (out / "results.md").read_text()
    assert "Roofline" in table and "fraction of peak" in table and table.count("\n| ") == 4
