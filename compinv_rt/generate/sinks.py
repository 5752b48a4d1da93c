"""Where batch outputs go: a local folder (atomic temp + rename) or any filesystem URI that
pyarrow understands (s3://, gs://, hdfs://, file://), so Ray workers on many machines can share
one output location. Every file is written whole under a temp name and then moved into place."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

from compinv_rt.core.errors import OutputError
from compinv_rt.core.outputs import atomic_write_bytes, check_writable_dir, remove_stale_temp_files


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()


class LocalSink:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def prepare(self) -> "LocalSink":
        check_writable_dir(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.root)  # left by a crashed run
        return self

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.root / name, data)

    def write_png(self, name: str, image) -> None:
        self.write(name, _png_bytes(image))

    def write_json(self, name: str, obj) -> None:
        self.write(name, _json_bytes(obj))


class ArrowSink(LocalSink):
    """A pyarrow filesystem location. Object stores make each PUT atomic; the temp-then-move
    keeps the same 'a file is whole or absent' rule on file systems that are not."""

    def __init__(self, uri: str):
        from pyarrow import fs

        try:
            self.fs, self.path = fs.FileSystem.from_uri(uri)
        except Exception as exc:
            raise OutputError(f"cannot open output location {uri}: {str(exc).splitlines()[0]}") from None
        self.uri = uri

    def prepare(self) -> "ArrowSink":
        try:
            self.fs.create_dir(self.path, recursive=True)
            self.write(f".probe-{uuid.uuid4().hex}", b"")
        except OSError as exc:
            raise OutputError(f"cannot write to {self.uri}: {exc}") from None
        for name in self.names():
            if name.startswith(".") and (name.endswith(".tmp") or name.startswith(".probe-")):
                self.fs.delete_file(f"{self.path}/{name}")
        return self

    def exists(self, name: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(f"{self.path}/{name}").type != fs.FileType.NotFound

    def names(self) -> list[str]:
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.path, allow_not_found=True))
        return sorted(Path(i.path).name for i in infos)

    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(f"{self.path}/{name}") as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        tmp = f"{self.path}/.{name}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, f"{self.path}/{name}")


def open_sink(location: str | Path):
    """A URI with a scheme -> ArrowSink; anything else is a local folder."""
    text = str(location)
    if "://" in text:
        return ArrowSink(text)
    return LocalSink(text)
