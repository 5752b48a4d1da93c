"""What every Typer command of compinv-rt shares: error mapping and progress bars.
Standard library and typer only (imported by `compinv-rt --help`)."""

from __future__ import annotations

import functools
import sys

import typer


def user_errors(fn):
    """Turn a CompinvError into one clear line on stderr and exit code 1. Bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from compinv_rt.errors import CompinvError

        try:
            return fn(*args, **kwargs)
        except CompinvError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def progress(total: int, desc: str, unit: str = "step"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None)  # disable=None: hidden when stderr is not a terminal
