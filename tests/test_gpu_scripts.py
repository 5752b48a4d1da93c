"""The GPU scripts (benchmarks/gpu_smoke.sh, world_gpu.sh, gpu.sh) must run on the first lent GPU
machine (issue 26): the upload under 60 MiB with the wheels, every package the commands import
either on the GPU image or carried, one `error:` line in seconds when one is missing, and results in
OUT within the device tool's limits. The GPU image is simulated here by tests/gpu_image/
sitecustomize.py: with COMPINV_GPU_IMAGE=1 a package the image lacks cannot be imported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_smoke  # noqa: E402

# Runtime requirements the GPU scripts never import (the server and Ray scale-out extras).
SERVER_ONLY = {"ray", "fastapi", "uvicorn", "python-multipart", "prometheus-client"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _gpu_env(**extra) -> dict:
    env = {**os.environ, "COMPINV_GPU_IMAGE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "tests" / "gpu_image"), **extra}
    return env


def _fetched() -> set[str]:
    text = (ROOT / "benchmarks" / "fetch_gpu_wheels.sh").read_text()
    block = text[text.index("WHEELS=("):text.index(")", text.index("WHEELS=("))]
    return {_norm(w.split("==")[0]) for w in block[len("WHEELS=("):].split()}


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="counts what git would upload")
def test_carried_upload_fits_under_60_mib():
    size = gpu_smoke.carried()
    assert size["total_mib"] <= 60, size
    assert size["wheels_mib"] > 5  # the wheels are counted (from .whl/ or the recorded list)


def test_upload_size_counts_the_tree_and_the_wheels(tmp_path):
    """The count can fail: 61 MiB of wheels on a tiny tree is over."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu_wheels.txt").write_text(f"big-1.0-py3-none-any.whl {61 << 20}\n")
    (tmp_path / "a.txt").write_text("x" * 1000)
    size = gpu_smoke.carried(tmp_path)
    assert size["total_mib"] > 60 and size["wheels_from"].startswith("recorded")


def test_recorded_wheels_match_the_fetch_script():
    recorded = {_norm(line.split("-")[0]) for line in
                (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines() if line.strip()}
    assert recorded == _fetched()


def test_every_runtime_requirement_is_on_the_image_or_carried():
    """pydantic (schemas.py, reached from every command) was neither: a traceback at the first step."""
    lines = (line.partition("#")[0].strip() for line in
             (ROOT / "tests" / "gpu_image" / "packages.txt").read_text().splitlines())
    image = {_norm(n) for n in lines if n}
    reqs = {_norm(re.split(r"[=<>\[ ]", line)[0]) for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    missing = reqs - image - _fetched() - SERVER_ONLY
    assert not missing, f"needed on the GPU machine, neither there nor carried: {missing}"
    assert {"pydantic", "pydantic-core", "annotated-types", "typing-inspection"} <= _fetched()


def test_gpu_image_blocks_what_it_lacks():
    code = ("import importlib.util, json\n"
            "out = {}\n"
            "for m in ('fastapi', 'pydantic', 'torch'):\n"
            "    try:\n"
            "        __import__(m); out[m] = 'ok'\n"
            "    except ImportError as e:\n"
            "        out[m] = 'blocked'\n"
            "out['find_spec_fastapi'] = importlib.util.find_spec('fastapi') is None\n"
            "print(json.dumps(out))")
    got = json.loads(subprocess.run([sys.executable, "-c", code], env=_gpu_env(), capture_output=True,
                                    text=True, check=True).stdout)
    assert got == {"fastapi": "blocked", "pydantic": "ok", "torch": "ok", "find_spec_fastapi": True}
    got = subprocess.run([sys.executable, "-c", "import pydantic"], env=_gpu_env(COMPINV_GPU_IMAGE_BLOCK="pydantic"),
                         capture_output=True, text=True)
    assert got.returncode == 1 and "not on the GPU image" in got.stderr


@pytest.mark.slow  # 22-34 s on the shared 2-core machine
def test_preflight_passes_on_the_gpu_image(tmp_path):
    ok = subprocess.run(["bash", "benchmarks/gpu_smoke.sh", "--device", "cpu", "--check-only", str(tmp_path)],
                        cwd=ROOT, env=_gpu_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "carried upload:" in ok.stdout and "pre-flight imports ok" in ok.stdout
    assert json.loads((tmp_path / "summary.jsonl").read_text())["ok"] is True


def test_preflight_fails_in_seconds_with_one_error_line(tmp_path):
    """A package the commands import, taken away: one error line, before any step starts."""
    t0 = time.time()
    bad = subprocess.run(["bash", "benchmarks/world_gpu.sh", "--device", "cpu", str(tmp_path)], cwd=ROOT,
                         env=_gpu_env(COMPINV_GPU_IMAGE_BLOCK="onnxscript"), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pre-flight: importing onnxscript failed"), bad.stderr
    assert time.time() - t0 < 30
    assert "=== train" not in (tmp_path / "steps.log").read_text()


@pytest.mark.parametrize("script", ["gpu_smoke.sh", "world_gpu.sh"])
def test_bad_device_is_one_error_line(script, tmp_path):
    got = subprocess.run(["bash", f"benchmarks/{script}", "--device", "tpu", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert got.returncode == 1 and got.stderr.count("\n") == 1 and got.stderr.startswith("error: --device")


def test_world_gpu_trains_the_grown_model_from_the_embedded_one_into_out():
    text = (ROOT / "benchmarks" / "world_gpu.sh").read_text()
    assert "--init-from compinv_rt/embedded/shapes_sd --attn16" in text and "--max-minutes" in text
    assert "/tmp" not in text.replace("${GPU_SITE:-/tmp/site}", "")  # nothing that must come back


def _returned(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert all(p.stat().st_size <= 16 << 20 for p in files)
    return files


@pytest.mark.slow
def test_smoke_commands_run_with_only_the_gpu_images_packages(tmp_path):
    """Every command of the smoke script (--quick: 1 image, 2 steps, no compile/AOTI steps), with
    only the GPU image's packages + the carried ones importable: a step importing anything else fails."""
    out = tmp_path / "out"
    t0 = time.time()
    got = subprocess.run(["bash", "benchmarks/gpu_smoke.sh", "--device", "cpu", "--quick", str(out)], cwd=ROOT,
                         env=_gpu_env(), capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr
    assert time.time() - t0 < 540
    steps = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["preflight", "doctor", "generate_cpu_ref", "save_attention", "onnxruntime",
                                          "deep_cache_onnxruntime", "world_photos", "train_steps", "bench_sd15"]
    assert all(s["ok"] for s in steps), [s for s in steps if not s["ok"]]
    assert "not on the GPU image" not in (out / "steps.log").read_text()
    names = {p.relative_to(out).as_posix() for p in _returned(out)}
    assert {"summary.jsonl", "steps.log", "doctor.txt", "bench/results.json"} <= names


def test_world_train_stops_at_its_wall_clock_deadline(tmp_path):
    """`world train --max-minutes`: the UNet stage stops at the deadline, with a checkpoint and an
    EMA snapshot of the step it reached (world_gpu.sh sizes its training by it)."""
    from typer.testing import CliRunner

    from compinv_rt.apps.cli import app

    run = tmp_path / "run"
    args = ["world", "train", "--run-dir", str(run), "--tiny", "--stages", "vae,cache,unet", "--vae-steps", "2",
            "--cache-scenes", "8", "--unet-steps", "100000", "--procs", "1", "--force", "--max-minutes", "0.05"]
    t0 = time.time()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    steps = int(re.search(r"UNet trained to step (\d+)", result.output).group(1))
    assert 0 < steps < 100000 and time.time() - t0 < 60
    assert (run / "snapshots" / f"step{steps:06d}.safetensors").is_file()
    bad = CliRunner().invoke(app, [a if a != "--procs" else "--threads" for a in args] + ["--procs", "2"])
    assert bad.exit_code == 1 and "--max-minutes" in bad.output


# --- honest failures on the GPU paths ---------------------------------------------------------


def test_compile_recompile_limit_raises_instead_of_running_eager(monkeypatch):
    import torch

    from compinv_rt.engines.compiled_backends import compile_unet

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="eager", dynamic=False))
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False)  # torch's default
    torch._dynamo.reset()
    try:
        module = compile_unet(torch.nn.Linear(4, 4), torch.device("cpu"))
        with torch._dynamo.config.patch(recompile_limit=1):
            module(torch.randn(2, 4))
            with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
                module(torch.randn(3, 4))  # another static shape: a second graph
    finally:
        torch._dynamo.reset()


def test_compile_backend_says_so_in_one_line():
    import torch

    from compinv_rt.core.errors import BackendUnavailable
    from compinv_rt.engines.compiled_backends import CompileBackend

    backend = CompileBackend.__new__(CompileBackend)

    def over_the_limit(*args):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fail_on_recompile_limit_hit")

    backend.module = over_the_limit
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(BackendUnavailable, match="recompile limit .* would run eager"):
        backend(x, torch.zeros(2), torch.zeros(2, 77, 64))


def test_onnx_export_without_polygraphy_is_one_error_line(tmp_path):
    """The GPU image has no polygraphy / onnx-graphsurgeon: a missing one is an `error:` line."""
    got = subprocess.run([sys.executable, "-m", "compinv_rt.apps.cli", "export", "--format", "onnx",
                          "--out", str(tmp_path / "e")], cwd=ROOT,
                         env=_gpu_env(COMPINV_GPU_IMAGE_BLOCK="polygraphy,onnx-graphsurgeon"),
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 1
    errors = [line for line in got.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the ONNX export needs polygraphy and onnx_graphsurgeon (constant folding): "
                      "pip install polygraphy onnx-graphsurgeon"], got.stderr
    assert "Traceback" not in got.stderr
