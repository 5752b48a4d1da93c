"""Writing results: atomic files (temp + rename), PNG + JSON sidecars, image grids."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path

from compinv_rt.core.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes files 0600


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later run remove temp files of a killed run, never a live one's.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj) -> str:
    """Valid JSON only: NaN/Infinity are refused (ValueError), never written."""
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json_text(obj))


def save_png(path, image) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Prove the folder can be created and written, before any heavy work, without creating it
    (a run that fails later must leave nothing behind): probe its nearest existing ancestor."""
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(f"{probe_dir} is a file")
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    return path


def slug(text: str, max_len: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:max_len].rstrip("-")) or "image"


def make_grid(images, cols: int | None = None, pad: int = 2):
    """Tile PIL images (same size) into one image, near-square by default."""
    from PIL import Image

    if not images:
        raise ValueError("no images to tile")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def image_metadata(prompt: str, negative_prompt: str, seed: int, settings: dict, model,
                   backend: str, **extra) -> dict:
    """The JSON sidecar of one generated image: enough to regenerate it exactly."""
    import platform
    from datetime import datetime, timezone

    from compinv_rt import __version__

    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "model": {"path": str(model.root), "hash": model.hash},
        "settings": settings,
        "backend": backend,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "compinv_rt": __version__,
        "python": platform.python_version(),
        **extra,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def disk_error(exc: OSError, kept: str) -> OutputError:
    """A write that failed for lack of space or permission, as one line saying what was kept."""
    where = f" {exc.filename}" if exc.filename else ""
    return OutputError(f"cannot write{where}: {exc.strerror or exc}; {kept}")


class FolderLock:
    """An exclusive lock on an output folder (`.compinv.lock`, flock): a second run on the same
    folder (two `--resume`s) is refused instead of redoing the same work. The kernel drops the
    lock when the process dies, so a killed run never blocks the next one."""

    NAME = ".compinv.lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"{self.path.parent} is in use by another compinv-rt run (pid "
                              f"{holder}); wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing releases the lock
            self.fd = None
        return False


def remove_if_empty(folder) -> None:
    """Remove a folder this run created if the run left nothing in it."""
    try:
        Path(folder).rmdir()
    except OSError:
        pass  # not empty, or already gone


def remove_stale_temp_files(folder: Path) -> int:
    """Temp files of atomic writes interrupted by a crash (`.name.PID.XXXX.tmp`) whose process is
    gone; a temp file of a run still writing here is kept."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        pid = p.name.split(".")[-3]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        p.unlink(missing_ok=True)
        n += 1
    return n
