"""The TensorRT runtime's logic on CPU: a stand-in `tensorrt` module (tests/fake_tensorrt.py,
injected through sys.modules) and a recording torch.cuda (streams, synchronize, graph capture).
What a GPU adds (real kernels) is covered by the `tensorrt`-marked tests in test_export.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fake_tensorrt as ft  # noqa: E402

from compinv_rt.core.errors import EngineMismatch  # noqa: E402
from compinv_rt.unet.iospec import BatchProfile, Precision, UNetIOSpec  # noqa: E402

MAIN_STREAM, CAPTURE_STREAM = ft.MAIN_STREAM, ft.CAPTURE_STREAM


@pytest.fixture
def trt(monkeypatch):
    """Inject the stand-in and a torch.cuda that records instead of touching a GPU."""
    return ft.install(monkeypatch)


def _spec(precision=Precision.fp32):
    return UNetIOSpec(in_channels=4, out_channels=4, text_len=3, text_dim=8, latent_height=2,
                      latent_width=2, precision=precision)


def _engine(tmp_path, profiles, dtype="FLOAT", memory=4096, spec=None):
    shapes = {n: list(s[1:]) for n, s in (spec or _spec()).shapes(1).items()}
    (tmp_path / "unet.plan").write_text(json.dumps(
        {"profiles": [[p.min, p.max] for p in profiles], "dtype": dtype, "memory": memory, "shapes": shapes}))
    return tmp_path


def _backend(tmp_path, profiles, cuda_graphs=True, spec=None, plan_profiles=None, plan_spec=None, **plan):
    from compinv_rt.engines.trt_backend import TensorRTBackend

    engine = _engine(tmp_path, plan_profiles or profiles, spec=plan_spec or spec, **plan)
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
    from compinv_rt.engines.trt_backend import TensorRTBackend

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


# The stricter stand-in (issue 26): each check below is first shown to fail on a wrong use, then to
# pass on the backend's own.

def test_fake_checks_every_dimension_and_the_backend_checks_the_plan(trt, tmp_path):
    backend = _backend(tmp_path, [BatchProfile(2, 4, 8)])
    ctx = next(iter(backend.plan._contexts.values()))
    assert ctx.set_input_shape("sample", (4, 4, 2, 2))
    assert not ctx.set_input_shape("sample", (4, 4, 3, 2))  # right batch, wrong height
    assert not ctx.set_input_shape("sample", (4, 4, 2))  # a dimension missing
    assert not ctx.set_input_shape("encoder_hidden_states", (4, 5, 8))  # wrong text length
    # a plan for another latent size is refused when it loads, not at the first call
    other = UNetIOSpec(in_channels=4, out_channels=4, text_len=3, text_dim=8, latent_height=4,
                       latent_width=4, precision=Precision.fp32)
    with pytest.raises(EngineMismatch, match=r"input sample is \(4, 4, 4\) per sample"):
        _backend(tmp_path, [BatchProfile(2, 4, 8)], plan_spec=other)


def test_results_land_only_at_a_stream_ordered_point(trt, tmp_path, monkeypatch):
    """Asynchronous execution: a read that is not ordered after the engine's work sees NaN."""
    from compinv_rt.engines.trt_backend import CudaOps

    x = _inputs(2, seed=5)
    monkeypatch.setattr(CudaOps, "ordered", lambda self: None)  # a read not ordered after the work
    backend = _backend(tmp_path, [BatchProfile(2, 4, 8)])
    assert torch.isnan(backend(*x)).all()
    ft.flush()  # while its buffers are alive: the queued write lands in them
    monkeypatch.setattr(CudaOps, "ordered", lambda self: ft.flush())
    torch.testing.assert_close(_backend(tmp_path, [BatchProfile(2, 4, 8)])(*x), _expected(*x))


def test_capture_without_a_finished_warm_up_run_fails(trt, tmp_path, monkeypatch):
    from compinv_rt.engines.trt_backend import CudaOps

    synchronize = CudaOps.synchronize
    backend = _backend(tmp_path, [BatchProfile(2, 2, 2)])
    monkeypatch.setattr(CudaOps, "synchronize", lambda self: None)  # warm-up run not finished
    with pytest.raises(RuntimeError, match="execute_async_v3"):
        backend(*_inputs(2, seed=0))
    assert ("capture_begin",) in ft.CALLS  # it failed inside the capture, not before
    ft.flush()  # the unfinished warm-up's write, while its buffers are alive
    monkeypatch.setattr(CudaOps, "synchronize", synchronize)
    backend = _backend(tmp_path, [BatchProfile(2, 2, 2)])
    for seed in (1, 2):  # capture, then replay
        x = _inputs(2, seed=seed)
        torch.testing.assert_close(backend(*x), _expected(*x))


def test_every_tensorrt_call_runs_on_the_backends_gpu(trt, tmp_path, monkeypatch):
    """--device cuda:N: TensorRT works on the current device, so every call is inside the guard."""
    from contextlib import contextmanager

    from compinv_rt.engines.trt_backend import CudaOps

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextmanager(lambda: (yield))())
    with CudaOps(torch.device("cuda:1")).guard():
        pass
    assert entered == [torch.device("cuda:1")]

    @contextmanager
    def guard(self):
        ft.CALLS.append(("guard",))
        yield
        ft.CALLS.append(("unguard",))

    monkeypatch.setattr(CudaOps, "guard", guard)
    backend = _backend(tmp_path, [BatchProfile(2, 2, 2), BatchProfile(4, 4, 4)])
    for batch in (2, 4, 2, 6):
        backend(*_inputs(batch, seed=batch))
    backend.close()
    depth, outside = 0, []
    for call in ft.CALLS:
        depth += {"guard": 1, "unguard": -1}.get(call[0], 0)
        if depth == 0 and call[0] not in ("guard", "unguard"):
            outside.append(call)
    assert not outside and ft.CALLS.count(("guard",)) == 6  # init, 4 calls, close


def test_close_frees_engine_contexts_and_buffers(trt, tmp_path):
    import gc
    import weakref

    backend = _backend(tmp_path, [BatchProfile(2, 2, 2), BatchProfile(4, 8, 8)])
    for batch in (2, 4, 2):
        backend(*_inputs(batch, seed=batch))
    plan = backend.plan
    refs = [weakref.ref(o) for o in (plan.engine, backend.device_memory, *plan._contexts.values(),
                                     *plan._graphs.values(),
                                     *(t for b in plan._buffers.values() for t in b.values()))]
    del plan
    backend.close()
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    with pytest.raises(RuntimeError, match="closed"):
        backend(*_inputs(2, seed=0))
