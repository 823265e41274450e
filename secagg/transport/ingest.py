"""Ingest worker processes: uploads received, checked and written to disk in processes of their own.

In one process, uploads share one GIL and grpcio's one polling thread, which turns every received
message into Python bytes; hashing, writing and adding release the GIL, so one aggregator process
already keeps about 1.2 cores busy when its disk keeps up (benchmarks/README.md, load). With
``secagg serve --ingest-workers N`` the aggregator starts N worker processes. Each serves
``Submit`` on a port of its own (same host, same TLS settings, listed in ``ServerInfo.ingest_ports``;
the secagg client uses one of them) and does what costs the CPU: receiving, the envelope checks,
SHA-256 and the durable write. The aggregator keeps what must happen in one place, over a private
Unix socket: ``Begin`` checks the header (round, enrollment, signature, resends) and names the file
to write; ``Commit`` range-checks and adds the written update to the round's sum under its lock and
makes it count. The worker is part of the aggregator (same trust, same files); nothing a client
checks changes. A worker that dies takes its uploads with it: their clients resend (to the
aggregator's own port, which keeps serving ``Submit``).

Run by the aggregator: ``python -m secagg.transport.ingest --socket PATH --listen HOST:0 ...``; it
prints ``ingest worker: serving on HOST:PORT`` on stdout once it accepts uploads.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from secagg.envelope import Chunk, Header
from secagg.errors import SecAggError
from secagg.polys import c0_bytes
from secagg.rounds import Aggregator, SubmitResult, ingest_update
from secagg.transport import secagg_pb2 as pb
from secagg.transport.admission import Admission, Limits
from secagg.transport.auth import Authorizer
from secagg.transport.server import _bind, _grpc_server, header_from_pb, header_to_pb, submit_only_handlers
from secagg.transport.status import abort, error_from_rpc
from secagg.transport.tls import ServerTLS

log = logging.getLogger("secagg.ingest")
SERVICE = "secagg.internal.Ingest"
_READY = "ingest worker: serving on "


def _header_bytes(header: Header) -> str:
    return base64.b64encode(header_to_pb(header).SerializeToString()).decode()


def _header(text: str) -> Header:
    return header_from_pb(pb.UpdateHeader.FromString(base64.b64decode(text)))


# -- the aggregator's side ------------------------------------------------------------------------


class IngestService:
    """What the workers ask of the aggregator's core, over its Unix socket (JSON in, JSON out)."""

    def __init__(self, core: Aggregator, metrics) -> None:
        self.core = core
        self.metrics = metrics

    def handlers(self) -> grpc.GenericRpcHandler:
        def unary(fn):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=None, response_serializer=None)

        return grpc.method_handlers_generic_handler(SERVICE, {"Begin": unary(self._begin), "Commit": unary(self._commit)})

    def _begin(self, request: bytes, context) -> bytes:
        try:
            part, resent = self.core.begin_upload(_header(json.loads(request)["header"]))
        except SecAggError as exc:
            self.metrics.refused.labels(self.metrics.reason(exc)).inc()
            abort(context, exc)
        if resent is not None:
            self.metrics.resent.inc()
            return json.dumps({"resent": _result_dict(resent)}).encode()
        return json.dumps({"part": str(part)}).encode()

    def _commit(self, request: bytes, context) -> bytes:
        msg = json.loads(request)
        try:
            result = self.core.commit_upload(_header(msg["header"]), Path(msg["part"]))
        except SecAggError as exc:
            self.metrics.refused.labels(self.metrics.reason(exc)).inc()
            abort(context, exc)
        (self.metrics.resent if result.already_accepted else self.metrics.accepted).inc()
        return json.dumps(_result_dict(result)).encode()


def _result_dict(r: SubmitResult) -> dict:
    return {"round_id": r.round_id, "client_id": r.client_id, "submitted": r.submitted,
            "already_accepted": r.already_accepted}


class WorkerPool:
    """The aggregator's ingest workers and the Unix socket they reach its core through."""

    def __init__(self, core: Aggregator, metrics, count: int, host: str, tls: ServerTLS | None,
                 limits: Limits) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="secagg-ingest-"))  # mode 0700: only the aggregator's user
        self.socket = self._dir / "core.sock"
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.max_uploads * 2 + 4))
        self._server.add_generic_rpc_handlers((IngestService(core, metrics).handlers(),))
        self._server.add_insecure_port(f"unix:{self.socket}")
        self._server.start()
        per_worker = Limits(max(1, -(-limits.max_uploads // count)), limits.max_waits, limits.per_client,
                            limits.idle_seconds)
        argv = [sys.executable, "-m", "secagg.transport.ingest", "--socket", str(self.socket),
                "--listen", f"{host}:0", "--c0-bytes", str(c0_bytes(core.key.parameters)),
                "--parent", str(os.getpid()), "--max-uploads", str(per_worker.max_uploads),
                "--per-client", str(per_worker.per_client), "--idle-seconds", str(per_worker.idle_seconds)]
        if tls is not None:
            argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
            if tls.ca is not None:
                argv += ["--tls-ca", str(tls.ca)]
        self._procs: list[subprocess.Popen] = []
        self._ports: dict[int, int] = {}
        try:
            for _ in range(count):
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
                self._procs.append(proc)
                line = proc.stdout.readline()
                if not line.startswith(_READY):
                    raise SecAggError(f"an ingest worker did not start (exit code {proc.wait()}); see its error above")
                self._ports[proc.pid] = int(line.strip().rsplit(":", 1)[1])
        except BaseException:
            self.stop()
            raise

    @property
    def ports(self) -> list[int]:
        """The ports of the workers that are running."""
        return [self._ports[p.pid] for p in self._procs if p.poll() is None and p.pid in self._ports]

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._server.stop(0).wait()
        self.socket.unlink(missing_ok=True)
        self._dir.rmdir()


# -- the worker's side ----------------------------------------------------------------------------


class _RemoteCore:
    """``submit`` as the core does it, with the header check and the commit done by the aggregator."""

    def __init__(self, socket: str, c0_bytes: int) -> None:
        self._channel = grpc.insecure_channel(f"unix:{socket}")
        self.c0_bytes = c0_bytes

    def _call(self, method: str, payload: dict) -> dict:
        try:
            reply = self._channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=None,
                                              response_deserializer=None)(json.dumps(payload).encode(), timeout=600)
        except grpc.RpcError as err:
            raise error_from_rpc(err, "the aggregator's core") from None
        return json.loads(reply)

    def submit(self, header: Header, chunks: Iterator[Chunk]) -> SubmitResult:
        encoded = _header_bytes(header)

        def begin(_: Header) -> tuple[Path | None, SubmitResult | None]:
            began = self._call("Begin", {"header": encoded})
            return (None, SubmitResult(**began["resent"])) if "resent" in began else (Path(began["part"]), None)

        def commit(_: Header, part: Path) -> SubmitResult:
            return SubmitResult(**self._call("Commit", {"header": encoded, "part": str(part)}))

        return ingest_update(header, chunks, self.c0_bytes, begin, commit)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the aggregator dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    from secagg.metrics import Metrics
    from secagg.transport.allocator import tune_malloc

    p = argparse.ArgumentParser(description="secagg ingest worker (started by secagg serve --ingest-workers)")
    p.add_argument("--socket", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--c0-bytes", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--max-uploads", type=int, required=True)
    p.add_argument("--per-client", type=int, required=True)
    p.add_argument("--idle-seconds", type=float, required=True)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    args = p.parse_args(argv)
    _die_with_parent(args.parent)
    tune_malloc()
    tls = ServerTLS(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca) if args.tls_ca else None) \
        if args.tls_cert else None
    limits = Limits(args.max_uploads, 1, args.per_client, args.idle_seconds)
    admission = Admission(limits)
    server = _grpc_server(limits.workers)
    server.add_generic_rpc_handlers((submit_only_handlers(_RemoteCore(args.socket, args.c0_bytes),
                                                          Authorizer(tls is not None and tls.mutual), Metrics(),
                                                          admission),))
    port = _bind(server, args.listen, tls.credentials() if tls is not None else None)
    server.start()
    print(f"{_READY}{args.listen.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.stop(1.0).wait()
    admission.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
