"""Text-only mistakes are reported before torch is imported (issue 28 item 4): a `torch` that
cannot be imported is put first on the path, so any import of it fails the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    blocker = tmp_path / "blocker"
    (blocker / "torch").mkdir(parents=True, exist_ok=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "compinv_rt.apps.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks(tmp_path):
    r = _run(tmp_path, "generate", "a red star", "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "torch was imported" in r.stderr


@pytest.mark.parametrize("args, expect", [
    (["generate", "a red star", "--layout", "star=0.1,0.2"], "needs 4 numbers"),
    (["generate", "a red star", "--spatial", "adaptive", "--bias-decay", "1e9"], "--bias-decay"),
    (["generate", "a red star", "--steps", "5000"], "--steps"),
    (["eval", "--quick", "--steps", "5000", "--out", "o"], "--steps"),
    (["layout", "fit", "--data", "x.jsonl", "--epochs", "1000000000", "--out", "o"], "--epochs"),
    (["world", "train", "--run-dir", "r", "--cache-scenes", "1000000000"], "--cache-scenes"),
])
def test_text_only_errors_come_before_torch(tmp_path, args, expect):
    r = _run(tmp_path, *args)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and expect in err, err


def test_a_jobs_file_whose_lines_all_fail_stops_before_the_model(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a", "steps": "x"}\n{"prompt": ""}\n')
    r = _run(tmp_path, "generate", "--jobs", str(jobs), "--out", str(tmp_path / "o"))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[:2]] == ["error", "error"] and "all 2 line(s) failed" in lines[-1]
    assert not (tmp_path / "o").exists()  # nothing written, no folder made
