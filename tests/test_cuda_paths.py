"""The CUDA user's path, checked on CPU where its logic allows: device tensors before numpy,
upcast attention, a recompile-free compile backend, onnxruntime's provider checks, engines that
`export` built found by `generate`, AOTI device placement, Ray GPU reservations. (The TensorRT
runtime has its own stand-in tests: test_trt_runtime.py; real-GPU tests are marked `cuda`.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.cli import app
from compinv_rt.core.errors import BackendUnavailable, ConfigError

runner = CliRunner()


class OnCuda(torch.Tensor):
    """A CPU tensor that refuses numpy the way a CUDA tensor does (`.cpu()` gives a plain one)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy or func is torch.Tensor.__array__:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() "
                            "to copy the tensor to host memory first.")
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        return super().__torch_function__(func, types, args, kwargs or {})


def test_attention_heatmaps_from_device_tensors():
    """--save-attention on CUDA: the recorded maps must reach numpy through host memory."""
    from PIL import Image

    from compinv_rt.spatial.heatmaps import AttentionRecorder, heatmap_grid

    rec = AttentionRecorder(batch=1, height=8, width=8)
    probs = torch.rand(2, 2, 16, 77).softmax(-1).as_subclass(OnCuda)  # (N, heads, 4*4, T)
    rec("layer", probs)
    maps = rec.maps()
    grid = heatmap_grid(Image.new("RGB", (64, 64)), maps[0], [(1, "a"), (2, "star")])
    assert grid.size[0] > 128 and type(maps) is torch.Tensor


def test_capture_honours_upcast_attention():
    """SD 2.x (upcast_attention=True): Q.K^T in fp16 overflows to inf and the softmax to NaN."""
    from diffusers.models.attention_processor import Attention

    from compinv_rt.unet.capture import CaptureAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=8, heads=1, dim_head=8, upcast_attention=True)
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.copy_(torch.eye(8) * 150)
    attn = attn.half()
    x = torch.ones(1, 4, 8, dtype=torch.float16)
    ctx = torch.ones(1, 3, 8, dtype=torch.float16)
    probs = []
    with torch.no_grad():
        got = CaptureAttnProcessor("l", lambda n, p: probs.append(p))(attn, x, ctx)
    assert torch.isfinite(probs[0]).all() and torch.isfinite(got).all()
    torch.testing.assert_close(probs[0].float().sum(-1), torch.ones(1, 1, 4), atol=2e-3, rtol=0)


@pytest.mark.slow
def test_compile_backend_one_graph_per_bias_state(tiny_model, monkeypatch):
    """Batches 2, 4, 6, 2, with and without a bias: at most 2 graphs (the old static compile made
    one per (batch, bias) pair, and the 9th hit the recompile limit and ran eager)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from compinv_rt.engines.compiled_backends import CompileBackend
    from compinv_rt.models.loading import load_model

    counter = CompileCounter()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=counter,
                                                                     dynamic=kw.get("dynamic")))
    torch._dynamo.reset()
    model = load_model(str(tiny_model), device="cpu")
    backend = CompileBackend(model.unet, torch.device("cpu"))
    try:
        for batch in (2, 4, 6, 2):
            for bias in (None, torch.zeros(batch, 77, 16, 16)):
                x = torch.randn(batch, 4, 16, 16)
                out = backend(x, torch.full((batch,), 500.0), torch.randn(batch, 77, 64), bias)
                assert out.shape == x.shape
        assert counter.frame_count <= 2, f"{counter.frame_count} graphs compiled"
    finally:
        torch._dynamo.reset()


# --- onnxruntime ---------------------------------------------------------------------------


def test_ort_cuda_request_without_cuda_provider_fails_before_export(monkeypatch):
    import compinv_rt.export.build as build
    from compinv_rt.engines.registry import BatchShape, open_backend

    monkeypatch.setattr(build, "export_engine", lambda *a, **k: pytest.fail("exported first"))
    model = SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(BackendUnavailable, match="no CUDA provider.*compinv-rt\\[gpu\\]"):
        open_backend("onnxruntime", model, BatchShape(128, 128, 1))


@pytest.mark.slow
def test_ort_cuda_provider_that_falls_back_to_cpu_is_an_error(onnx_engine, monkeypatch):
    """onnxruntime-gpu whose CUDA provider cannot load: the session silently runs on CPU."""
    import onnxruntime as ort

    from compinv_rt.engines.ort_backend import OnnxRuntimeBackend
    from compinv_rt.unet.iospec import UNetIOSpec

    spec = UNetIOSpec.from_dict(json.loads((onnx_engine / "manifest.json").read_text())["io"])
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match="could not start CUDAExecutionProvider.*CPUExecutionProvider"):
        OnnxRuntimeBackend(onnx_engine, spec, torch.device("cuda", 0))
    monkeypatch.undo()
    assert OnnxRuntimeBackend(onnx_engine, spec, torch.device("cpu")).provider == "CPUExecutionProvider"


def test_ort_provider_order_on_gpu():
    from compinv_rt.engines.ort_backend import requested_providers

    cuda = torch.device("cuda", 1)
    got = requested_providers(cuda, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [p[0] for p in got] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert got[1][1]["device_id"] == 1 and got[0][1] == {"device_id": 1}
    assert requested_providers(torch.device("cpu"), ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]


# --- export -> generate --------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_engine(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("work") / "engines"  # generate's default engine cache
    res = runner.invoke(app, ["export", "--format", "onnx", "--model", str(tiny_model), "--out", str(root)])
    assert res.exit_code == 0, res.output
    (engine,) = root.glob("onnx-*")
    return engine


@pytest.mark.slow
def test_generate_reuses_the_engine_export_built(onnx_engine, tiny_model, tmp_path, monkeypatch):
    """`export` with its defaults, then `generate --backend onnxruntime` on the same engine
    folder: no second build (the defaults used to differ in precision and batch profiles)."""
    root = onnx_engine.parent
    monkeypatch.chdir(root.parent)
    before = sorted(p.name for p in root.glob("onnx-*"))
    res = runner.invoke(app, ["generate", "a red star on grass", "--model", str(tiny_model), "--out",
                              str(tmp_path / "o"), "-n", "3", "--steps", "2", "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in root.glob("onnx-*")) == before and "reusing engine" in res.output
    sidecar = json.loads(next((tmp_path / "o").glob("*_[0-9].json")).read_text())
    assert sidecar["backend"] == "onnxruntime" and sidecar["provider"] == "CPUExecutionProvider"


@pytest.mark.slow
def test_export_loads_the_model_at_its_precision(tiny_model, tmp_path, monkeypatch):
    import compinv_rt.models.loading as loading

    seen = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: seen.append(k.get("dtype")) or real(*a, **k))
    res = runner.invoke(app, ["export", "--format", "onnx", "--model", str(tiny_model), "--out",
                              str(tmp_path), "--precision", "fp16", "--batch-sizes", "1"])
    assert res.exit_code == 0, res.output
    assert seen == ["fp16"]
    (engine,) = tmp_path.glob("onnx-*")
    assert json.loads((engine / "manifest.json").read_text())["io"]["precision"] == "fp16"


# --- device placement ------------------------------------------------------------------------


def test_aoti_packages_load_on_the_requested_gpu(tmp_path, monkeypatch):
    from compinv_rt.core.types import Precision
    from compinv_rt.engines.compiled_backends import AOTIBackend
    from compinv_rt.unet.iospec import BatchProfile, UNetIOSpec

    calls = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path, **kw: calls.append((path, kw)) or object())
    spec = UNetIOSpec(4, 4, 77, 64, 16, 16, Precision.fp16)
    profiles = [BatchProfile(2, 2, 2), BatchProfile(4, 4, 4)]
    AOTIBackend(tmp_path, spec, profiles, torch.device("cuda", 1))
    assert [kw.get("device_index") for _, kw in calls] == [1, 1]
    calls.clear()
    AOTIBackend(tmp_path, spec, profiles, torch.device("cuda"))
    assert [kw.get("device_index") for _, kw in calls] == [-1, -1]


def test_ray_reserves_a_gpu_per_actor_on_cuda(monkeypatch):
    from compinv_rt.generate.scaleout import gpus_per_actor

    assert gpus_per_actor(None, "cuda") == 1 and gpus_per_actor(0.5, "cuda") == 0.5
    assert gpus_per_actor(None, "cpu") == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpus_per_actor(None, "auto") == 1
    with pytest.raises(ConfigError, match="all of them would run on cuda:0"):
        gpus_per_actor(0, "cuda")
    with pytest.raises(ConfigError, match="Ray assigns"):
        gpus_per_actor(None, "cuda:1")


# --- packaging -------------------------------------------------------------------------------


def test_doctor_names_the_extra_a_missing_backend_needs(monkeypatch):
    import compinv_rt.apps.doctor as doctor

    real = doctor._version
    missing = {"ray", "onnxruntime", "onnxruntime-gpu"}
    monkeypatch.setattr(doctor, "_version", lambda dist: None if dist in missing else real(dist))
    checks = {c.name: c for c in doctor.run_checks()}
    assert "compinv-rt[scaleout]" in checks["ray"].detail and not checks["ray"].ok
    assert "compinv-rt[gpu]" in checks["onnxruntime"].detail and "compinv-rt[cpu]" in checks["onnxruntime"].detail
    assert "compinv-rt[tensorrt]" in checks["tensorrt"].detail
    # The CPU wheel on a machine with a GPU: not ok, and the fix is the [gpu] extra.
    monkeypatch.setattr(doctor, "_version", real)
    monkeypatch.setattr(doctor, "_cuda_available", lambda: True)
    ort = doctor._onnxruntime()
    assert not ort.ok and "pip uninstall onnxruntime" in ort.detail and "[gpu]" in ort.detail


def test_extras_split_cpu_and_gpu_onnxruntime():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = lambda deps: {d.split("[")[0].split(">")[0].split("=")[0].split("<")[0] for d in deps}  # noqa: E731
    assert "onnxruntime" in names(extras["cpu"]) and "onnxruntime-gpu" not in names(extras["cpu"])
    assert "onnxruntime-gpu" in names(extras["gpu"]) and "onnxruntime" not in names(extras["gpu"])
    assert "tensorrt" in names(extras["tensorrt"]) and "ray" in names(extras["scaleout"])
    assert "matplotlib" in names(project["dependencies"])
    assert not {"onnxruntime", "onnxruntime-gpu"} & names(project["dependencies"])


# --- on a real GPU (skipped here) -------------------------------------------------------------


@pytest.mark.cuda
def test_save_attention_and_onnxruntime_on_cuda(tiny_model, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (benchmarks/gpu_smoke.sh runs the same checks there)")
    res = runner.invoke(app, ["generate", "a red star and a blue circle", "--model", str(tiny_model),
                              "--out", str(tmp_path / "a"), "-n", "2", "--steps", "3", "--device", "cuda",
                              "--layout", "star=0.1,0.2,0.5,0.8", "--spatial", "bias", "--save-attention"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "a").glob("*_attention.png"))) == 2
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here is the CPU build (pip install 'compinv-rt[gpu]')")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["generate", "a red star", "--model", str(tiny_model), "--out",
                              str(tmp_path / "o"), "-n", "1", "--steps", "3", "--device", "cuda",
                              "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    sidecar = json.loads(next((tmp_path / "o").glob("*_[0-9].json")).read_text())
    assert sidecar["provider"] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def test_bench_partial_report_with_only_the_baseline(tmp_path):
    """bench rewrites its report after every cell: the first (stock only) must not fail."""
    from compinv_rt.apps.bench.harness import BenchResult, Cell
    from compinv_rt.apps.bench.report import write_report

    meta = {"model": "m", "label": "", "image_size": [64, 64], "steps": 2, "guidance": 7.5,
            "dtype": "fp32", "device_name": "cpu", "torch": torch.__version__, "repeats": 1,
            "baseline": "stock", "created": "now", "skipped": []}
    result = BenchResult(meta, [Cell("diffusers", 1, False, 2, 10.0, 11.0, 0.5, 2.0, 100.0, 0.0)])
    paths = write_report(result, tmp_path)
    assert paths["json"].is_file() and "diffusers" in paths["markdown"].read_text()
    result.cells.append(Cell("torch", 1, True, 2, 9.0, 9.5, 0.4, 2.5, 100.0, 0.0, step_speedup=1.1,
                             e2e_speedup=1.25, peak_device_mb=12.0, provider="CPUExecutionProvider"))
    paths = write_report(result, tmp_path)
    assert paths["plot"].is_file() and "torch (CPUExecutionProvider)" in paths["markdown"].read_text()
