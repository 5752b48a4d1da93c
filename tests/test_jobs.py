"""`generate --jobs`: parsing, packing, batch-independence, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from compinv_rt.apps.cli import app
from compinv_rt.generate.batching import pack
from compinv_rt.generate.jobs import KILL_AFTER_ENV, read_jobs

runner = CliRunner()
DEFAULTS = {"seed": 100, "steps": 5, "guidance": 7.5}


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    f = tmp_path / "jobs.jsonl"
    f.write_text("\n".join([
        '{"prompt": "a cat", "id": "a"}',
        "{oops",
        '{"prompt": "a dog", "n": 0}',
        "",
        '{"prompt": "a dog", "id": "a"}',
        '{"prompt": "x", "promt": "typo"}',
        '["not", "an", "object"]',
        '{"prompt": "a dog", "guidance": "high"}',
        '{"prompt": "ok", "steps": 3, "guidance": 5}',
    ]))
    jobs, problems = read_jobs(f, DEFAULTS)
    assert [j.id for j in jobs] == ["a", "line00009"]
    assert jobs[1].steps == 3 and jobs[1].guidance == 5.0 and jobs[1].seed == 109
    lines = [p.split(":")[1] for p in problems]
    assert lines == ["2", "3", "5", "6", "7", "8"]
    assert "duplicate id 'a'" in problems[2] and "promt" in problems[3]


def test_pack_groups_compatible_items_in_file_order():
    items = [("a", 64), ("b", 128), ("c", 64), ("d", 64), ("e", 128)]
    batches = list(pack(items, key=lambda it: it[1], max_batch=2))
    assert [(k, [i[0] for i in b]) for k, b in batches] == [
        (64, ["a", "c"]), (64, ["d"]), (128, ["b", "e"])]
    with pytest.raises(ValueError):
        list(pack(items, key=lambda it: it[1], max_batch=0))


def _write_jobs(path, n_jobs, **extra):
    lines = []
    for i in range(n_jobs):
        job = {"prompt": ["a red star on grass", "a blue circle", "a green heart"][i % 3],
               "seed": 10 + i, "id": f"j{i:02d}", **extra}
        if i % 4 == 3:
            job["steps"] = 3  # a different step count: its own batches
        lines.append(json.dumps(job))
    path.write_text("\n".join(lines) + "\n")


def test_batched_jobs_equal_single_generations(tiny_model, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    _write_jobs(jobs, 5)
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model),
                              "--out", str(tmp_path / "out"), "--max-batch", "3", "--steps", "4"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 5
    for i in (0, 3):  # one 4-step job, one 3-step job
        single = tmp_path / f"single{i}"
        prompt = ["a red star on grass", "a blue circle", "a green heart"][i % 3]
        r = runner.invoke(app, ["generate", prompt, "--model", str(tiny_model), "--out", str(single),
                                "-n", "1", "--seed", str(10 + i), "--steps", "3" if i == 3 else "4"])
        assert r.exit_code == 0, r.output
        ref = _pixels(next(single.glob("*_[0-9]*[0-9].png")))
        assert np.abs(_pixels(tmp_path / "out" / f"j{i:02d}_000.png") - ref).max() <= 1
    side = json.loads((tmp_path / "out" / "j01_000.json").read_text())
    assert side["seed"] == 11 and side["job_id"] == "j01" and side["settings"]["steps"] == 4


def test_bad_lines_do_not_stop_the_rest_but_set_the_exit_code(tiny_model, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat", "id": "ok1"}\nnot json\n{"prompt": "a dog", "id": "ok2", '
                    '"height": 100}\n{"prompt": "a dog", "id": "ok3"}\n')
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model),
                              "--out", str(tmp_path / "o"), "--steps", "2"])
    assert res.exit_code == 1
    assert f"{jobs}:2:" in res.stderr and "line 3 (ok2)" in res.stderr and "multiple of" in res.stderr
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["ok1_000.png", "ok3_000.png"]
    again = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model),
                                "--out", str(tmp_path / "o"), "--steps", "2"])
    assert again.exit_code == 1 and "--resume" in again.stderr



@pytest.mark.parametrize("flag", [["-n", "3"], ["--num-images", "4"]])
def test_num_images_with_jobs_is_one_error_line(tmp_path, flag):
    """-n is per PROMPT; a jobs line has its own 'n': with --jobs it is refused, not ignored
    (also when it equals the default), before any model or --out is touched."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat"}\n')
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), *flag, "--out", str(tmp_path / "o"),
                              "--model", str(tmp_path / "no-model")])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        "error: -n/--num-images applies to one PROMPT; with --jobs give each line its own 'n'"]
    assert not (tmp_path / "o").exists()
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--height", "128", "--negative-prompt", "blur",
                              "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-model")])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == ["error: --height, --negative-prompt apply to one PROMPT; with --jobs give "
                                       "each line its own 'height', 'negative_prompt'"]


def test_resume_refuses_a_line_edited_since_its_images_were_made(tiny_model, tmp_path):
    """Same id, other prompt: its finished images are not this line's (issue 28 item 3)."""
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "o"
    args = ["generate", "--jobs", str(jobs), "--model", str(tiny_model), "--out", str(out), "--steps", "2"]
    jobs.write_text('{"prompt": "a cat", "id": "a", "n": 2}\n{"prompt": "a dog", "id": "b"}\n')
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "a_000.png").read_bytes()
    jobs.write_text('{"prompt": "a red cat", "id": "a", "n": 2}\n{"prompt": "a dog", "id": "b"}\n'
                    '{"prompt": "a bird", "id": "c"}\n')
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 1 and "line 1 (a): the line changed" in res.stderr, res.output
    assert (out / "a_000.png").read_bytes() == before  # nothing of it overwritten or mixed
    assert (out / "c_000.png").exists()  # the rest still runs; b was done
    assert "1 already done" in res.stdout

@pytest.mark.slow
def test_resume_after_kill_9_loses_and_duplicates_nothing(tiny_model, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    _write_jobs(jobs, 16)
    args = [sys.executable, "-m", "compinv_rt.apps.cli", "generate", "--jobs", str(jobs), "--model",
            str(tiny_model), "--max-batch", "1", "--steps", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    # The run kills itself (SIGKILL) after its 5th image: deterministic (jobs.kill_hook).
    proc = subprocess.run([*args, "--out", str(out)], env={**env, KILL_AFTER_ENV: "5"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.returncode == -signal.SIGKILL
    assert len(list(out.glob("*.json"))) == 5
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    subprocess.run([*args, "--out", str(out), "--resume"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names = sorted(p.name for p in out.iterdir())
    expected = sorted(f"j{i:02d}_000.{ext}" for i in range(16) for ext in ("png", "json"))
    assert names == expected  # nothing lost, nothing duplicated, no temp files left
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # finished images untouched

    clean = tmp_path / "clean"
    subprocess.run([*args, "--out", str(clean)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for i in range(16):
        assert np.array_equal(_pixels(out / f"j{i:02d}_000.png"), _pixels(clean / f"j{i:02d}_000.png"))


@pytest.mark.slow
def test_per_job_layout_biases_that_job_only(tiny_model, tmp_path):
    """A job's layout becomes its rows of attention_bias: its image changes, its batch-mates do
    not, it equals `generate --layout ... --spatial bias`, and a bad layout fails only its job."""
    jobs = tmp_path / "jobs.jsonl"
    layout = "star=0.05,0.1,0.5,0.9"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"prompt": "a red star on grass", "seed": 3, "id": "plain"},
        {"prompt": "a red star on grass", "seed": 3, "id": "laid", "layout": layout},
        {"prompt": "a red star on grass", "seed": 3, "id": "bad", "layout": "moon=0.1,0.1,0.5,0.5"},
    ]) + "\n")
    out = tmp_path / "o"
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model), "--out",
                              str(out), "--steps", "6", "--max-batch", "4", "--bias-steps", "1.0",
                              "--bias-strength", "4"])
    assert res.exit_code == 1 and "line 3 (bad)" in res.stderr and "moon" in res.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["laid_000.png", "plain_000.png"]
    plain, laid = _pixels(out / "plain_000.png"), _pixels(out / "laid_000.png")
    assert np.abs(plain - laid).max() > 10
    single = tmp_path / "single"
    r = runner.invoke(app, ["generate", "a red star on grass", "--model", str(tiny_model), "--out",
                            str(single), "-n", "1", "--seed", "3", "--steps", "6", "--layout", layout,
                            "--spatial", "bias", "--bias-steps", "1.0", "--bias-strength", "4"])
    assert r.exit_code == 0, r.output
    assert np.abs(_pixels(single / "a-red-star-on-grass_3.png") - laid).max() <= 1
    r = runner.invoke(app, ["generate", "a red star on grass", "--model", str(tiny_model), "--out",
                            str(tmp_path / "p"), "-n", "1", "--seed", "3", "--steps", "6"])
    assert np.abs(_pixels(tmp_path / "p" / "a-red-star-on-grass_3.png") - plain).max() <= 1


@pytest.mark.slow
def test_per_job_concepts_equal_generate_with_concept(tiny_model, trained, tmp_path):
    """A job naming a trained concept uses its token; a job without it is unaffected."""
    jobs = tmp_path / "jobs.jsonl"
    prompt = "photo of a <my-heart> heart on grass"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"prompt": prompt, "seed": 2, "id": "mine", "concepts": [str(trained.out)]},
        {"prompt": "a red star on grass", "seed": 2, "id": "other"},
    ]) + "\n")
    out = tmp_path / "o"
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model), "--out",
                              str(out), "--steps", "4", "--max-batch", "2"])
    assert res.exit_code == 0, res.output
    single = tmp_path / "single"
    r = runner.invoke(app, ["generate", prompt, "--concept", str(trained.out), "--model", str(tiny_model),
                            "--out", str(single), "-n", "1", "--seed", "2", "--steps", "4"])
    assert r.exit_code == 0, r.output
    ref = _pixels(next(p for p in single.glob("*_2.png")))
    assert np.abs(_pixels(out / "mine_000.png") - ref).max() <= 1
    r = runner.invoke(app, ["generate", "a red star on grass", "--model", str(tiny_model), "--out",
                            str(tmp_path / "p"), "-n", "1", "--seed", "2", "--steps", "4"])
    assert np.abs(_pixels(tmp_path / "p" / "a-red-star-on-grass_2.png") - _pixels(out / "other_000.png")).max() <= 1
