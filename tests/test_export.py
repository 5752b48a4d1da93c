"""Export stage: IO spec, engine keys and manifests, ONNX graph pattern, backend parity, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.cli import app
from compinv_rt.core.types import Precision
from compinv_rt.export.manifest import EngineFormat, EngineRequest
from compinv_rt.unet.iospec import BatchProfile, UNetIOSpec, batch_profiles

runner = CliRunner()
SPEC = UNetIOSpec(4, 4, 77, 64, 16, 16, Precision.fp32)


def test_io_spec_shapes_and_axes():
    s = SPEC.shapes(6)
    assert s["sample"] == (6, 4, 16, 16) and s["timestep"] == (6,)
    assert s["encoder_hidden_states"] == (6, 77, 64) and s["attention_bias"] == (6, 77, 16, 16)
    assert s["noise_pred"] == (6, 4, 16, 16)
    assert s["bias_gain"] == (6, 2)
    assert set(SPEC.dynamic_axes()) == {"sample", "timestep", "encoder_hidden_states",
                                        "attention_bias", "bias_gain", "noise_pred"}
    assert SPEC.default_input("bias_gain", 3).tolist() == [[1.0, 0.0]] * 3  # the fixed bias
    assert not SPEC.default_input("attention_bias", 3).any()
    assert SPEC.dtype("timestep") == torch.float32
    assert UNetIOSpec(4, 4, 77, 64, 8, 8, Precision.fp16).dtype("sample") == torch.float16
    assert UNetIOSpec.from_dict(SPEC.to_dict()) == SPEC


def test_batch_profiles_static_buckets_and_dynamic_range():
    assert batch_profiles([4, 1, 2], dynamic=False) == [BatchProfile(2, 2, 2), BatchProfile(4, 4, 4),
                                                        BatchProfile(8, 8, 8)]
    assert batch_profiles([1, 2, 4, 8], dynamic=True) == [BatchProfile(2, 8, 16)]
    assert batch_profiles([3], dynamic=False, guidance=False) == [BatchProfile(3, 3, 3)]


def test_bucketing_splits_and_pads():
    from compinv_rt.unet.bucketing import plan_chunks, run_bucketed

    static = [BatchProfile(2, 2, 2), BatchProfile(8, 8, 8)]
    assert plan_chunks(2, static) == [(2, 2)]
    assert plan_chunks(5, static) == [(5, 8)]
    assert plan_chunks(19, static) == [(8, 8), (8, 8), (3, 8)]
    seen = []

    def run(x):
        seen.append(x.shape[0])
        return x * 2

    x = torch.arange(19.0).view(19, 1)
    assert torch.equal(run_bucketed(run, (x,), static), x * 2)
    assert seen == [8, 8, 8]


def _request(**over):
    base = dict(format=EngineFormat.onnx, unet_hash="a" * 64, io=SPEC,
                profiles=(BatchProfile(2, 2, 2),), versions={"torch": "2.13.0"}, device=None,
                options={"opset": 17})
    return EngineRequest(**{**base, **over})


@pytest.mark.parametrize("change", [
    dict(unet_hash="b" * 64), dict(io=UNetIOSpec(4, 4, 77, 64, 16, 16, Precision.fp16)),
    dict(profiles=(BatchProfile(2, 4, 8),)), dict(versions={"torch": "2.14.0"}),
    dict(device="cuda-sm90"), dict(options={"opset": 18}), dict(format=EngineFormat.aoti),
])
def test_engine_key_covers_everything_that_shapes_the_artifact(change):
    assert _request(**change).key != _request().key
    assert _request().key == _request().key


def test_trt_builder_settings_without_tensorrt(tmp_path):
    from compinv_rt.export.tensorrt import trt_build_settings

    spec = UNetIOSpec(4, 4, 77, 64, 16, 16, Precision.fp16)
    s = trt_build_settings(spec, batch_profiles([1, 4], dynamic=False), 4, tmp_path / "cache.bin")
    assert len(s.profiles) == 2  # one optimization profile per bucket
    assert s.profiles[1]["sample"] == ((8, 4, 16, 16),) * 3
    assert s.profiles[0]["attention_bias"][0] == (2, 77, 16, 16)
    kw = s.create_config_kwargs()
    # Strongly typed network: no fp16/bf16 builder flags (gone in TensorRT 11), no TF32 for fp16.
    assert "fp16" not in kw and "bf16" not in kw and kw["tf32"] is False
    assert kw["builder_optimization_level"] == 4
    assert kw["load_timing_cache"] is None  # no cache yet
    (tmp_path / "cache.bin").write_bytes(b"x")
    assert s.create_config_kwargs()["load_timing_cache"] == str(tmp_path / "cache.bin")
    dyn = trt_build_settings(spec, batch_profiles([1, 2, 4, 8], dynamic=True), 3, tmp_path / "c")
    assert dyn.profiles[0]["sample"] == ((2, 4, 16, 16), (8, 4, 16, 16), (16, 4, 16, 16))


def test_trt_build_is_strongly_typed(tmp_path, monkeypatch):
    """The polygraphy calls a build makes (recorded; TensorRT itself is absent here)."""
    import polygraphy.backend.trt as ptrt

    from compinv_rt.export.tensorrt import build_tensorrt_engine, trt_build_settings

    seen = {}
    monkeypatch.setattr(ptrt, "network_from_onnx_path",
                        lambda path, **kw: seen.setdefault("network", kw) and "net")
    monkeypatch.setattr(ptrt, "CreateConfig", lambda **kw: seen.setdefault("config", kw))
    monkeypatch.setattr(ptrt, "engine_bytes_from_network", lambda net, config, **kw: b"plan")
    spec = UNetIOSpec(4, 4, 77, 64, 16, 16, Precision.fp16)
    settings = trt_build_settings(spec, batch_profiles([1, 2], dynamic=False), 3, tmp_path / "c.bin")
    assert build_tensorrt_engine(tmp_path / "unet.onnx", settings, tmp_path) == "unet.plan"
    assert seen["network"] == {"strongly_typed": True}
    assert not {"fp16", "bf16"} & set(seen["config"]) and len(seen["config"]["profiles"]) == 2


def test_trt_engines_and_timing_caches_are_per_gpu_model_and_version(tmp_path):
    from compinv_rt.export.manifest import compute_capability, cuda_device_tag
    from compinv_rt.export.tensorrt import timing_cache_path

    h100 = cuda_device_tag("NVIDIA H100 80GB HBM3", (9, 0))
    h200 = cuda_device_tag("NVIDIA H200", (9, 0))
    assert h100 != h200 and h200 == "cuda-sm90-nvidia-h200"
    assert compute_capability(h100) == compute_capability(h200) == "90"
    assert _request(device=h100).key != _request(device=h200).key
    caches = {timing_cache_path(tmp_path, t, v) for t in (h100, h200) for v in ("10.13.0", "11.1.0")}
    assert len(caches) == 4


# --- real exports of the tiny model --------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_engine(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    res = runner.invoke(app, ["export", "--format", "onnx", "--model", str(tiny_model), "--out",
                              str(root), "--batch-sizes", "1,2,4"])
    assert res.exit_code == 0, res.output
    (engine,) = root.glob("onnx-*")
    return engine


@pytest.mark.slow
def test_onnx_export_writes_checked_graph_and_manifest(onnx_engine, tiny_model):
    import onnx

    onnx.checker.check_model(str(onnx_engine / "unet.onnx"))
    m = json.loads((onnx_engine / "manifest.json").read_text())
    assert m["format"] == "onnx" and m["io"]["inputs"] == ["sample", "timestep",
                                                           "encoder_hidden_states", "attention_bias",
                                                           "bias_gain"]
    # --batch-sizes 1,2,4 with guidance: static UNet buckets 2, 4 and 8
    assert m["profiles"] == [{"min": b, "opt": b, "max": b} for b in (2, 4, 8)]
    assert set(m["artifacts"]) == {"unet.onnx"} and m["versions"]["onnx"] == onnx.__version__
    model = onnx.load(str(onnx_engine / "unet.onnx"))
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states",
                                                    "attention_bias", "bias_gain"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.slow
def test_cross_attention_keeps_tensorrt_fusable_pattern(onnx_engine):
    """Mul(scale) on Q and K -> MatMul -> Add(bias) -> Softmax -> MatMul, for every cross-attention."""
    import onnx

    graph = onnx.load(str(onnx_engine / "unet.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    cross = [n for n in softmaxes if "attn2" in n.name]
    assert len(cross) == 4 and len(softmaxes) == 8  # tiny UNet: 4 cross + 4 self attentions
    for sm in cross:
        add = producer[sm.input[0]]
        assert add.op_type == "Add", sm.name
        matmul = next(producer[i] for i in add.input if i in producer and producer[i].op_type == "MatMul")
        assert [producer[i].op_type for i in matmul.input] == ["Mul", "Mul"], sm.name
        bias_input = next(i for i in add.input if i != matmul.output[0])
        assert "attention_bias" in _ancestors(bias_input, producer)
        assert [c.op_type for c in consumers[sm.output[0]]] == ["MatMul"], sm.name
    for sm in softmaxes:
        if sm not in cross:  # self-attention never sees the bias
            assert producer[sm.input[0]].op_type == "MatMul"


def _ancestors(name, producer, depth=12):
    seen, frontier = set(), {name}
    for _ in range(depth):
        nxt = set()
        for t in frontier:
            if t in producer:
                nxt.update(producer[t].input)
        seen |= nxt
        frontier = nxt
    return seen


@pytest.mark.slow
def test_export_reuses_matching_engine_and_refuses_corrupt_one(tiny_model, tmp_path):
    args = ["export", "--format", "onnx", "--model", str(tiny_model), "--out", str(tmp_path),
            "--batch-sizes", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "built" in first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "reused" in again.output
    (engine,) = tmp_path.glob("onnx-*")
    with open(engine / "unet.onnx", "r+b") as f:  # flip bytes in the middle of the file
        f.seek(2000)
        f.write(b"\xff" * 16)
    bad = runner.invoke(app, args)
    assert bad.exit_code == 1 and "corrupt" in bad.stderr and "--force" in bad.stderr
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0


@pytest.mark.slow
def test_engine_key_ignores_model_path(tiny_model, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_model, copy)
    for m in (tiny_model, copy):
        assert runner.invoke(app, ["export", "--format", "onnx", "--model", str(m), "--out",
                                   str(tmp_path / "e"), "--batch-sizes", "1"]).exit_code == 0
    assert len(list((tmp_path / "e").glob("onnx-*"))) == 1


def _gen(model, out, *extra):
    res = runner.invoke(app, ["generate", "a red star on grass", "--model", str(model), "--out",
                              str(out), "-n", "2", "--steps", "6", "--seed", "5", *extra])
    return res


@pytest.mark.slow
def test_edited_manifest_is_refused(onnx_engine, tiny_model, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(onnx_engine, engine)
    m = json.loads((engine / "manifest.json").read_text())
    m["io"]["latent_height"] = 8
    (engine / "manifest.json").write_text(json.dumps(m))
    res = _gen(tiny_model, tmp_path / "o", "--backend", "onnxruntime", "--engine", str(engine))
    assert res.exit_code == 1 and "edited" in res.stderr


@pytest.mark.slow
def test_engine_of_another_model_is_refused(onnx_engine, tmp_path):
    from compinv_rt.models.architectures import save_model, tiny_components

    other = save_model(tiny_components(seed=1), tmp_path / "other")
    res = _gen(other, tmp_path / "o", "--backend", "onnxruntime", "--engine", str(onnx_engine))
    assert res.exit_code == 1 and "another model" in res.stderr
    assert "\n" not in res.stderr.strip()


@pytest.mark.slow
def test_shape_outside_engine_profile_is_refused(onnx_engine, tiny_model, tmp_path):
    res = _gen(tiny_model, tmp_path / "o", "--backend", "onnxruntime", "--engine", str(onnx_engine),
               "--height", "64")
    assert res.exit_code == 1 and "latents" in res.stderr and "64x128" in res.stderr


def test_unknown_format_and_missing_tensorrt(tiny_model, tmp_path):
    res = runner.invoke(app, ["export", "--format", "openvino", "--model", str(tiny_model)])
    assert res.exit_code == 2 and "openvino" in res.output
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        res = runner.invoke(app, ["export", "--format", "tensorrt", "--model", str(tiny_model),
                                  "--out", str(tmp_path / "e")])
        assert res.exit_code == 1 and "TensorRT is not installed" in res.stderr
        assert not (tmp_path / "e").exists()
        res = _gen(tiny_model, tmp_path / "o", "--backend", "tensorrt")
        assert res.exit_code == 1 and "TensorRT is not installed" in res.stderr


@pytest.mark.slow
def test_dynamo_exporter_needs_opset_18(tiny_model, tmp_path):
    res = runner.invoke(app, ["export", "--format", "onnx", "--exporter", "dynamo", "--opset", "17",
                              "--model", str(tiny_model), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "opset >= 18" in res.stderr


# --- parity of backends on final images -----------------------------------------------------


def _images(model, backend, bias, engine_root, bias_gain=None):
    from compinv_rt.engines.registry import BatchShape, open_backend
    from compinv_rt.models.loading import load_model
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig

    m = load_model(model)  # None = the embedded shapes-world model
    sampling = SamplingConfig(steps=6).resolved(m.files)
    unet = open_backend(backend, m, BatchShape(sampling.height, sampling.width, 2),
                        engines_root=engine_root)
    from compinv_rt.sampling.denoise import AttentionBias

    imgs = Pipeline(m, unet).generate(["a dotted red star and a blue circle on grass"] * 2, [3, 4], sampling,
                                      bias=None if bias is None else AttentionBias(bias, 3, bias_gain))
    return np.stack([np.asarray(i, dtype=np.int16) for i in imgs])


def _bias():
    g = torch.Generator().manual_seed(0)
    return torch.randn((2, 77, 16, 16), generator=g) * 3.0  # both models have 16x16 latents


# The issue asks for parity on the embedded model (real weights, 64x64); torch.compile is checked
# on the tiny model to keep the suite's compile time down (its kernels are the same Inductor's).
# AOTInductor on the embedded model: tests/test_deep_cache_engines.py (its full graph serves plain
# calls, with and without bias and gain, ~1e-5 from torch); plain aoti images: the adaptive test below.
@pytest.mark.parametrize("backend,which", [("onnxruntime", "embedded"), ("compile", "tiny_model")])
@pytest.mark.slow
def test_backend_parity_with_torch(backend, which, request, tmp_path):
    """Final images of every backend match eager PyTorch within 2/255, with and without a bias
    (the bias must also really change the images)."""
    model = None if which == "embedded" else str(request.getfixturevalue(which))
    ref_plain = _images(model, "torch", None, tmp_path)
    ref_bias = _images(model, "torch", _bias(), tmp_path)
    assert np.abs(ref_plain - ref_bias).max() > 10
    got_plain = _images(model, backend, None, tmp_path)
    got_bias = _images(model, backend, _bias(), tmp_path)
    assert np.abs(got_plain - ref_plain).max() <= 2
    assert np.abs(got_bias - ref_bias).max() <= 2


def test_zero_bias_is_bit_identical_to_stock_unet(tiny_model):
    from diffusers import UNet2DConditionModel

    from compinv_rt.unet.attention import BiasedUNet

    stock = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()
    ours = BiasedUNet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval())
    x, t, e = SPEC.example_inputs(4)[:3]
    with torch.no_grad():
        ref = stock(x, t, encoder_hidden_states=e).sample
        assert torch.equal(ours(x, t, e, torch.zeros(4, 77, 16, 16)), ref)
        assert torch.equal(ours(x, t, e, None), ref)
        assert not torch.equal(ours(x, t, e, torch.full((4, 77, 16, 16), 4.0) * (torch.rand(4, 77, 16, 16) > 0.5)), ref)


# AOTI compiles the tiny UNet (~45 s): slow, outside the quick subset.
@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("aoti", marks=pytest.mark.slow)])
def test_adaptive_bias_parity_with_torch(backend, tiny_model, tmp_path):
    """The adaptive bias (spread computed inside the graph, a per-step gain schedule fed as the
    bias_gain input) gives the same images on engines as eager PyTorch, and other images than
    the fixed bias."""
    from compinv_rt.spatial.bias_maps import BiasSchedule

    schedule = BiasSchedule(2.0)
    ref_fixed = _images(str(tiny_model), "torch", _bias(), tmp_path)
    ref = _images(str(tiny_model), "torch", _bias(), tmp_path, schedule)
    assert np.abs(ref - ref_fixed).max() > 10
    got = _images(str(tiny_model), backend, _bias(), tmp_path, schedule)
    assert np.abs(got - ref).max() <= 2


def test_zero_bias_with_adaptive_gain_is_bit_identical_to_stock_unet(tiny_model):
    from diffusers import UNet2DConditionModel

    from compinv_rt.unet.attention import BiasedUNet

    stock = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()
    ours = BiasedUNet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval())
    x, t, e = SPEC.example_inputs(4)[:3]
    zero = torch.zeros(4, 77, 16, 16)
    with torch.no_grad():
        ref = stock(x, t, encoder_hidden_states=e).sample
        for gain in ([0.0, 3.0], [1.0, 0.0], [0.5, 100.0]):
            assert torch.equal(ours(x, t, e, zero, torch.tensor([gain] * 4)), ref), gain
        bias = torch.full((4, 77, 16, 16), 4.0) * (torch.rand(4, 77, 16, 16) > 0.5)
        assert not torch.equal(ours(x, t, e, bias, torch.tensor([[0.0, 3.0]] * 4)), ref)


def test_engine_of_an_older_contract_is_refused_clearly(onnx_engine, tiny_model, tmp_path):
    """An engine exported before bias_gain existed: one line that says to re-export, not
    'edited' or a shape error."""
    engine = tmp_path / "engine"
    shutil.copytree(onnx_engine, engine)
    m = json.loads((engine / "manifest.json").read_text())
    m["io"]["inputs"] = ["sample", "timestep", "encoder_hidden_states", "attention_bias"]
    (engine / "manifest.json").write_text(json.dumps(m))
    res = _gen(tiny_model, tmp_path / "o", "--backend", "onnxruntime", "--engine", str(engine))
    err = res.stderr.strip()
    assert res.exit_code == 1 and "another UNet contract" in err and "re-export" in err, err
    assert "bias_gain" in err and "\n" not in err


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_torch(tiny_model, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    ref = _images(str(tiny_model), "torch", _bias(), tmp_path)
    got = _images(str(tiny_model), "tensorrt", _bias(), tmp_path)
    assert np.abs(got - ref).max() <= 4  # fp32 engine built with TF32 allowed


@pytest.mark.slow
def test_triton_repository_from_onnx_engine(onnx_engine, tmp_path):
    from compinv_rt.export.triton import write_triton_repository

    model_dir = write_triton_repository([onnx_engine], tmp_path / "repo")
    cfg = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cfg
    for line in ('name: "sample" data_type: TYPE_FP32 dims: [ -1, 4, 16, 16 ]',
                 'name: "timestep" data_type: TYPE_FP32 dims: [ -1 ]',
                 'name: "encoder_hidden_states" data_type: TYPE_FP32 dims: [ -1, 77, 64 ]',
                 'name: "attention_bias" data_type: TYPE_FP32 dims: [ -1, 77, 16, 16 ]',
                 'name: "noise_pred" data_type: TYPE_FP32 dims: [ -1, 4, 16, 16 ]'):
        assert line in cfg
    assert (model_dir / "1" / "model.onnx").read_bytes() == (onnx_engine / "unet.onnx").read_bytes()


@pytest.mark.slow
def test_triton_repository_maps_plans_to_compute_capabilities(onnx_engine, tmp_path):
    """TensorRT plans of one model for two GPUs -> cc_model_filenames (plans are opaque bytes here)."""
    from compinv_rt.export.triton import write_triton_repository

    engines = []
    for sm in ("90", "80"):
        d = tmp_path / f"trt{sm}"
        d.mkdir()
        m = json.loads((onnx_engine / "manifest.json").read_text())
        m.update(format="tensorrt", device=f"cuda-sm{sm}")
        m["io"]["precision"] = "fp16"
        (d / "manifest.json").write_text(json.dumps(m))
        (d / "unet.plan").write_bytes(sm.encode())
        engines.append(d)
    model_dir = write_triton_repository(engines, tmp_path / "repo")
    cfg = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in cfg and "graphs: true" in cfg
    # Every batch bucket is reachable: the instance group lists each of the manifest's profiles.
    import re

    from compinv_rt.export.manifest import profiles_of

    manifest_profiles = profiles_of(json.loads((engines[0] / "manifest.json").read_text()))
    assert len(manifest_profiles) == 3
    listed = re.search(r"profile: \[ (.*?) \]", cfg).group(1)
    assert listed == ", ".join(f'"{i}"' for i in range(len(manifest_profiles)))
    ranges = re.findall(r"#   profile (\d+): (\d+)-(\d+)", cfg)
    assert [(int(a), int(b)) for _, a, b in ranges] == [(p.min, p.max) for p in manifest_profiles]
    assert '{ key: "9.0" value: "model_sm90.plan" }' in cfg and '{ key: "8.0" value: "model_sm80.plan" }' in cfg
    assert "TYPE_FP16 dims: [ -1, 4, 16, 16 ]" in cfg and 'name: "timestep" data_type: TYPE_FP32' in cfg
    assert (model_dir / "1" / "model_sm80.plan").read_bytes() == b"80"


def test_built_profiles_leave_unguided_steps_unpadded():
    """Compiled engines built for a guided run take B..2B rows (a step outside the guidance
    interval runs B rows, not padded to 2B); B = 1 stays a static 2; ONNX Runtime takes any batch."""
    from compinv_rt.engines.registry import build_profiles
    from compinv_rt.export.manifest import EngineFormat
    from compinv_rt.unet.bucketing import plan_chunks
    from compinv_rt.unet.iospec import BatchProfile

    aoti = build_profiles(EngineFormat.aoti, 8, guidance=True)
    assert aoti == [BatchProfile(8, 16, 16)]
    assert plan_chunks(8, aoti) == [(8, 8)] and plan_chunks(16, aoti) == [(16, 16)]
    assert build_profiles(EngineFormat.tensorrt, 1, guidance=True) == [BatchProfile(2, 2, 2)]
    assert build_profiles(EngineFormat.aoti, 4, guidance=False) == [BatchProfile(4, 4, 4)]
    assert build_profiles(EngineFormat.onnx, 8, guidance=True)[0].max >= 128
