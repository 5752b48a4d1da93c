"""Bad input, faults and the blind spots of the other tests (issue 18).

Every bad input ends in exit code 1 and one `error:` line naming what is wrong, never a
traceback; nothing non-finite reaches disk; faults leave complete files only; and each test in
the last section fails when one specific bug is put into the core logic by hand (the table in
benchmarks/reliability.md says which test catches which bug).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.cli import app
from compinv_rt.core.errors import ArtifactError, EngineMismatch, NonFiniteError

runner = CliRunner()


def _one_error(result, *expect: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0] == err.splitlines()[-1], err
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not valid JSON")

    return json.loads(open(path).read(), parse_constant=refuse)


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# --- options are checked at the edge, before anything heavy ------------------------------------


@pytest.mark.parametrize("args, field", [
    (["a cat", "--height", "0"], "--height"),  # was: silently the native size
    (["a cat", "--height", "65536", "--width", "65536"], "--height"),
    (["a cat", "--steps", "100000000"], "--steps"),
    (["a cat", "--seed", str(2**63)], "--seed"),
    (["a cat", "--seed", str(2**63 - 2), "-n", "4"], "--seed + n - 1"),
    (["a cat", "--seed", "-1"], "--seed"),
    (["a cat", "--guidance", "inf"], "--guidance"),
    (["a cat", "--guidance", "nan"], "--guidance"),
    (["a cat", "-n", "1000000000000"], "--num-images"),
    (["a cat", "-n", "0"], "--num-images"),
    (["   "], "prompt is empty"),
    (["a cat", "--device", "tpu"], "--device"),
    (["a cat", "--device", "mps"], "mps"),  # found by the long fuzz run: was a RuntimeError
    (["a cat", "--max-batch", "100000"], "--max-batch"),
    (["a cat", "--bias-strength", "nan"], "--bias-strength"),
    (["a cat", "--out", "file:///tmp/x"], "only with --jobs"),  # was: a folder named 'file:'
    (["a cat", "--resume"], "--resume"),  # was: ignored
    (["a cat", "--engine", "engines/x"], "--engine"),  # with --backend torch: was ignored
    (["a cat", "--backend", "onnxruntime", "--precision", "bf16"], "bf16"),  # was: built first
])
def test_generate_options_are_bounded_and_finite(args, field, tmp_path):
    out = tmp_path / "o"
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    _one_error(runner.invoke(app, ["generate", *args]), field)
    assert not out.exists()


def test_limits_are_configurable(monkeypatch, tmp_path):
    from compinv_rt.core.schemas import _limits_from

    monkeypatch.setenv("COMPINV_LIMITS", '{"max_images": 3}')
    _one_error(runner.invoke(app, ["generate", "a cat", "-n", "4", "--out", str(tmp_path)]),
               "max_images", "<= 3")
    monkeypatch.setenv("COMPINV_LIMITS", '{"max_imagez": 3}')
    _one_error(runner.invoke(app, ["generate", "a cat", "--out", str(tmp_path)]), "COMPINV_LIMITS")
    _limits_from.cache_clear()


@pytest.mark.parametrize("args, field", [
    (["--batch-sizes", "100000000"], "--batch-sizes"),
    (["--batch-sizes", "1e8"], "--batch-sizes"),
    (["--device", "tpu"], "--device"),
    (["--height", "65536"], "--height"),
])
def test_export_options_are_bounded(args, field, tmp_path):
    _one_error(runner.invoke(app, ["export", "--format", "onnx", "--out", str(tmp_path / "e"),
                                   *args]), field)


@pytest.mark.parametrize("args, field", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--steps", "10000000000"], "--steps"),
    (["--anchor-weight", "nan"], "--anchor-weight"), (["--device", "tpu"], "--device"),
    (["--seed", str(2**63)], "--seed"), (["--vectors", "100000"], "--vectors"),
])
def test_train_options_are_bounded(args, field, photos, tmp_path):
    _one_error(runner.invoke(app, ["train", "--images", str(photos), "--token", "<t>",
                                   "--class-word", "heart", "--out", str(tmp_path / "c"), *args]),
               field)


def test_help_shows_no_value_for_flags():
    res = runner.invoke(app, ["generate", "--help"])
    assert res.exit_code == 0 and "--resume" in res.output and "<bool>" not in res.output


def test_concept_token_without_its_concept_is_refused(tiny_model, tmp_path):
    res = runner.invoke(app, ["generate", "a <my-heart> heart", "--model", str(tiny_model),
                              "--out", str(tmp_path / "o")])
    _one_error(res, "<my-heart>", "--concept")


def test_prompt_longer_than_the_text_encoder_reads_is_refused(tiny_model, tmp_path):
    long = " ".join(["red star"] * 60)
    res = runner.invoke(app, ["generate", long, "--model", str(tiny_model), "-n", "1",
                              "--steps", "1", "--out", str(tmp_path / "o")])
    _one_error(res, "tokens", "77")
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


# --- JSONL lines --------------------------------------------------------------------------------


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "a", "n": 1000000000000}', "n:"),
    ('{"prompt": "a", "guidance": Infinity}', "Infinity"),
    ('{"prompt": "a", "guidance": NaN}', "NaN"),
    ('{"prompt": "a", "guidance": 1e400}', "guidance"),  # json reads 1e400 as inf
    ('{"prompt": "a", "id": "x\\ny"}', "id:"),  # was: file names with a newline
    ('{"prompt": "a", "id": "ok\\n"}', "id:"),  # `$` in a Python regex matches before a final \n
    ('{"prompt": "a", "seed": 9223372036854775808}', "seed:"),
    ('{"prompt": "a", "steps": 100000000}', "steps:"),
    ('{"prompt": "a", "height": 65536}', "height:"),
    ('{"prompt": "a", "n": true}', "n:"),
    ('{"prompt": "a", "steps": 2.5}', "steps:"),
    ('{"prompt": "   "}', "prompt"),
    ('{"prompt": "a", "concepts": [1]}', "concepts"),
    ('{"prompt": "a", "layout": 5}', "layout"),
])
def test_bad_job_lines_name_the_field(line, field, tmp_path):
    from compinv_rt.generate.jobs import read_jobs

    f = tmp_path / "jobs.jsonl"
    f.write_text('{"prompt": "fine"}\n' + line + "\n")
    jobs, problems = read_jobs(f, {"seed": 0, "steps": 2, "guidance": 7.5})
    assert [j.prompt for j in jobs] == ["fine"]
    assert len(problems) == 1 and f"{f}:2:" in problems[0] and field in problems[0], problems
    assert "\n" not in problems[0]


def test_jobs_file_total_is_bounded(tmp_path, monkeypatch):
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.generate.jobs import read_jobs

    monkeypatch.setenv("COMPINV_LIMITS", '{"max_jobs_images": 5}')
    f = tmp_path / "jobs.jsonl"
    f.write_text('{"prompt": "a", "n": 3}\n{"prompt": "b", "n": 3}\n')
    with pytest.raises(ConfigError, match="max_jobs_images"):
        read_jobs(f, {"seed": 0, "steps": 2, "guidance": 7.5})


def test_a_bad_concept_fails_its_job_only_and_failures_are_recorded(tiny_model, trained, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained.out, broken)
    (broken / "embeddings.safetensors").write_bytes(b"garbage")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"id": "plain", "prompt": "a red star"},
        {"id": "bad", "prompt": "a <my-heart> heart", "concepts": [str(broken)]},
        {"id": "missing", "prompt": "a <my-heart> heart", "concepts": [str(tmp_path / "nope")]},
        {"id": "layout", "prompt": "a red star", "layout": "moon=0,0,1,1"},
        {"id": "good", "prompt": "a <my-heart> heart", "concepts": [str(trained.out)]},
    ]) + "\n")
    out = tmp_path / "out"
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model),
                              "--out", str(out), "--steps", "2"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert sorted(p.name for p in out.glob("*.png")) == ["good_000.png", "plain_000.png"]
    failures = [json.loads(x)["error"] for x in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 3
    assert any("(bad)" in f and "hash" in f for f in failures), failures
    assert any("(missing)" in f and "not found" in f for f in failures), failures
    assert any("(layout)" in f and "moon" in f for f in failures), failures


def test_a_run_that_writes_nothing_leaves_no_folder(tiny_model, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a", "height": 100}\n')
    out = tmp_path / "out"
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model),
                              "--out", str(out), "--steps", "2"])
    assert res.exit_code == 1 and "multiple of" in res.stderr
    assert not out.exists() or [p.name for p in out.iterdir()] == ["failures.jsonl"]


# --- artifacts and manifests are schema-checked --------------------------------------------------


def _artifact_copy(trained, tmp_path, edit):
    import shutil

    d = tmp_path / "concept"
    shutil.copytree(trained.out, d)
    art = json.loads((d / "artifact.json").read_text())
    art = edit(art)
    (d / "artifact.json").write_text(json.dumps(art))
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda a: {**a, "files": []}, "files"),
    (lambda a: {**a, "files": {}}, "embeddings.safetensors"),  # was: no hash check at all
    (lambda a: {**a, "token": 5}, "token"),
    (lambda a: {**a, "vectors": "abc"}, "vectors"),
    (lambda a: {**a, "vectors": 10**9}, "vectors"),
    (lambda a: [a], "JSON object"),
    (lambda a: {**a, "base_model": "x"}, "base_model"),
    (lambda a: {k: v for k, v in a.items() if k != "token"}, "token"),
    (lambda a: {**a, "tokens": ["<a>"]}, "tokens"),
])
def test_tampered_artifact_json_is_one_error(trained, tiny_model, tmp_path, edit, message):
    from compinv_rt.models.artifact import read_artifact

    d = _artifact_copy(trained, tmp_path, edit)
    with pytest.raises(ArtifactError, match=message):
        read_artifact(d)
    res = runner.invoke(app, ["generate", "a <my-heart> heart", "--model", str(tiny_model),
                              "--concept", str(d), "--out", str(tmp_path / "o")])
    _one_error(res, message)


@pytest.mark.parametrize("value, message", [(float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"),
                                            (1e30, "values up to")])
def test_non_finite_or_huge_embedding_is_refused_even_with_a_matching_hash(trained, tmp_path, value,
                                                                             message):
    from compinv_rt.models.artifact import EMBEDDINGS, file_sha256, read_embedding_file, write_embeddings

    def poison(art):
        name, emb, meta = read_embedding_file(trained.out / EMBEDDINGS)
        emb[0, 0] = value
        write_embeddings(tmp_path / "concept" / EMBEDDINGS, name, emb, {})
        art["files"][EMBEDDINGS] = file_sha256(tmp_path / "concept" / EMBEDDINGS)
        return art

    import shutil

    shutil.copytree(trained.out, tmp_path / "concept")
    art = json.loads((tmp_path / "concept" / "artifact.json").read_text())
    (tmp_path / "concept" / "artifact.json").write_text(json.dumps(poison(art)))
    from compinv_rt.models.artifact import read_artifact

    read_artifact(tmp_path / "concept")  # the hash matches: only the value check can refuse it
    with pytest.raises(ArtifactError, match=message):
        read_embedding_file(tmp_path / "concept" / EMBEDDINGS)


def _fake_engine(tmp_path, fmt="onnx", device=None):
    """A real manifest (write_manifest) over a dummy file: enough for verify_engine."""
    from compinv_rt.core.types import Precision
    from compinv_rt.export.manifest import EngineFormat, EngineRequest, tool_versions, write_manifest
    from compinv_rt.unet.iospec import BatchProfile, UNetIOSpec

    d = tmp_path / "engine"
    d.mkdir()
    (d / "unet.bin").write_bytes(b"weights" * 10)
    spec = UNetIOSpec(4, 4, 77, 32, 8, 8, Precision.fp32)
    fmt = EngineFormat(fmt)
    req = EngineRequest(fmt, "u" * 64, spec, (BatchProfile(2, 2, 2),), tool_versions(fmt), device,
                        {"exporter": "legacy", "opset": 17})
    write_manifest(d, req, ["unet.bin"], {})
    return d, req


def _rekey(d, edit):
    """Edit manifest.json and recompute its key, as a careful tamperer would."""
    from compinv_rt.export.manifest import EngineFormat, EngineRequest, profiles_of
    from compinv_rt.unet.iospec import UNetIOSpec

    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    m["key"] = EngineRequest(EngineFormat(m["format"]), m["unet_hash"], UNetIOSpec.from_dict(m["io"]),
                             tuple(profiles_of(m)), m["versions"], m["device"], m["options"]).key
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="foo"), "format"),
    (lambda m: m.update(profiles=[]), "profiles"),
    (lambda m: m.update(io="x"), "io"),
    (lambda m: m.update(artifacts={}), "artifacts"),
    (lambda m: m.update(artifacts={"../etc/passwd": "0" * 64}), "artifact name"),
    (lambda m: m.pop("key"), "key"),
    (lambda m: m.update(profiles=[{"min": 4, "opt": 2, "max": 8}]), "min <= opt <= max"),
    (lambda m: m.update(schema=1), "schema"),
])
def test_tampered_manifest_is_one_error(tmp_path, edit, message):
    from compinv_rt.export.manifest import verify_engine

    d, _ = _fake_engine(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatch, match=message):
        verify_engine(d)


def test_swapped_engine_file_is_refused_even_with_its_hash_and_key_recomputed(tmp_path):
    from compinv_rt.export.manifest import file_sha256, verify_engine

    d, _ = _fake_engine(tmp_path)
    verify_engine(d)
    (d / "unet.bin").write_bytes(b"another network")

    def swap(m):
        m["artifacts"]["unet.bin"] = file_sha256(d / "unet.bin")
        m["device"] = None  # and an edited field, key recomputed
    _rekey(d, swap)
    with pytest.raises(EngineMismatch, match="edited"):
        verify_engine(d)


def test_corrupt_cache_advice_names_an_existing_command(tmp_path):
    import inspect

    from compinv_rt.export import build

    src = inspect.getsource(build.export_engine)
    assert "pass --force" not in src and "export --force" in src


# --- nothing non-finite reaches disk --------------------------------------------------------------


def test_sidecars_refuse_nan(tmp_path):
    from compinv_rt.core.outputs import atomic_write_json

    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"guidance": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_non_finite_latents_are_refused_with_the_seed(tiny_model, tmp_path):
    from compinv_rt.generate.generation import generate_to_folder
    from compinv_rt.generate.session import GenerationSession, Request, SessionOptions
    from compinv_rt.sampling.pipeline import SamplingConfig

    session = GenerationSession.open(SessionOptions(model=str(tiny_model), device="cpu"))
    out = tmp_path / "o"
    with pytest.raises(NonFiniteError, match="seed 5, 6"):  # guidance inf: NaN latents
        generate_to_folder(session, Request("a red star", 5, 2, "", SamplingConfig(2, float("inf"))),
                           out)
    assert not out.exists() or not list(out.iterdir())


def test_non_finite_item_fails_its_job_and_keeps_the_batch_mates(tiny_model, tmp_path, monkeypatch):
    """One image of a packed batch turns NaN: its job fails, the other image is written."""
    from compinv_rt.sampling import pipeline as P

    real = P.Pipeline.decode

    def decode(self, latents):
        latents = latents.clone()
        latents[1] = float("nan")
        return real(self, latents)

    monkeypatch.setattr(P.Pipeline, "decode", decode)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "a", "prompt": "a red star"}\n{"id": "b", "prompt": "a blue circle"}\n')
    out = tmp_path / "o"
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model),
                              "--out", str(out), "--steps", "2", "--max-batch", "2"])
    assert res.exit_code == 1 and "(b)" in res.stderr and "non-finite" in res.stderr, res.output
    assert sorted(p.name for p in out.glob("*_000.*")) == ["a_000.json", "a_000.png"]
    _strict_json(out / "a_000.json")


def test_diverging_training_stops_and_keeps_the_last_good_checkpoint(tiny_model, photos, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from compinv_rt.train import losses

    # A huge --lr is refused up front now (issue 28): the loss itself blows up from the 4th step on.
    calls, real = [0], losses.masked_mse

    def exploding(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("inf") if calls[0] > 3 else loss

    monkeypatch.setattr(losses, "masked_mse", exploding)
    out = tmp_path / "c"
    res = runner.invoke(app, ["train", "--images", str(photos), "--token", "<t>", "--class-word",
                              "heart", "--out", str(out), "--model", str(tiny_model),
                              "--steps", "6", "--batch", "1", "--resolution", "64", "--variants",
                              "1", "--checkpoint-every", "1", "--device", "cpu"])
    _one_error(res, "diverged")
    assert not (out / "artifact.json").exists() and not (out / "embeddings.safetensors").exists()
    for ck in (out / "checkpoints").glob("*.safetensors"):
        assert all(bool(t.isfinite().all()) for t in load_file(ck).values()), ck


# --- faults -------------------------------------------------------------------------------------------


def _fail_fsync_after(monkeypatch, n):
    """The n+1-th fsync fails with ENOSPC: a disk that fills up mid-run."""
    import compinv_rt.core.outputs as O

    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(O.os, "fsync", fsync)


def test_disk_full_during_generate_is_one_line_saying_what_was_kept(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "o"
    _fail_fsync_after(monkeypatch, 5)  # png, json, png, json, png | json fails
    res = runner.invoke(app, ["generate", "a red star", "--model", str(tiny_model), "-n", "4",
                              "--steps", "2", "--out", str(out)])
    _one_error(res, "No space left on device", "kept 2 complete image(s)")
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 4 and all(not n.startswith(".") for n in names), names  # 2 png + 2 json


def test_disk_full_during_jobs_then_resume_finishes(tiny_model, tmp_path, monkeypatch):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": f"j{i}", "prompt": "a red star", "seed": i}) + "\n"
                            for i in range(4)))
    out = tmp_path / "o"
    args = ["generate", "--jobs", str(jobs), "--model", str(tiny_model), "--steps", "2",
            "--out", str(out), "--max-batch", "4"]
    _fail_fsync_after(monkeypatch, 3)
    _one_error(runner.invoke(app, args), "No space left", "1 image(s) of this run are complete",
               "--resume")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("j*_000.json"))) == 4


def test_permission_error_is_one_line(tiny_model, tmp_path, monkeypatch):
    import compinv_rt.core.outputs as O

    def fdopen(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "x.png")

    out = tmp_path / "o"
    out.mkdir()
    monkeypatch.setattr(O.os, "fdopen", fdopen)
    res = runner.invoke(app, ["generate", "a red star", "--model", str(tiny_model), "-n", "1",
                              "--steps", "1", "--out", str(out)])
    _one_error(res, "Permission denied", "kept 0 complete image(s)")
    assert list(out.iterdir()) == []


def test_second_run_on_one_folder_is_refused_while_the_first_holds_it(tiny_model, tmp_path):
    from compinv_rt.core.outputs import FolderLock

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a red star"}\n')
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from compinv_rt.core.outputs import FolderLock\n"
                               f"with FolderLock({str(out)!r}):\n"
                               "    print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model),
                                  "--out", str(out), "--steps", "1", "--resume"])
        _one_error(res, "in use by another compinv-rt run", f"pid {holder.pid}")
        assert not list(out.glob("*.png"))
        holder.kill()  # kill -9: the kernel drops the lock, nothing to clean up by hand
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with FolderLock(out):
        pass


def test_stale_export_temp_folders_are_removed_but_live_ones_kept(tmp_path):
    from compinv_rt.export.build import remove_stale_builds

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".onnx-0123456789abcdef.{dead.pid}.x1y2"
    live = tmp_path / f".onnx-0123456789abcdef.{os.getpid()}.z3"
    for d in (stale, live):
        d.mkdir()
        (d / "raw.onnx").write_bytes(b"\0" * 100)
    (tmp_path / "onnx-0123456789abcdef").mkdir()  # a finished engine is never touched
    assert remove_stale_builds(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and (tmp_path / "onnx-0123456789abcdef").exists()


def test_world_photos_never_overwrite(tmp_path):
    from compinv_rt.apps.world.cli import world_app

    out = tmp_path / "p"
    assert runner.invoke(world_app, ["photos", "--out", str(out), "--count", "2"]).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = runner.invoke(world_app, ["photos", "--out", str(out), "--count", "2", "--seed", "3"])
    _one_error(res, "not empty")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_16_bit_and_oversized_training_images(tmp_path, monkeypatch):
    from PIL import Image

    from compinv_rt.core.errors import ConfigError
    from compinv_rt.train.data import read_images

    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    (img,) = read_images([tmp_path / "deep.png"])
    a = np.asarray(img)
    assert a.shape == (64, 64, 3) and a.min() < 10 and a.max() > 245 and a.std() > 50  # not all white
    monkeypatch.setenv("COMPINV_LIMITS", '{"max_image_pixels": 1000}')
    with pytest.raises(ConfigError, match="max_image_pixels"):
        read_images([tmp_path / "deep.png"])


# --- the blind spots: each test below fails with one deliberate bug (benchmarks/reliability.md) ---


def test_anchor_term_in_the_loop_uses_the_full_sequence_length(tiny_model, photos, tmp_path):
    """Bug 1: the loop passing seq_len 1 to the anchor loss (a 77x pull)."""
    from compinv_rt.models.loading import load_model
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept

    m = load_model(str(tiny_model), device="cpu")
    table = m.text_encoder.get_input_embeddings().weight.detach()
    ids = m.tokenizer.convert_tokens_to_ids(["star</w>", "heart</w>"])
    expected = float(((table[ids[0]] - table[ids[1]]) ** 2).sum() / (77 * table.shape[1])) * 2
    cfg = TrainConfig(token="<p>", class_word="heart", init_word="star", vectors=2, steps=1, batch=1,
                      resolution=64, variants=1, checkpoint_every=1)
    seen = []
    train_concept(prepare(cfg, photos, tiny_model), tmp_path / "c", device="cpu",
                  on_step=lambda info: seen.append(info.anchor))
    assert expected > 0 and seen[0] == pytest.approx(expected, rel=1e-4)


def test_every_vector_of_a_multi_vector_token_is_trained_by_reconstruction(tiny_model, photos, tmp_path):
    """Bug 2: prompts holding only the first vector. With no anchor term, a vector missing from
    the prompts moves only by weight decay (lr * wd * |v|); one in them moves about lr per entry."""
    from compinv_rt.models.artifact import read_embedding_file
    from compinv_rt.models.loading import load_model
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept

    cfg = TrainConfig(token="<p>", class_word="heart", vectors=3, anchor_weight=0.0, steps=1,
                      batch=1, resolution=64, variants=1, checkpoint_every=1)
    train_concept(prepare(cfg, photos, tiny_model), tmp_path / "c", device="cpu")
    _, vectors, _ = read_embedding_file(tmp_path / "c" / "embeddings.safetensors")
    m = load_model(str(tiny_model), device="cpu")
    init = m.text_encoder.get_input_embeddings().weight[
        m.tokenizer.convert_tokens_to_ids("heart</w>")].detach()
    decay_only = cfg.effective_lr * cfg.weight_decay * float(init.norm())
    moved = (vectors - init[None]).norm(dim=1)
    assert (moved > 10 * decay_only).all(), (moved, decay_only)


def test_resume_skips_finished_images(tiny_model, tmp_path):
    """Bug 3: --resume regenerating finished job images. Finished files keep their mtime; only the
    removed item is written again, identical to the first run."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": f"j{i}", "prompt": "a red star", "seed": i}) + "\n"
                            for i in range(3)))
    out = tmp_path / "o"
    args = ["generate", "--jobs", str(jobs), "--model", str(tiny_model), "--steps", "2",
            "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    first = _pixels(out / "j1_000.png")
    (out / "j1_000.json").unlink()  # j1 is "unfinished"
    (out / "j1_000.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 0 and "2 already done" in res.output, res.output
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"j1_000.png", "j1_000.json"}
    assert np.abs(_pixels(out / "j1_000.png") - first).max() <= 1  # batch of 1 vs batch of 3


@pytest.mark.parametrize("guidance, negative", [(1.0, ""), (6.0, "blue circle, blurry")])
def test_diffusers_parity_without_guidance_and_with_a_negative_prompt(tiny_model, tmp_path, guidance,
                                                                      negative, stock_pipeline_cls):
    """Bug 4 (no-guidance path with an empty context) and bug 8 (negative prompt ignored)."""
    prompt = "a red star and a blue circle on grass"
    res = runner.invoke(app, ["generate", prompt, "--model", str(tiny_model), "--out", str(tmp_path),
                              "-n", "2", "--steps", "6", "--seed", "4", "--guidance", str(guidance),
                              "--negative-prompt", negative])
    assert res.exit_code == 0, res.output
    pipe = stock_pipeline_cls.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(prompt, negative_prompt=negative or None, num_images_per_prompt=2,
               num_inference_steps=6, guidance_scale=guidance,
               generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images
    for seed, ref_img in zip((4, 5), ref):
        ours = _pixels(next(tmp_path.glob(f"*_{seed}.png")))
        assert np.abs(ours - np.asarray(ref_img, dtype=np.int16)).max() <= 1
    assert np.asarray(ref[0], dtype=np.float32).std() > 5


def test_bias_is_average_pooled_to_each_layer():
    """Bug 5: the bias pooled with max instead of the average."""
    from compinv_rt.unet.attention import bias_for_layer

    bias = torch.zeros(1, 2, 4, 4)
    bias[0, 0, 0, 0] = 4.0  # one cell of the top-left 2x2 block
    bias[0, 1] = -2.0
    pooled = bias_for_layer(bias, seq_len=4)  # a layer at half the latent resolution
    assert pooled.shape == (1, 1, 4, 2)
    assert pooled[0, 0, :, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert pooled[0, 0, :, 1].tolist() == [-2.0] * 4


def test_engine_for_another_device_is_refused(tmp_path):
    """Bug 6: verify_engine ignoring the device tag."""
    from compinv_rt.export.manifest import EngineFormat, verify_engine

    d, _ = _fake_engine(tmp_path, "aoti", device="cuda-sm80")
    with pytest.raises(EngineMismatch, match="cuda-sm80"):
        verify_engine(d, fmt=EngineFormat.aoti, device="cpu")


def test_jobs_with_different_guidance_equal_their_single_generations(tiny_model, tmp_path):
    """Bug 7: jobs with different guidance packed into one batch (one would get the other's)."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "lo", "prompt": "a red star", "seed": 2, "guidance": 2.0}\n'
                    '{"id": "hi", "prompt": "a red star", "seed": 2, "guidance": 9.0}\n')
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--model", str(tiny_model), "--steps",
                              "3", "--out", str(tmp_path / "o"), "--max-batch", "2"])
    assert res.exit_code == 0, res.output
    for name, g in (("lo", "2.0"), ("hi", "9.0")):
        single = tmp_path / name
        r = runner.invoke(app, ["generate", "a red star", "--model", str(tiny_model), "-n", "1",
                                "--seed", "2", "--steps", "3", "--guidance", g, "--out", str(single)])
        assert r.exit_code == 0, r.output
        ref = _pixels(next(single.glob("*_2.png")))
        assert np.abs(_pixels(tmp_path / "o" / f"{name}_000.png") - ref).max() <= 1, name
    assert np.abs(_pixels(tmp_path / "o" / "lo_000.png") - _pixels(tmp_path / "o" / "hi_000.png")).max() > 5


def test_modified_embeddings_are_refused(trained, tmp_path):
    """Bug 9: read_artifact skipping the embeddings hash."""
    import shutil

    from compinv_rt.models.artifact import EMBEDDINGS, read_artifact, read_embedding_file, write_embeddings

    d = tmp_path / "c"
    shutil.copytree(trained.out, d)
    name, emb, _ = read_embedding_file(d / EMBEDDINGS)
    write_embeddings(d / EMBEDDINGS, name, emb + 0.01, {})  # a valid file with other vectors
    with pytest.raises(ArtifactError, match="does not match the hash"):
        read_artifact(d)


def test_recorded_layout_boxes_are_the_predictors(tiny_model, tmp_path):
    """Bug 11: layout-model boxes replaced by fixed boxes (the sidecar still saying 'model')."""
    from compinv_rt.models.loading import load_model
    from compinv_rt.spatial import layout_model as lm
    from compinv_rt.spatial.layouts import concept_tokens

    boxes = {"star": (0.55, 0.1, 0.95, 0.5), "circle": (0.05, 0.5, 0.45, 0.9), "heart": (0.2, 0.2, 0.7, 0.7)}
    examples = [lm.LayoutExample(f"a {a} and a {b}", (a, b), (boxes[a], boxes[b]))
                for a in boxes for b in boxes if a != b]
    lm.write_jsonl(tmp_path / "layouts.jsonl", examples)
    fit = runner.invoke(app, ["layout", "fit", "--data", str(tmp_path / "layouts.jsonl"), "--model",
                              str(tiny_model), "--out", str(tmp_path / "lm"), "--epochs", "3"])
    assert fit.exit_code == 0, fit.output
    prompt = "a star and a circle on grass"
    res = runner.invoke(app, ["generate", prompt, "--model", str(tiny_model), "--out",
                              str(tmp_path / "g"), "-n", "1", "--steps", "2", "--spatial", "bias",
                              "--layout-model", str(tmp_path / "lm")])
    assert res.exit_code == 0, res.output
    layout = _strict_json(next((tmp_path / "g").glob("*.json")))["spatial"]["layout"]
    m = load_model(str(tiny_model), device="cpu")
    net, _ = lm.load(tmp_path / "lm")
    predicted = lm.LayoutPredictor(net, m.tokenizer, m.text_encoder)(
        prompt, concept_tokens(m.tokenizer, prompt, ["star", "circle"]))
    assert layout["source"] == "model"
    assert [tuple(c["boxes"][0]) for c in layout["concepts"]] == [tuple(b) for b in predicted]


def test_kill_hook_dies_after_n_items(monkeypatch):
    """The kill tests' hook: the process kills itself (only itself) after N items, once."""
    import signal

    from compinv_rt.generate import jobs

    killed = []
    monkeypatch.setenv(jobs.KILL_AFTER_ENV, "2")
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    hook = jobs.kill_hook()
    hook()
    assert killed == []
    hook()
    assert killed == [(os.getpid(), signal.SIGKILL)]
    monkeypatch.delenv(jobs.KILL_AFTER_ENV)
    assert jobs.kill_hook() is None


def test_readme_export_is_the_engine_generate_finds(tiny_model, tmp_path, monkeypatch):
    """The README's `export --format onnx --dynamic --batch-sizes 1,64` builds the engine that
    `generate --backend onnxruntime` looks up (it used to build a second one)."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["export", "--format", "onnx", "--dynamic", "--batch-sizes", "1,64",
                              "--model", str(tiny_model)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", "a red star", "--model", str(tiny_model), "-n", "1",
                              "--steps", "1", "--backend", "onnxruntime", "--out", "o"])
    assert res.exit_code == 0, res.output
    assert "reusing engine" in res.stderr and len(list((tmp_path / "engines").iterdir())) == 1


def test_temp_files_of_killed_runs_are_removed_on_start_but_live_ones_kept(tmp_path):
    from compinv_rt.core.outputs import atomic_write_bytes, remove_stale_temp_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a_0.png.{dead.pid}.k2j3.tmp"
    old_style = tmp_path / ".a_1.png.x9y8.tmp"
    live = tmp_path / f".a_2.png.{os.getpid()}.q1w2.tmp"
    for p in (stale, old_style, live):
        p.write_bytes(b"half a png")
    atomic_write_bytes(tmp_path / "done.png", b"png")
    assert remove_stale_temp_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "done.png"])
