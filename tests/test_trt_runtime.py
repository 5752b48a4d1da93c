"""The TensorRT runtime's logic on CPU: a stand-in `tensorrt` module (tests/fake_tensorrt.py,
injected through sys.modules) and a recording torch.cuda (streams, synchronize, graph capture).
What a GPU adds (real kernels) is covered by the `tensorrt`-marked tests in test_export.py."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fake_tensorrt as ft  # noqa: E402

from compinv_rt.errors import EngineMismatch  # noqa: E402
from compinv_rt.export.iospec import BatchProfile, Precision, UNetIOSpec  # noqa: E402

MAIN_STREAM, CAPTURE_STREAM = 7, 99


class FakeGraph:
    def __init__(self):
        self.work = []

    def replay(self):
        ft.CALLS.append(("replay",))
        for w in self.work:
            w()


@pytest.fixture
def trt(monkeypatch):
    """Inject the stand-in and a torch.cuda that records instead of touching a GPU."""
    monkeypatch.setitem(sys.modules, "tensorrt", ft)
    ft.CALLS.clear()
    ft.CAPTURING.clear()

    @contextmanager
    def graph(g, *args, **kwargs):
        ft.CALLS.append(("capture_begin",))
        ft.CAPTURING.append(g)
        try:
            yield
        finally:
            ft.CAPTURING.pop()
            ft.CALLS.append(("capture_end",))

    stream = lambda device=None: SimpleNamespace(  # noqa: E731
        cuda_stream=CAPTURE_STREAM if ft.CAPTURING else MAIN_STREAM)
    monkeypatch.setattr(torch.cuda, "current_stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: ft.CALLS.append(("synchronize",)))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return ft


def _spec(precision=Precision.fp32):
    return UNetIOSpec(in_channels=4, out_channels=4, text_len=3, text_dim=8, latent_height=2,
                      latent_width=2, precision=precision)


def _engine(tmp_path, profiles, dtype="FLOAT", memory=4096):
    (tmp_path / "unet.plan").write_text(json.dumps(
        {"profiles": [[p.min, p.max] for p in profiles], "dtype": dtype, "memory": memory}))
    return tmp_path


def _backend(tmp_path, profiles, cuda_graphs=True, spec=None, plan_profiles=None, **plan):
    from compinv_rt.runtime.trt_backend import TensorRTBackend

    engine = _engine(tmp_path, plan_profiles or profiles, **plan)
    return TensorRTBackend(engine, spec or _spec(), profiles, torch.device("cpu"), cuda_graphs=cuda_graphs)


def _inputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    spec = _spec()
    sh = spec.shapes(batch)
    return (torch.randn(sh["sample"], generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(sh["encoder_hidden_states"], generator=g), torch.randn(sh["attention_bias"], generator=g))


def _expected(sample, timestep, ehs, bias):
    b = sample.shape[0]
    rows = ehs.reshape(b, -1).mean(1) + bias.reshape(b, -1).mean(1) + timestep / 1000
    return 2 * sample + rows[:, None, None, None]


def _calls(name):
    return [c for c in ft.CALLS if c[0] == name]


def test_dynamic_profile_rebinds_on_every_batch_change(trt, tmp_path):
    """One dynamic profile (export --dynamic): batches 2 -> 4 -> 2 must each run on their own
    shapes and buffers (the third call used to run on the batch-4 bindings)."""
    backend = _backend(tmp_path, [BatchProfile(2, 4, 8)])
    for step, batch in enumerate([2, 4, 2, 2, 4]):
        x = _inputs(batch, seed=step)
        got = backend(*x)
        assert got.shape[0] == batch
        torch.testing.assert_close(got, _expected(*x), rtol=1e-5, atol=1e-5)
    shapes = [c[3][0] for c in _calls("set_input_shape") if c[2] == "sample"]
    assert shapes == [2, 4, 2, 4]  # rebound on each change, not on a repeat (2 -> 2)
    assert not _calls("capture_begin")  # no CUDA graph on a dynamic profile


def test_static_profiles_switch_contexts_and_capture_in_order(trt, tmp_path):
    backend = _backend(tmp_path, [BatchProfile(2, 2, 2), BatchProfile(4, 4, 4)])
    for step, batch in enumerate([2, 4, 2, 4, 4, 2]):
        x = _inputs(batch, seed=10 + step)
        torch.testing.assert_close(backend(*x), _expected(*x), rtol=1e-5, atol=1e-5)
    # Each context is bound once, to its own batch.
    bound = {(c[1], c[3][0]) for c in _calls("set_input_shape")}
    assert bound == {(0, 2), (1, 4)}
    assert len(_calls("set_input_shape")) == 2 * len(ft.INPUTS)
    # Per batch: bind -> plain run -> synchronize -> capture (on the capture stream) -> replays.
    for ctx in (0, 1):
        events = [c for c in ft.CALLS if c[0] in ("synchronize", "capture_begin", "capture_end", "replay")
                  or (len(c) > 1 and c[1] == ctx)]
        names = [c[0] for c in events]
        first_exec = names.index("execute_async_v3")
        assert names.index("set_input_shape") < first_exec
        assert events[first_exec][2:] == (MAIN_STREAM, False)
        assert names[first_exec + 1:first_exec + 3] == ["synchronize", "capture_begin"]
        assert events[first_exec + 3] == ("execute_async_v3", ctx, CAPTURE_STREAM, True)
    assert len(_calls("replay")) == 4  # calls 3-6 replay; calls 1-2 ran plainly and captured


def test_contexts_share_one_user_managed_memory_block(trt, tmp_path):
    backend = _backend(tmp_path, [BatchProfile(2, 2, 2), BatchProfile(4, 4, 4), BatchProfile(8, 8, 8)],
                       memory=4096)
    created = _calls("create_execution_context")
    assert [c[2] for c in created] == ["USER_MANAGED"] * 3
    blocks = {(c[2], c[3]) for c in _calls("set_device_memory")}
    assert len(_calls("set_device_memory")) == 3 and len(blocks) == 1
    assert blocks.pop()[1] == 4096 == backend.device_memory.numel()
    profiles = [c[2] for c in _calls("set_optimization_profile_async")]
    assert profiles == [0, 1, 2]


def test_false_results_raise(trt, tmp_path, monkeypatch):
    backend = _backend(tmp_path, [BatchProfile(2, 2, 2)])
    monkeypatch.setattr(ft.Context, "execute_async_v3", lambda self, stream: False)
    with pytest.raises(RuntimeError, match="execute_async_v3"):
        backend(*_inputs(2, seed=0))  # static profile with CUDA graphs: the plain run is checked

    backend = _backend(tmp_path, [BatchProfile(2, 2, 2)])
    monkeypatch.setattr(ft.Context, "set_input_shape", lambda self, name, shape: False)
    with pytest.raises(RuntimeError, match="set_input_shape"):
        backend(*_inputs(2, seed=0))

    monkeypatch.setattr(ft.Context, "set_optimization_profile_async", lambda self, i, s: False)
    with pytest.raises(RuntimeError, match="set_optimization_profile_async"):
        _backend(tmp_path, [BatchProfile(2, 2, 2)])


def test_engine_must_match_its_manifest(trt, tmp_path):
    with pytest.raises(EngineMismatch, match="2 optimization profiles, its manifest lists 1"):
        _backend(tmp_path, [BatchProfile(2, 2, 2)], plan_profiles=[BatchProfile(2, 2, 2), BatchProfile(4, 4, 4)])
    with pytest.raises(EngineMismatch, match="tensor sample is"):
        _backend(tmp_path, [BatchProfile(2, 2, 2)], dtype="HALF")  # fp16 plan, fp32 manifest
    with pytest.raises(EngineMismatch, match="profile 0 takes batches 2-8"):
        _backend(tmp_path, [BatchProfile(2, 4, 4)], plan_profiles=[BatchProfile(2, 4, 8)])
    (tmp_path / "unet.plan").write_bytes(b"\x00not a plan")
    from compinv_rt.runtime.trt_backend import TensorRTBackend

    with pytest.raises(EngineMismatch, match="could not deserialize"):
        TensorRTBackend(tmp_path, _spec(), [BatchProfile(2, 2, 2)], torch.device("cpu"))


def test_fp16_engine_and_split_batches(trt, tmp_path):
    """fp16 buffers, and a batch above the largest profile split over it (run_bucketed)."""
    backend = _backend(tmp_path, [BatchProfile(2, 2, 2), BatchProfile(4, 4, 4)],
                       spec=_spec(Precision.fp16), dtype="HALF")
    x = _inputs(6, seed=3)
    got = backend(*x)
    assert got.dtype == torch.float32 and got.shape[0] == 6
    torch.testing.assert_close(got, _expected(*x), rtol=2e-2, atol=2e-2)
