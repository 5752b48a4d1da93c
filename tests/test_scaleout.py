"""`generate --jobs --ray` on a local Ray instance with 2 CPU workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from compinv_rt.apps.cli import app

runner = CliRunner()
# One xdist worker runs these one after another: each starts its own local Ray, and the kill test
# must only ever see its own Ray workers.
pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _jobs(path, n):
    prompts = ["a red star on grass", "a blue circle", "a green heart on sand"]
    path.write_text("".join(json.dumps({"prompt": prompts[i % 3], "seed": 7 + i, "id": f"r{i:02d}"})
                            + "\n" for i in range(n)))


def test_ray_images_equal_single_process_images(tiny_model, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    _jobs(jobs, 6)
    common = ["generate", "--jobs", str(jobs), "--model", str(tiny_model), "--steps", "4",
              "--max-batch", "2"]
    local = runner.invoke(app, [*common, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    ray_out = tmp_path / "ray"
    res = runner.invoke(app, [*common, "--out", str(ray_out), "--ray", "--workers", "2"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in ray_out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "local").iterdir())
    for i in range(6):
        assert np.array_equal(_pixels(ray_out / f"r{i:02d}_000.png"),
                              _pixels(tmp_path / "local" / f"r{i:02d}_000.png"))


def test_killed_ray_worker_loses_and_duplicates_nothing(tiny_model, tmp_path):
    """One of this run's workers kills itself (SIGKILL) after its 3rd image (jobs.kill_hook):
    deterministic, and no other process on the machine can be hit."""
    from compinv_rt.generate.jobs import KILL_AFTER_ENV

    jobs = tmp_path / "jobs.jsonl"
    _jobs(jobs, 24)
    out = tmp_path / "out"
    marker = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-m", "compinv_rt.apps.cli", "generate", "--jobs", str(jobs), "--model",
         str(tiny_model), "--steps", "8", "--max-batch", "1", "--out", str(out), "--ray",
         "--workers", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1", KILL_AFTER_ENV: f"3:{marker}"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=400)
    assert proc.returncode == 0, proc.stdout.decode()[-2000:]
    assert marker.exists(), "a worker must have killed itself mid-run for this test to mean anything"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"r{i:02d}_000.{ext}" for i in range(24) for ext in ("png", "json"))
    for p in out.glob("*.png"):
        assert _pixels(p).shape == (128, 128, 3)  # every file whole


def test_engine_backend_on_ray_needs_a_built_engine(tiny_model, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    _jobs(jobs, 2)
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model),
                              "--out", str(tmp_path / "o"), "--ray", "--backend", "onnxruntime"])
    assert res.exit_code == 1 and "--engine" in res.stderr
