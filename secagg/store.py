"""Small durable-file helpers: atomic replace and length-prefixed ciphertext files.

Durability rule of the aggregator: a thing counts as stored only after its bytes were fsynced
under a temporary name and renamed into place, and the directory was fsynced. A crash at any point
leaves either the old or the new version, never a torn one.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from secagg.errors import SecAggError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


class BlobWriter:
    """Appends length-prefixed blobs after a JSON header; :meth:`commit` makes the file durable."""

    def __init__(self, tmp_path: Path, header: dict) -> None:
        self.tmp_path = tmp_path
        self._f = open(tmp_path, "wb")
        head = json.dumps(header, sort_keys=True).encode()
        self._f.write(struct.pack(">I", len(head)) + head)

    def write(self, blobs: Iterable[bytes]) -> None:
        for b in blobs:
            self._f.write(struct.pack(">I", len(b)))
            self._f.write(b)

    def commit(self, final_path: Path) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, final_path)
        fsync_dir(final_path.parent)

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp_path.unlink(missing_ok=True)


def read_blob_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack(">I", f.read(4))
        return json.loads(f.read(n))


def iter_blobs(path: Path) -> Iterator[bytes]:
    """The blobs of a file written by :class:`BlobWriter`, read lazily (O(one blob) memory)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack(">I", f.read(4))
        f.seek(4 + n)
        while True:
            prefix = f.read(4)
            if not prefix:
                return
            if len(prefix) != 4:
                raise SecAggError(f"{path} is truncated; the state directory was damaged outside the aggregator")
            (size,) = struct.unpack(">I", prefix)
            blob = f.read(size)
            if len(blob) != size:
                raise SecAggError(f"{path} is truncated; the state directory was damaged outside the aggregator")
            yield blob
