"""DeepCache inside the engines (issue 23): the full and shallow graphs as one export contract
(UNetIOSpec.deep_cache), exported by every format and run by every engine backend, against the
eager reference (TorchBackend.full / .shallow). ONNX Runtime and AOTInductor run for real on CPU;
TensorRT through the stand-in (tests/fake_tensorrt.py), whose plans run the exported ONNX graphs."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import fake_tensorrt as ft  # noqa: E402

from compinv_rt.apps.cli import app  # noqa: E402
from compinv_rt.core.errors import ConfigError, EngineMismatch  # noqa: E402
from compinv_rt.core.types import Precision  # noqa: E402
from compinv_rt.export.manifest import EngineFormat, EngineRequest  # noqa: E402
from compinv_rt.unet.iospec import (  # noqa: E402
    DEEP_FEATURES,
    FULL_GRAPH,
    PLAIN_GRAPH,
    SHALLOW_GRAPH,
    BatchProfile,
    UNetIOSpec,
)

runner = CliRunner()
PLAIN = UNetIOSpec(4, 4, 77, 64, 16, 16, Precision.fp32)
DEEP = UNetIOSpec(4, 4, 77, 64, 16, 16, Precision.fp32, deep_cache=True, deep_channels=64)
TOL = 1e-3  # fp32 engines against eager PyTorch (measured: a few 1e-6)
EXPORT_SECONDS: dict[str, float] = {}  # printed by -s runs: what each export of this module took


# --- the contract (no export) --------------------------------------------------------------


def test_deep_cache_contract():
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir

    files = inspect_model_dir(resolve_model_dir(None))
    spec = UNetIOSpec.for_model(files, 64, 64, "fp32", deep_cache=True)
    assert spec == DEEP and spec.without_cache() == PLAIN
    assert UNetIOSpec.for_model(files, 64, 64, "fp32") == PLAIN
    assert spec.shapes(3)[DEEP_FEATURES] == (3, 64, 16, 16) and DEEP_FEATURES not in PLAIN.shapes(3)
    assert spec.graphs() == (FULL_GRAPH, SHALLOW_GRAPH) and PLAIN.graphs() == (PLAIN_GRAPH,)
    assert FULL_GRAPH.outputs == ("noise_pred", DEEP_FEATURES) and SHALLOW_GRAPH.inputs[-1] == DEEP_FEATURES
    assert FULL_GRAPH.stem == PLAIN_GRAPH.stem == "unet" and SHALLOW_GRAPH.stem == "unet_shallow"
    assert set(spec.dynamic_axes(SHALLOW_GRAPH)) == {*PLAIN.dynamic_axes(), DEEP_FEATURES}
    assert [t.shape for t in spec.example_inputs(2, graph=SHALLOW_GRAPH)][-1] == (2, 64, 16, 16)
    assert spec.dtype(DEEP_FEATURES) == torch.float32
    d = spec.to_dict()
    assert d["deep_cache"] is True and d["deep_channels"] == 64 and UNetIOSpec.from_dict(d) == spec
    assert d["inputs"] == PLAIN.to_dict()["inputs"]  # the plain inputs: what verify_engine checks
    with pytest.raises(ConfigError, match="both or neither"):
        UNetIOSpec(4, 4, 77, 64, 16, 16, Precision.fp32, deep_cache=True)


def test_plain_specs_and_keys_are_what_they_were():
    """Engines exported before DeepCache keep their io dict (find_engine compares it exactly) and
    their key (the folder name): the key below was computed before deep_cache existed."""
    old_io = {"in_channels": 4, "out_channels": 4, "text_len": 77, "text_dim": 64, "latent_height": 16,
              "latent_width": 16, "precision": "fp32",
              "inputs": ["sample", "timestep", "encoder_hidden_states", "attention_bias", "bias_gain"],
              "outputs": ["noise_pred"]}
    assert PLAIN.to_dict() == old_io and UNetIOSpec.from_dict(old_io) == PLAIN
    request = EngineRequest(EngineFormat.onnx, "a" * 64, PLAIN, (BatchProfile(2, 2, 2),),
                            {"torch": "2.13.0"}, None, {"opset": 17})
    assert request.key == "05bfc9c5af6908a0b92150d6f78f295cb2ef4e06f18c6f859e66533fab42d384"
    assert EngineRequest(EngineFormat.onnx, "a" * 64, DEEP, (BatchProfile(2, 2, 2),),
                         {"torch": "2.13.0"}, None, {"opset": 17}).key != request.key


def test_a_unet_deep_cache_cannot_split_is_refused():
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir

    files = inspect_model_dir(resolve_model_dir(None))
    other = SimpleNamespace(**{k: getattr(files, k) for k in ("spatial_factor", "vae_scale_factor", "text_len")},
                            unet_config={**files.unet_config, "class_embed_type": "timestep"})
    assert UNetIOSpec.for_model(other, 64, 64, "fp32") == PLAIN  # uncached: fine
    with pytest.raises(ConfigError, match="class_embed_type"):
        UNetIOSpec.for_model(other, 64, 64, "fp32", deep_cache=True)


def test_plain_backends_have_no_shallow_path():
    """The pipeline decides caching support by hasattr(backend, "shallow")."""
    from compinv_rt.engines.compiled_backends import AOTIBackend, CachedAOTIBackend, CompileBackend
    from compinv_rt.engines.ort_backend import CachedOnnxRuntimeBackend, OnnxRuntimeBackend
    from compinv_rt.engines.trt_backend import CachedTensorRTBackend, TensorRTBackend

    for plain in (OnnxRuntimeBackend, AOTIBackend, TensorRTBackend, CompileBackend):
        assert not hasattr(plain, "shallow") and not hasattr(plain, "full"), plain
    for cached in (CachedOnnxRuntimeBackend, CachedAOTIBackend, CachedTensorRTBackend):
        assert callable(cached.full) and callable(cached.shallow)


def test_bucketing_of_several_outputs():
    from compinv_rt.unet.bucketing import run_bucketed_outputs

    seen = []

    def run(x, y):
        seen.append(x.shape[0])
        return x * 2, torch.cat([x, y], 1)

    x, y = torch.arange(5.0).view(5, 1), torch.arange(5.0, 10.0).view(5, 1)
    a, b = run_bucketed_outputs(run, (x, y), [BatchProfile(2, 2, 2)])
    assert seen == [2, 2, 2]  # 2 + 2 + 1 padded to 2
    assert torch.equal(a, x * 2) and torch.equal(b, torch.cat([x, y], 1))


def test_tensorrt_settings_of_each_graph(tmp_path):
    from compinv_rt.export.tensorrt import trt_build_settings

    profiles = [BatchProfile(2, 2, 2), BatchProfile(4, 6, 8)]
    plain = trt_build_settings(PLAIN, profiles, 3, tmp_path / "c.bin")
    full = trt_build_settings(DEEP, profiles, 3, tmp_path / "c.bin", FULL_GRAPH)
    shallow = trt_build_settings(DEEP, profiles, 3, tmp_path / "c.bin", SHALLOW_GRAPH)
    assert (plain.plan_file, full.plan_file, shallow.plan_file) == ("unet.plan", "unet.plan", "unet_shallow.plan")
    assert full.profiles == plain.profiles  # the same inputs, the same optimization profiles
    assert list(shallow.profiles[1]) == [*plain.profiles[1], DEEP_FEATURES]
    assert shallow.profiles[1][DEEP_FEATURES] == ((4, 64, 16, 16), (6, 64, 16, 16), (8, 64, 16, 16))


def _fake_engine(root: Path, files, spec: UNetIOSpec, created: str, fmt: EngineFormat = EngineFormat.onnx,
                 profiles: tuple = (BatchProfile(2, 2, 2),)) -> Path:
    from compinv_rt.export.manifest import device_tag, tool_versions, unet_files, write_manifest
    from compinv_rt.models.loading import content_hash

    request = EngineRequest(fmt, content_hash(unet_files(files)), spec, profiles,
                            tool_versions(fmt), device_tag(fmt, "cpu"), {})
    d = root / request.dirname
    d.mkdir(parents=True)
    (d / "unet.onnx").write_bytes(b"graph")
    write_manifest(d, request, ["unet.onnx"], {})
    m = json.loads((d / "manifest.json").read_text())
    m["created"] = created  # not in the key or the seal
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_find_engine_picks_by_caching(tmp_path):
    """A run that caches takes deep-cache engines only; one that does not takes a plain engine
    first (even an older one) and else a deep-cache one, whose full graph serves it."""
    from compinv_rt.export.build import find_engine
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir

    model = SimpleNamespace(files=inspect_model_dir(resolve_model_dir(None)), device=torch.device("cpu"))
    root = tmp_path / "engines"
    deep = _fake_engine(root, model.files, DEEP, "2030-01-02T00:00:00+00:00")
    assert find_engine(EngineFormat.onnx, model, DEEP, root, 2)[0] == deep
    assert find_engine(EngineFormat.onnx, model, PLAIN, root, 2)[0] == deep
    plain = _fake_engine(root, model.files, PLAIN, "2030-01-01T00:00:00+00:00")
    assert find_engine(EngineFormat.onnx, model, PLAIN, root, 2)[0] == plain
    assert find_engine(EngineFormat.onnx, model, DEEP, root, 2)[0] == deep
    shutil.rmtree(deep)
    assert find_engine(EngineFormat.onnx, model, DEEP, root, 2) is None
    other = UNetIOSpec(4, 4, 77, 64, 16, 16, Precision.fp16, deep_cache=True, deep_channels=64)
    _fake_engine(root, model.files, other, "2031-01-01T00:00:00+00:00")  # another precision
    assert find_engine(EngineFormat.onnx, model, PLAIN, root, 2)[0] == plain


def test_static_engines_are_reused_only_when_they_pad_at_most_2x(tmp_path):
    """A 1-image run (UNet batch 2) once reused a batch-16 AOTInductor engine and ran every call
    at 16 rows; now the tightest engine wins, and one that pads more than 2x is passed over."""
    from compinv_rt.export.build import find_engine, padded_batch
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir

    assert padded_batch([{"min": 16, "max": 16}], 2) == 16
    assert padded_batch([{"min": 16, "max": 16}, {"min": 2, "max": 2}], 2) == 2
    assert padded_batch([{"min": 4, "max": 8}], 5) == 5
    assert padded_batch([{"min": 2, "max": 2}], 4) is None
    model = SimpleNamespace(files=inspect_model_dir(resolve_model_dir(None)), device=torch.device("cpu"))
    root = tmp_path / "engines"
    aoti = EngineFormat.aoti
    big = _fake_engine(root, model.files, PLAIN, "2030-01-03T00:00:00+00:00", aoti, (BatchProfile(16, 16, 16),))
    assert find_engine(aoti, model, PLAIN, root, 16)[0] == big
    assert find_engine(aoti, model, PLAIN, root, 8)[0] == big  # 2x: reused
    assert find_engine(aoti, model, PLAIN, root, 2) is None  # 8x: a tight engine is built instead
    small = _fake_engine(root, model.files, PLAIN, "2030-01-01T00:00:00+00:00", aoti, (BatchProfile(2, 2, 2),))
    assert find_engine(aoti, model, PLAIN, root, 2)[0] == small
    mid = _fake_engine(root, model.files, PLAIN, "2030-01-02T00:00:00+00:00", aoti, (BatchProfile(12, 12, 12),))
    assert find_engine(aoti, model, PLAIN, root, 8)[0] == mid  # pads less than the newer batch-16 one
    assert find_engine(EngineFormat.onnx, model, PLAIN, root, 2) is None  # formats stay apart


# --- real engines of the embedded model (64x64: 16x16 latents) ------------------------------


@pytest.fixture(scope="module")
def model():
    from compinv_rt.models.loading import load_model

    return load_model(None, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference(model):
    from compinv_rt.unet.backends import TorchBackend

    return TorchBackend(model.unet)


def _timed(name, fn):
    start = time.perf_counter()
    out = fn()
    EXPORT_SECONDS[name] = time.perf_counter() - start
    print(f"\nexport {name}: {EXPORT_SECONDS[name]:.1f} s")
    return out


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory):
    """`compinv-rt export --deep-cache`: the one deep-cache ONNX engine of this module."""
    root = tmp_path_factory.mktemp("deep-engines")
    res = _timed("onnx --deep-cache", lambda: runner.invoke(app, [
        "export", "--format", "onnx", "--deep-cache", "--batch-sizes", "1,2", "--out", str(root)]))
    assert res.exit_code == 0, res.output
    (engine,) = root.glob("onnx-*")
    assert sorted(json.loads((engine / "manifest.json").read_text())["artifacts"]) == [
        "unet.onnx", "unet_shallow.onnx"]
    return root


def _inputs(batch: int, conditioning: int, seed: int = 0) -> tuple:
    """(sample, timestep, text[, bias[, gain]]): `conditioning` 0, 1 or 2 of the optional inputs."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, 4, 16, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g).float(),
         torch.randn(batch, 77, 64, generator=g), torch.randn(batch, 77, 16, 16, generator=g) * 3,
         torch.tensor([[0.5, 2.0]] * batch))
    return x[:3 + conditioning]


def _max_diffs(backend, reference, batch: int, conditioning: int) -> tuple[float, float, float, float]:
    """Max abs differences to eager PyTorch: full's noise and deep features, shallow's noise at
    another step (other latents and timestep) on each side's own full-step features, and the plain
    call."""
    x, later = _inputs(batch, conditioning, seed=batch), _inputs(batch, conditioning, seed=batch + 10)
    ref_noise, ref_deep = reference.full(*x)
    noise, deep = backend.full(*x)
    assert noise.shape == ref_noise.shape and deep.shape == ref_deep.shape == (batch, 64, 16, 16)
    shallow = backend.shallow(*later, deep_features=deep)
    ref_shallow = reference.shallow(*later, deep_features=ref_deep)
    assert (ref_shallow - reference(*later)).abs().max() > 1e-2  # kept features: not the full UNet
    plain = backend(*x)
    return tuple(float((a - b).abs().max()) for a, b in
                 ((noise, ref_noise), (deep, ref_deep), (shallow, ref_shallow), (plain, reference(*x))))


def _assert_parity(backend, reference, batches) -> None:
    worst = [0.0] * 4
    for batch in batches:
        for conditioning in (0, 1, 2):
            diffs = _max_diffs(backend, reference, batch, conditioning)
            worst = [max(w, d) for w, d in zip(worst, diffs)]
    print(f"\n{backend.name}: max abs diff full noise {worst[0]:.2e}, deep features {worst[1]:.2e}, "
          f"shallow noise {worst[2]:.2e}, plain call {worst[3]:.2e}")
    assert max(worst) <= TOL, worst


@pytest.mark.slow
def test_onnxruntime_caching_path_matches_torch(model, reference, onnx_root):
    from compinv_rt.engines.ort_backend import CachedOnnxRuntimeBackend
    from compinv_rt.engines.registry import BatchShape, open_backend

    backend = open_backend("onnxruntime", model, BatchShape(64, 64, 2, deep_cache=True), engines_root=onnx_root)
    assert isinstance(backend, CachedOnnxRuntimeBackend)
    assert len(list(onnx_root.glob("onnx-*"))) == 1  # found what export built
    _assert_parity(backend, reference, batches=(1, 3))


@pytest.mark.slow
def test_deep_cache_engine_serves_uncached_runs_and_plain_engines_do_not_cache(model, reference, onnx_root,
                                                                              tmp_path):
    from compinv_rt.engines.ort_backend import OnnxRuntimeBackend
    from compinv_rt.engines.registry import BatchShape, open_backend
    from compinv_rt.export.manifest import verify_engine

    # Only a deep-cache engine there: a run without caching uses it (no build), its full graph.
    backend = open_backend("onnxruntime", model, BatchShape(64, 64, 2), engines_root=onnx_root)
    assert hasattr(backend, "shallow") and len(list(onnx_root.glob("onnx-*"))) == 1
    x = _inputs(3, 2)
    assert float((backend(*x) - reference(*x)).abs().max()) <= TOL
    # A plain engine (as every engine exported before DeepCache): its manifest verifies, a plain run
    # prefers it, its backend has no shallow path, and a caching run refuses it as --engine.
    root = tmp_path / "engines"
    res = _timed("onnx (plain)", lambda: runner.invoke(app, [
        "export", "--format", "onnx", "--batch-sizes", "1,2", "--out", str(root)]))
    assert res.exit_code == 0, res.output
    (plain,) = root.glob("onnx-*")
    manifest = verify_engine(plain, fmt=EngineFormat.onnx, device="cpu")
    assert "deep_cache" not in manifest["io"] and manifest["artifacts"].keys() == {"unet.onnx"}
    (deep,) = onnx_root.glob("onnx-*")
    shutil.copytree(deep, root / deep.name)
    backend = open_backend("onnxruntime", model, BatchShape(64, 64, 2), engines_root=root)
    assert type(backend) is OnnxRuntimeBackend and not hasattr(backend, "shallow")
    assert float((backend(*x) - reference(*x)).abs().max()) <= TOL
    assert hasattr(open_backend("onnxruntime", model, BatchShape(64, 64, 2, deep_cache=True),
                                engines_root=root), "shallow")
    with pytest.raises(EngineMismatch, match="--deep-cache"):
        open_backend("onnxruntime", model, BatchShape(64, 64, 2, deep_cache=True), engine=plain)


def _images(model, backend, cache_interval: int, bias) -> np.ndarray:
    from compinv_rt.sampling.denoise import AttentionBias
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig

    cfg = SamplingConfig(steps=6, cache_interval=cache_interval).resolved(model.files)
    imgs = Pipeline(model, backend).generate(["a dotted red star and a blue circle on grass"] * 2, [3, 4], cfg,
                                             bias=None if bias is None else AttentionBias(bias, 3))
    return np.stack([np.asarray(i, dtype=np.int16) for i in imgs])


@pytest.mark.slow
def test_cached_generation_on_onnxruntime_matches_torch(model, reference, onnx_root):
    """Pipeline.generate with cache_interval=3 (full steps 0 and 3, shallow steps between): the
    same images on ONNX Runtime as on eager PyTorch. The UNet outputs differ by ~1e-6 (above), so an
    image can differ only where a value sits at an 8-bit rounding boundary: one level. Measured: max
    1/255, with and without a bias; 2 would be a real divergence."""
    from compinv_rt.engines.registry import BatchShape, open_backend

    backend = open_backend("onnxruntime", model, BatchShape(64, 64, 2, deep_cache=True), engines_root=onnx_root)
    bias = torch.randn((2, 77, 16, 16), generator=torch.Generator().manual_seed(0)) * 3.0
    for b in (None, bias):
        ref = _images(model, reference, 3, b)
        assert np.abs(ref - _images(model, reference, 1, b)).max() > 2  # caching changes the images
        got = _images(model, backend, 3, b)
        print(f"\ncached images, bias={b is not None}: max |onnxruntime - torch| = {np.abs(got - ref).max()}/255")
        assert np.abs(got - ref).max() <= 1


@pytest.fixture(scope="module")
def aoti_backend(model, tmp_path_factory):
    """One deep-cache AOTInductor engine per module, built by open_backend for a caching run:
    UNet batch 2 (one image with guidance), a package pair (full, shallow)."""
    from compinv_rt.engines.registry import BatchShape, open_backend

    root = tmp_path_factory.mktemp("aoti-engines")
    backend = _timed("aoti (deep cache, built by open_backend)", lambda: open_backend(
        "aoti", model, BatchShape(64, 64, 1, deep_cache=True), engines_root=root))
    (engine,) = root.glob("aoti-*")
    assert sorted(json.loads((engine / "manifest.json").read_text())["artifacts"]) == [
        "unet_b2-2.pt2", "unet_shallow_b2-2.pt2"]
    return backend


# AOTI compiles the embedded UNet's two graphs (~1-2 min each): slow, outside the quick subset.
@pytest.mark.slow
def test_aoti_caching_path_matches_torch(aoti_backend, reference):
    """Batch 1 (padded to the engine's 2) and 3 (split 2 + 1, padded): features split with the rest."""
    _assert_parity(aoti_backend, reference, batches=(1, 3))


@pytest.fixture
def trt(monkeypatch):
    return ft.install(monkeypatch)


@pytest.fixture(scope="module")
def trt_engine(model, tmp_path_factory):
    """A deep-cache TensorRT engine folder built by the exporter (export/build.py: both ONNX graphs,
    one plan each) with TensorRT's builder replaced by the stand-in's: its plans run the graphs."""
    import polygraphy.backend.trt as ptrt

    from compinv_rt.export.build import ExportOptions, _build
    from compinv_rt.export.manifest import device_tag, tool_versions, unet_files, write_manifest
    from compinv_rt.models.loading import content_hash

    out = tmp_path_factory.mktemp("trt-engine")
    fmt, profiles = EngineFormat.tensorrt, [BatchProfile(2, 2, 2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", ft)
        mp.setattr(ptrt, "network_from_onnx_path", lambda path, **kw: path)
        mp.setattr(ptrt, "CreateConfig", lambda profiles, **kw: SimpleNamespace(profiles=profiles))
        mp.setattr(ptrt, "engine_bytes_from_network", lambda net, config, **kw: ft.build_plan(net, config.profiles))
        options = ExportOptions().for_format(fmt)
        artifacts, _ = _timed("tensorrt (stand-in, deep cache)",
                              lambda: _build(fmt, model, DEEP, profiles, out, options))
        request = EngineRequest(fmt, content_hash(unet_files(model.files)), DEEP, tuple(profiles),
                                tool_versions(fmt), device_tag(fmt, "cpu"), options)
        write_manifest(out, request, artifacts, {})
    assert artifacts == ["unet.onnx", "unet_shallow.onnx", "unet.plan", "unet_shallow.plan"]
    return out


@pytest.mark.slow
def test_tensorrt_caching_path_matches_torch(trt, model, reference, trt_engine):
    """Through open_backend(--engine): two plans whose contexts share one memory block, static
    profile (CUDA graphs captured, then replayed), batch 1 padded and 3 split."""
    from compinv_rt.engines.registry import BatchShape, open_backend
    from compinv_rt.engines.trt_backend import CachedTensorRTBackend

    backend = open_backend("tensorrt", model, BatchShape(64, 64, 1, deep_cache=True), engine=trt_engine)
    assert isinstance(backend, CachedTensorRTBackend)
    shallow = backend.plans[SHALLOW_GRAPH]
    assert shallow.inputs == ("sample", "timestep", DEEP_FEATURES)  # the shallow path reads no text here
    _assert_parity(backend, reference, batches=(1, 3))
    assert len({c[2] for c in ft.CALLS if c[0] == "set_device_memory"}) == 1  # one block, both plans
    assert len([c for c in ft.CALLS if c[0] == "replay"]) > 0
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.full(*_inputs(1, 0))
