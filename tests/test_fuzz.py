"""Property-based fuzzing (hypothesis) of every input the user controls: CLI options, JSONL job
lines, layout strings, artifact.json and manifest.json fields.

The property, everywhere: exit 0 with valid output (strict JSON sidecars, finite images), or
exit 1 with `error:` lines only -- never a traceback, never another exception type.

Profiles (tests/conftest.py): `ci` (default; derandomized: 934 cheap examples and 14 end-to-end
runs, about 35 s here) and `long` (random, every count x COMPINV_FUZZ_SCALE, default 20):
`HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py --hypothesis-show-statistics`; results of the
long run in benchmarks/reliability.md.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import FUZZ_SCALE  # noqa: E402 (tests/ is on sys.path: pytest's rootdir import)
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compinv_rt.apps.cli import app
from compinv_rt.core.errors import ArtifactError, ConfigError, EngineMismatch

runner = CliRunner()
FIXTURES_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
               HealthCheck.data_too_large, HealthCheck.filter_too_much]
# Small limits keep every accepted end-to-end example cheap; they also exercise COMPINV_LIMITS.
SMALL_LIMITS = '{"max_images": 2, "max_steps": 3, "max_size": 128, "max_batch": 8}'


def cheap(n):
    return settings(max_examples=n * FUZZ_SCALE, suppress_health_check=FIXTURES_OK, deadline=None)


# --- values ----------------------------------------------------------------------------------------

big_ints = st.one_of(st.integers(-3, 3), st.integers(-2**70, 2**70),
                     st.sampled_from([0, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    [0.0, 1.0, -0.0, 1e30, -1e30, 1e-320, 7.5]))
texts = st.one_of(st.text(max_size=30), st.sampled_from(
    ["", " ", "a\nb", "x" * 200, "../../etc", "<tok>", "a red star", "\x00", "é"]))
json_scalars = st.one_of(st.none(), st.booleans(), big_ints, floats, texts)
json_values = st.recursive(json_scalars, lambda c: st.one_of(
    st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=6)


def one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


# --- JSONL lines (parser) ----------------------------------------------------------------------------

JOB_FIELDS = ["prompt", "concepts", "layout", "seed", "n", "negative_prompt", "steps", "guidance",
              "height", "width", "id"]


@cheap(300)
@given(st.dictionaries(st.one_of(st.sampled_from(JOB_FIELDS), st.text(max_size=6)), json_values,
                       max_size=6), st.booleans())
def test_job_line_is_a_job_or_one_line_error(obj, with_prompt):
    from compinv_rt.core.schemas import SEED_MAX, limits
    from compinv_rt.generate.jobs import parse_job

    if with_prompt:
        obj.setdefault("prompt", "a red star")
    text = json.dumps(obj)  # allow_nan: NaN/Infinity tokens reach the parser too
    try:
        job = parse_job(text, 3, {"seed": 0, "steps": 25, "guidance": 7.5})
    except ValueError as exc:
        one_line(str(exc))
        return
    lim = limits()
    assert job.prompt.strip() and 1 <= job.n <= lim.max_images and 1 <= job.steps <= lim.max_steps
    assert math.isfinite(job.guidance) and 0 <= job.guidance <= lim.max_guidance
    assert 0 <= job.seed and job.seed + job.n - 1 <= SEED_MAX
    assert "\n" not in job.id and "/" not in job.id and not job.id.startswith(".")
    for v in (job.height, job.width):
        assert v is None or 1 <= v <= lim.max_size


@cheap(200)
@given(st.text(max_size=80))
def test_raw_job_text_never_crashes(text):
    from compinv_rt.generate.jobs import parse_job

    try:
        parse_job(text, 1, {"seed": 0, "steps": 25, "guidance": 7.5})
    except ValueError as exc:
        one_line(str(exc))


# --- layout strings ----------------------------------------------------------------------------------

numbers = st.one_of(floats.map(repr), big_ints.map(str), st.sampled_from(
    ["0", "1", "0.5", ".2", "1e400", "nan", "inf", "-0", "", " ", "x"]))
entries = st.one_of(
    st.builds(lambda p, b: f"{p}={','.join(b)}", texts, st.lists(numbers, min_size=0, max_size=5)),
    texts)


@cheap(300)
@given(st.one_of(st.lists(entries, max_size=4).map(";".join), st.text(max_size=40)))
def test_layout_string_is_a_layout_or_one_line_error(text):
    from compinv_rt.spatial.layouts import parse_layout

    try:
        spec = parse_layout(text)
    except ConfigError as exc:
        one_line(str(exc))
        return
    for region in spec.regions:
        for box in region.boxes:
            assert all(math.isfinite(v) and 0 <= v <= 1 for v in box), (text, box)


# --- artifact.json ---------------------------------------------------------------------------------

ARTIFACT_PATHS = [("schema_version",), ("token",), ("vectors",), ("tokens",), ("class_word",),
                  ("base_model",), ("base_model", "hash"), ("files",),
                  ("files", "embeddings.safetensors"), ("kind",), ("config",)]


def _set(obj, path, value):
    for key in path[:-1]:
        if not isinstance(obj.get(key), dict):
            obj[key] = {}
        obj = obj[key]
    if value is _DELETE:
        obj.pop(path[-1], None)
    else:
        obj[path[-1]] = value


_DELETE = object()


@pytest.fixture(scope="module")
def concept_dir(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-concept") / "c"
    shutil.copytree(trained.out, d)
    return d


@cheap(60)
@given(st.sampled_from(ARTIFACT_PATHS), st.one_of(json_values, st.just(_DELETE)), st.booleans())
def test_artifact_field_is_accepted_or_one_line_error(concept_dir, path, value, top_level_list):
    from compinv_rt.models.artifact import read_artifact

    original = (concept_dir / "artifact.json").read_text()
    art = json.loads(original)
    _set(art, path, value)
    try:
        (concept_dir / "artifact.json").write_text(json.dumps([art] if top_level_list else art))
        try:
            got = read_artifact(concept_dir)
        except ArtifactError as exc:
            one_line(str(exc))
            return
        assert not top_level_list and isinstance(got["token"], str) and got["vectors"] >= 1
        assert isinstance(got["files"]["embeddings.safetensors"], str)  # the hash was checked
    finally:
        (concept_dir / "artifact.json").write_text(original)


# --- manifest.json ---------------------------------------------------------------------------------

MANIFEST_PATHS = [("key",), ("seal",), ("schema",), ("format",), ("unet_hash",), ("io",),
                  ("io", "latent_height"), ("io", "precision"), ("profiles",), ("versions",),
                  ("device",), ("options",), ("artifacts",), ("artifacts", "unet.bin")]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    from test_reliability import _fake_engine

    d, _ = _fake_engine(tmp_path_factory.mktemp("fuzz-engine"))
    return d


@cheap(60)
@given(st.sampled_from(MANIFEST_PATHS), st.one_of(json_values, st.just(_DELETE)),
       st.sampled_from([None, "profiles", "io"]))
def test_manifest_field_is_accepted_or_one_line_error(engine_dir, path, value, shape):
    from compinv_rt.export.manifest import verify_engine

    original = (engine_dir / "manifest.json").read_text()
    m = json.loads(original)
    _set(m, path, value)
    if shape == "profiles" and value is not _DELETE:
        m["profiles"] = [value]
    try:
        (engine_dir / "manifest.json").write_text(json.dumps(m))
        try:
            verify_engine(engine_dir)
        except EngineMismatch as exc:
            one_line(str(exc))
            return
        assert json.loads((engine_dir / "manifest.json").read_text()) == json.loads(original), \
            f"an edited manifest was accepted: {path} = {value!r}"
    finally:
        (engine_dir / "manifest.json").write_text(original)


# --- the CLI end to end ---------------------------------------------------------------------------------


def _check_run(result, out):
    """exit 0 with valid output, or exit 1 with error lines only."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        pngs = sorted(out.glob("*.png"))
        assert pngs, result.output
        for p in out.glob("*.json"):
            json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"{p}: {c}"))
        from PIL import Image

        for p in pngs:
            a = np.asarray(Image.open(p))
            assert a.max() > 0, f"{p} is all black: a non-finite image reached disk"
        return
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr


# A valid run, then 0-2 of its options replaced by fuzz: a third of the examples run end to end.
VALID_OPTIONS = {"prompt": "a red star", "-n": "1", "--steps": "2", "--guidance": "7.5",
                 "--seed": "0", "--height": "64", "--width": "64", "--device": "cpu",
                 "--precision": "fp32", "--negative-prompt": "", "--max-batch": "2",
                 "--bias-strength": "2.0"}
FUZZ_OPTIONS = {
    "prompt": texts, "-n": big_ints.map(str), "--steps": big_ints.map(str),
    "--guidance": floats.map(repr), "--seed": big_ints.map(str), "--height": big_ints.map(str),
    "--width": big_ints.map(str), "--negative-prompt": texts, "--max-batch": big_ints.map(str),
    "--bias-strength": floats.map(repr),
    "--device": st.sampled_from(["auto", "tpu", "cuda:x", "", "CPU", "cuda:99", "mps"]),
    "--precision": st.sampled_from(["auto", "int4", "bf16", "fp16"]),
}


@st.composite
def generate_options(draw):
    opts = dict(VALID_OPTIONS)
    for key in draw(st.lists(st.sampled_from(sorted(FUZZ_OPTIONS)), max_size=2, unique=True)):
        opts[key] = draw(FUZZ_OPTIONS[key])
    return opts


@cheap(9)
@given(generate_options())
def test_generate_options(tiny_model, tmp_path_factory, monkeypatch, opts):
    monkeypatch.setenv("COMPINV_LIMITS", SMALL_LIMITS)
    from compinv_rt.core.schemas import _limits_from

    _limits_from.cache_clear()
    out = tmp_path_factory.mktemp("gen")
    args = ["generate", "--model", str(tiny_model), "--out", str(out / "o")]
    for key, value in opts.items():
        if key != "prompt":
            args += [key, value]
    result = runner.invoke(app, [*args, "--", opts["prompt"]])
    event(f"exit {result.exit_code}")
    _check_run(result, out / "o")
    _limits_from.cache_clear()


JOB_FUZZ = {"n": big_ints, "steps": big_ints, "guidance": floats, "seed": big_ints,
            "height": big_ints, "id": texts, "layout": texts, "prompt": texts,
            "concepts": st.one_of(texts, st.lists(texts, max_size=2)), "negative_prompt": texts,
            "extra": json_values}


@st.composite
def job_objects(draw):
    job = {"prompt": "a red star", "height": 64, "width": 64}
    for key in draw(st.lists(st.sampled_from(sorted(JOB_FUZZ)), max_size=2, unique=True)):
        job[key] = draw(JOB_FUZZ[key])
    return job



@cheap(5)
@given(st.lists(st.one_of(job_objects().map(json.dumps), st.text(max_size=20)), min_size=1,
                max_size=3))
def test_jobs_files(tiny_model, tmp_path_factory, monkeypatch, lines):
    monkeypatch.setenv("COMPINV_LIMITS", SMALL_LIMITS)
    from compinv_rt.core.schemas import _limits_from

    _limits_from.cache_clear()
    d = tmp_path_factory.mktemp("jobs")
    (d / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    assume(any(line.strip() and not line.lstrip().startswith("#") for line in lines))
    result = runner.invoke(app, ["generate", "--jobs", str(d / "jobs.jsonl"), "--model",
                                 str(tiny_model), "--out", str(d / "o"), "--steps", "2"])
    event(f"exit {result.exit_code}")
    _check_run(result, d / "o")
    if result.exit_code == 1 and (d / "o").exists():
        for p in (d / "o").glob("*.png"):  # the jobs that did run are complete
            assert p.with_suffix(".json").exists()
    _limits_from.cache_clear()
