"""Tools of the privacy audit tests (sections 1-3 of docs/privacy-audit.md).

* ``aggregator_process``: ``secagg serve`` as a child process whose stdout and stderr are kept in
  files, so a test can search everything the aggregator printed or logged.
* :class:`RecordingRelay`: a TCP relay on 127.0.0.1 that keeps every byte each side sent, so a test
  can search exactly what the aggregator received.
* :func:`read_process_memory`: the readable memory of a child process, through /proc/<pid>/mem.
* :func:`windows` and :func:`found`: byte-pattern search.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

SERVING = re.compile(rb"secagg: serving on (\S+)")


# -- a `secagg serve` subprocess whose output is kept ---------------------------------------------


class AggregatorProcess:
    """``secagg serve --key KEY --listen 127.0.0.1:0 --state-dir DIR``, stdout and stderr to files."""

    def __init__(self, key: Path, state_dir: Path, out_dir: Path, timeout: float = 60.0) -> None:
        self.state_dir = state_dir
        self.stdout_path = out_dir / "aggregator.stdout"
        self.stderr_path = out_dir / "aggregator.stderr"
        exe = Path(sys.executable).with_name("secagg")
        command = [str(exe)] if exe.exists() else [sys.executable, "-m", "secagg.cli"]
        command += ["serve", "--key", str(key), "--listen", "127.0.0.1:0", "--state-dir", str(state_dir)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # The console script is a Python script run by exec, so this pid is the aggregator itself.
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        self.address = ""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            m = SERVING.search(self.stderr_path.read_bytes())
            if m:
                self.address = m.group(1).decode()
                break
            time.sleep(0.05)
        if not self.address:
            self.kill()
            raise RuntimeError("secagg serve did not start:\n" + self.output().decode(errors="replace"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> bytes:
        """Everything the aggregator wrote to stdout and stderr so far."""
        return self.stdout_path.read_bytes() + self.stderr_path.read_bytes()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def aggregator_process(keypair, tmp_path):
    """``start(key=server.key)``: start ``secagg serve`` on a fresh state dir; killed afterwards."""
    started: list[AggregatorProcess] = []

    def start(key: Path | None = None) -> AggregatorProcess:
        n = len(started)
        out_dir = tmp_path / f"aggregator-{n}"
        out_dir.mkdir()
        p = AggregatorProcess(key or keypair.server, out_dir / "state", out_dir)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


# -- a recording TCP relay ------------------------------------------------------------------------


@dataclasses.dataclass
class RelayedConnection:
    """The bytes of one relayed TCP connection, in each direction."""

    upstream: bytearray = dataclasses.field(default_factory=bytearray)  # client -> aggregator
    downstream: bytearray = dataclasses.field(default_factory=bytearray)  # aggregator -> client


class RecordingRelay:
    """Listens on 127.0.0.1 and relays each connection to ``target`` ("host:port"), keeping every byte.

    With ``target=None`` it is a sink: it keeps what it is sent and forwards nothing. Bytes are
    recorded before they are forwarded, so once the far side has answered a request, the request
    is fully recorded.
    """

    def __init__(self, target: str | None) -> None:
        self.target = target
        self.connections: list[RelayedConnection] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def received(self, connections: Iterable[RelayedConnection] | None = None) -> bytes:
        """Everything clients sent (what the far side received), all connections in order."""
        with self._lock:
            return b"".join(bytes(c.upstream) for c in (self.connections if connections is None else connections))

    def sent(self) -> bytes:
        """Everything the far side sent back to clients."""
        with self._lock:
            return b"".join(bytes(c.downstream) for c in self.connections)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                _quietly(s.shutdown, socket.SHUT_RDWR)
                _quietly(s.close)

    def __enter__(self) -> "RecordingRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            record = RelayedConnection()
            upstream = None
            if self.target is not None:
                host, _, port = self.target.rpartition(":")
                upstream = socket.create_connection((host, int(port)))
            with self._lock:
                self.connections.append(record)
                self._sockets += [s for s in (client, upstream) if s is not None]
            threading.Thread(target=self._pump, args=(client, upstream, record.upstream), daemon=True).start()
            if upstream is not None:
                threading.Thread(target=self._pump, args=(upstream, client, record.downstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket | None, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    buf += data
                if dst is not None:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if dst is not None:
                _quietly(dst.shutdown, socket.SHUT_WR)


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except OSError:
        pass


# -- searching bytes --------------------------------------------------------------------------------


def windows(data: bytes, size: int, count: int, start: int = 0, end: int | None = None) -> list[bytes]:
    """``count`` windows of ``size`` bytes spread evenly over ``data[start:end]``."""
    end = len(data) if end is None else end
    step = (end - start - size) // max(count - 1, 1)
    return [data[start + i * step : start + i * step + size] for i in range(count)]


def found(patterns: Mapping[str, bytes], haystack: bytes) -> list[str]:
    """The labels of the patterns that occur in ``haystack``."""
    return [label for label, pattern in patterns.items() if pattern in haystack]


def read_process_memory(pid: int, chunk: int = 64 << 20) -> Iterator[bytes]:
    """The readable memory of process ``pid``, as runs of contiguous memory.

    Pages that are all zeros are left out (most of a process's mappings are reserved but untouched);
    no pattern searched for here can lie in one. Raises PermissionError if the kernel refuses to let
    this process read the other's memory (ptrace access mode check).
    """
    with open(f"/proc/{pid}/maps") as f:
        regions = []
        for line in f:
            fields = line.split()
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if fields[1].startswith("r") and name not in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                regions.append((start, stop))
    page = 4096
    run: list[bytes] = []  # the contiguous run being collected, and where it ends
    run_end = -1
    readable = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, stop in regions:
            for pos in range(start, stop, chunk):
                try:
                    mem.seek(pos)
                    data = mem.read(min(chunk, stop - pos))
                except OSError:
                    data = b""
                if len(data) % page:
                    data = data[: len(data) - len(data) % page]
                readable += len(data)
                nonzero = np.frombuffer(data, dtype=np.uint64).reshape(-1, page // 8).any(axis=1)
                # Runs of non-zero pages: [first, last) page indices where the mask flips.
                edges = np.flatnonzero(np.diff(np.concatenate([[False], nonzero, [False]]).astype(np.int8)))
                for first, last in zip(edges[0::2], edges[1::2]):
                    at = pos + int(first) * page
                    if at != run_end and run:
                        yield b"".join(run)
                        run = []
                    run.append(data[int(first) * page : int(last) * page])
                    run_end = pos + int(last) * page
                if len(data) < min(chunk, stop - pos):
                    break  # the rest of this mapping cannot be read
    if run:
        yield b"".join(run)
    if readable == 0:
        raise PermissionError(f"no memory of process {pid} could be read through /proc/{pid}/mem")


def search_process_memory(pid: int, patterns: Mapping[str, bytes]) -> set[str]:
    """The labels of the patterns found anywhere in the readable memory of process ``pid``."""
    hits: set[str] = set()
    for piece in read_process_memory(pid):
        hits.update(found({k: v for k, v in patterns.items() if k not in hits}, piece))
    return hits
