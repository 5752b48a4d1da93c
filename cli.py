"""Thin shim: `python cli.py ...` is the same as `compinv-rt ...`."""

from compinv_rt.apps.cli import main

if __name__ == "__main__":
    main()
