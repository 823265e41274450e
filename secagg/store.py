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
    """Appends length-prefixed blobs after a JSON header; :meth:`commit` makes the file durable.

    A blob may be given in parts (e.g. a polynomial and its seed): they are written with one
    ``writev`` each, straight from the caller's buffers, so an update is copied only into the page
    cache (joining them in Python cost a copy of every update).
    """

    def __init__(self, tmp_path: Path, header: dict) -> None:
        self.tmp_path = tmp_path
        self._f = open(tmp_path, "wb", buffering=0)
        head = json.dumps(header, sort_keys=True).encode()
        self._writev([struct.pack(">I", len(head)), head])

    def write(self, blobs: Iterable[bytes | tuple[bytes, ...]]) -> None:
        """Append each blob; a tuple is one blob made of its parts, in order."""
        for blob in blobs:
            parts = blob if isinstance(blob, tuple) else (blob,)
            self._writev([struct.pack(">I", sum(len(p) for p in parts)), *parts])

    def _writev(self, parts: list) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            done = os.writev(self._f.fileno(), views)
            while views and done >= len(views[0]):  # a short write (a signal, a full disk): write the rest
                done -= len(views[0])
                views.pop(0)
            if views:
                views[0] = views[0][done:]

    def sync(self) -> None:
        """Make the bytes written so far durable under the temporary name (rename it yourself)."""
        os.fsync(self._f.fileno())
        self._f.close()

    def commit(self, final_path: Path) -> None:
        self.sync()
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


def iter_blobs(path: Path, reuse: bool = False) -> Iterator[bytes | memoryview]:
    """The blobs of a file written by :class:`BlobWriter`, read lazily (O(one blob) memory).

    With ``reuse`` each blob is a memoryview of one buffer that the next blob overwrites: no
    allocation per blob, for callers that are done with a blob before asking for the next.
    """
    buffer = bytearray()
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
            if reuse:
                if len(buffer) < size:
                    buffer = bytearray(size)
                blob = memoryview(buffer)[:size]
                got = f.readinto(blob)
            else:
                blob = f.read(size)
                got = len(blob)
            if got != size:
                raise SecAggError(f"{path} is truncated; the state directory was damaged outside the aggregator")
            yield blob
