"""The gRPC servicer: translates messages to and from the core (``secagg.rounds.Aggregator``)."""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from secagg import keys
from secagg.envelope import MAX_MESSAGE_BYTES, Chunk, Header
from secagg.errors import EnvelopeError, SecAggError
from secagg.packing import ModelSpec
from secagg.rounds import DEFAULT_MAX_WEIGHT, DEFAULT_VALUE_BOUND, Aggregator, RoundConfig, RoundStatus
from secagg.transport import secagg_pb2 as pb
from secagg.transport import secagg_pb2_grpc as pb_grpc
from secagg.transport.status import abort

log = logging.getLogger("secagg.server")
MAX_FETCH_WAIT = 30.0


def status_to_pb(s: RoundStatus, spec: ModelSpec) -> pb.RoundStatus:
    return pb.RoundStatus(
        round_id=s.round_id, state=s.state, submitted=s.submitted, expected=s.expected, min_clients=s.min_clients,
        clients=list(s.clients), deadline_unix=s.deadline_unix or 0.0, spec_hash=s.spec_hash, key_id=s.key_id,
        max_weight=s.max_weight, value_bound=s.value_bound, num_params=s.num_params, reason=s.reason,
        model_spec_json=spec.to_json(),
    )


def chunk_to_pb(c: Chunk) -> pb.Chunk:
    return pb.Chunk(index=c.index, ciphertexts=list(c.ciphertexts), sha256=c.sha256)


def chunk_from_pb(c: pb.Chunk) -> Chunk:
    return Chunk(c.index, tuple(c.ciphertexts), c.sha256)


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """Every method: parse the request, call the core, map :class:`SecAggError` to a status."""

    def __init__(self, core: Aggregator) -> None:
        self.core = core

    def GetServerInfo(self, request, context):
        return pb.ServerInfo(
            key_id=self.core.key.key_id, poly_modulus_degree=keys.POLY_MODULUS_DEGREE,
            coeff_modulus_bits=list(keys.COEFF_MODULUS_BITS), scale_bits=keys.SCALE_BITS, format_version=1,
        )

    def CreateRound(self, request, context):
        try:
            spec = ModelSpec.from_json(request.model_spec_json)
            config = RoundConfig(
                round_id=request.round_id, spec=spec, expected_clients=request.expected_clients,
                min_clients=request.min_clients or request.expected_clients,
                deadline_unix=(self.core.clock() + request.deadline_seconds) if request.deadline_seconds > 0 else None,
                max_weight=request.max_weight or DEFAULT_MAX_WEIGHT, value_bound=request.value_bound or DEFAULT_VALUE_BOUND,
            )
            return status_to_pb(self.core.create_round(config), spec)
        except SecAggError as exc:
            abort(context, exc)

    def GetRound(self, request, context):
        try:
            return status_to_pb(self.core.status(request.round_id), self.core.round_config(request.round_id).spec)
        except SecAggError as exc:
            abort(context, exc)

    def Submit(self, request_iterator, context):
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise EnvelopeError("an update must start with its header; use the secagg client to submit")
            h = first.header
            header = Header(h.round_id, h.client_id, h.key_id, h.spec_hash, h.num_ciphertexts, h.num_chunks,
                            h.digest, h.format_version)
            result = self.core.submit(header, self._chunks(request_iterator))
            return pb.SubmitReply(round_id=result.round_id, client_id=result.client_id, submitted=result.submitted,
                                  already_accepted=result.already_accepted)
        except SecAggError as exc:
            log.info("update refused: %s", exc)
            abort(context, exc)

    @staticmethod
    def _chunks(messages) -> Iterator[Chunk]:
        for msg in messages:
            if msg.WhichOneof("kind") != "chunk":
                raise EnvelopeError("a second header arrived inside an update; send one update per call")
            yield chunk_from_pb(msg.chunk)

    def FetchAggregate(self, request, context):
        try:
            agg = self.core.aggregate(request.round_id, wait=min(max(request.wait_seconds, 0.0), MAX_FETCH_WAIT))
        except SecAggError as exc:
            abort(context, exc)
            return
        h = agg.header
        yield pb.AggregateMessage(header=pb.AggregateHeader(
            round_id=h.round_id, key_id=h.key_id, spec_hash=h.spec_hash, contributions=agg.contributions,
            clients=list(agg.clients), num_ciphertexts=h.num_ciphertexts, num_chunks=h.num_chunks, digest=h.digest,
        ))
        for chunk in agg.chunks():
            yield pb.AggregateMessage(chunk=chunk_to_pb(chunk))


class Server:
    """A running aggregator: gRPC server plus the deadline ticker. Use :func:`secagg.serve`."""

    def __init__(self, core: Aggregator, listen: str, max_workers: int = 16) -> None:
        self.core = core
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     # Clients ping every 30 s during long streams; allow it.
                     ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                     # gRPC sets SO_REUSEPORT by default, so a second aggregator could bind a port
                     # that one already serves and the kernel would split clients between the two.
                     ("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_AggregatorServicer_to_server(AggregatorServicer(core), self._grpc)
        host = listen.rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            log.warning("listening on %s without TLS: updates are encrypted, but round metadata is not", listen)
        if _port_taken(listen):
            raise SecAggError(f"cannot listen on {listen}: the port is taken; stop the other server or pick another port")
        try:
            port = self._grpc.add_insecure_port(listen)
        except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
            port = 0
        if port == 0:
            raise SecAggError(f"cannot listen on {listen}: the address is invalid or the port is taken")
        self.address = f"{host}:{port}"
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="secagg-deadlines", daemon=True)

    def start(self) -> "Server":
        self._grpc.start()
        self._ticker.start()
        log.info("aggregator listening on %s (key %s)", self.address, self.core.key.key_id)
        return self

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.core.tick()
            except Exception:  # a failing tick must not kill the ticker; it is logged and retried
                log.exception("deadline check failed")

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; in-flight calls get ``grace`` seconds."""
        self._stop.set()
        self._grpc.stop(grace).wait()

    def wait(self) -> None:
        """Block until the server stops."""
        self._grpc.wait_for_termination()


def _port_taken(listen: str) -> bool:
    """True if something already listens on ``listen``. Checked before gRPC binds because gRPC logs
    its own multi-line error to stderr when binding fails."""
    host, _, port = listen.rpartition(":")
    try:
        number = int(port)
        infos = socket.getaddrinfo(host.strip("[]") or None, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, OSError):
        return False  # an invalid address: gRPC reports it
    for family, kind, proto, _, addr in infos if number else ():
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            try:
                probe.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False
