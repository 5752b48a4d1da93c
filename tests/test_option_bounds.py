"""Every numeric option of every command is bounded before the command runs (issue 28 item 1)."""

from __future__ import annotations

import inspect
import typing

import pytest
from typer.testing import CliRunner

from compinv_rt.apps import option_bounds
from compinv_rt.apps.cli import app

runner = CliRunner()


def _commands(typer_app=app, prefix=()):
    for c in typer_app.registered_commands:
        yield (*prefix, c.name or c.callback.__name__), c.callback
    for g in typer_app.registered_groups:
        yield from _commands(g.typer_instance, (*prefix, g.name))


def _numeric_params(fn) -> list[str]:
    hints = typing.get_type_hints(fn, include_extras=True)
    out = []
    for name in inspect.signature(fn).parameters:
        t = hints.get(name)
        base = typing.get_args(t)[0] if typing.get_origin(t) is typing.Annotated else t
        if base in (int, float) or any(a in (int, float) for a in typing.get_args(base)):
            out.append(name)
    return out


COMMANDS = list(_commands())
NUMERIC = [(path, fn, p) for path, fn in COMMANDS for p in _numeric_params(fn)]


def test_the_walk_sees_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"generate", "train", "eval", "bench", "serve", "layout fit", "world train", "world score"} <= names
    assert len(NUMERIC) > 80


@pytest.mark.parametrize("path, fn, param", NUMERIC, ids=[f"{' '.join(p)}:{q}" for p, _, q in NUMERIC])
def test_every_numeric_option_has_bounds_and_its_default_is_inside(path, fn, param):
    command = option_bounds.command_id(fn)
    assert option_bounds.bounds_of(command, param) is not None, f"{' '.join(path)} --{param} is unbounded"
    default = inspect.signature(fn).parameters[param].default
    default = getattr(default, "default", default)  # typer.Option(...) or a plain default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        option_bounds.check_command_options(command, {param: default})  # the default is allowed


def _flag(fn, param) -> tuple[str, list[str]]:
    from typer.main import get_command

    for path, f in COMMANDS:
        if f is fn:
            cmd = get_command(app)
            for name in path:
                cmd = cmd.commands[name]
            return next(p.opts[-1] for p in cmd.params if p.name == param), list(path)
    raise AssertionError(param)


HUGE = [("generate", "steps"), ("eval", "samples"), ("eval", "steps"), ("bench", "steps"),
        ("bench", "repeats"), ("layout fit", "epochs"), ("layout fit", "images_per_prompt"),
        ("layout world-data", "n"), ("world train", "cache_scenes"), ("world train", "unet_batch"),
        ("world score", "k"), ("world curve", "prompts_per_kind"), ("world judge-train", "scenes_n"),
        ("train", "variants"), ("train", "grad_accum"), ("serve", "max_images"), ("serve", "queue_size")]


@pytest.mark.parametrize("command, param", HUGE)
def test_a_huge_value_is_one_error_line_before_anything_runs(command, param):
    """The bound is checked by the commands' shared decorator, before the command body starts."""
    fn = next(f for path, f in COMMANDS if " ".join(path) == command)
    flag, path = _flag(fn, param)
    result = runner.invoke(app, [*path, flag, str(10**12), *_required(command)])
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and flag in err and "must be <=" in err, err


def _required(command: str) -> list[str]:
    """Options a command needs before it would run (so the bound, not a missing option, fails)."""
    return {"train": ["--images", "x", "--token", "<t>", "--class-word", "c", "--out", "o"],
            "layout fit": ["--out", "o"], "layout world-data": ["--out", "o"], "eval": ["--out", "o"],
            "world train": ["--run-dir", "r"], "world curve": ["--run-dir", "r"],
            "world judge-train": ["--out", "o"]}.get(command, [])


def test_seed_bound_matches_core():
    from compinv_rt.core.schemas import SEED_MAX

    assert option_bounds.SEED_MAX == SEED_MAX
