"""What every Typer command of compinv-rt shares: error mapping and progress bars.
Standard library and typer only (imported by `compinv-rt --help`)."""

from __future__ import annotations

import functools
import sys
from typing import Any

import typer


def _flags_without_metavar() -> None:
    """typer 0.29 prints `<bool>` after flags that take no value (--resume, --help); show none."""
    option: Any = getattr(getattr(typer, "core", None), "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(option, "_compinv_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and self.metavar is None else shown(self, ctx)

    option.display_type_rich = display_type_rich
    option._compinv_flags = True


_flags_without_metavar()


def typer_app(name: str, help: str) -> typer.Typer:
    """The project's CLI policy, for the app and every sub-app: help when called bare, no shell
    completion install, and no rich tracebacks (user errors are one line, see user_errors)."""
    return typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False)


def user_errors(fn):
    """Turn a CompinvError into one clear line on stderr and exit code 1. Bugs keep their traceback.
    Every numeric option is bounded first (apps/option_bounds.py): huge work is refused up front."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from compinv_rt.apps.option_bounds import check_command_options, command_id
        from compinv_rt.core.errors import CompinvError

        try:
            check_command_options(command_id(fn), kwargs, _flags())
            return fn(*args, **kwargs)
        except CompinvError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _flags() -> dict[str, str]:
    """The running command's parameter names -> their flags as typed (`-n/--num-images`)."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    return {p.name: "/".join(p.opts) for p in ctx.command.params if p.name}


class _LogLines:
    """tqdm's output for a log file: each refresh becomes one plain line (no carriage returns)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


#: Seconds between progress lines when stderr is not a terminal (a background job's log).
LOG_PROGRESS_EVERY = 30.0


def progress(total: int, desc: str, unit: str = "step"):
    """A progress bar on a terminal; in a log (stderr redirected) one line every 30 s or so, the
    first after 30 s."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
    # delay: nothing for work that ends (or fails, leaving its one error line) within the interval
    return tqdm(total=total, desc=desc, unit=unit, file=_LogLines(sys.stderr), ncols=100,
                mininterval=LOG_PROGRESS_EVERY, delay=LOG_PROGRESS_EVERY, ascii=True)
