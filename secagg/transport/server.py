"""The gRPC servicer: translates messages to and from the core (``secagg.rounds.Aggregator``)."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from secagg import keys
from secagg.envelope import MAX_MESSAGE_BYTES, Chunk, Header
from secagg.errors import EnvelopeError, PrivacyError, SecAggError
from secagg.packing import ModelSpec
from secagg.privacy.mechanism import DPConfig
from secagg.rounds import DEFAULT_MAX_WEIGHT, DEFAULT_VALUE_BOUND, Aggregator, RoundConfig, RoundStatus
from secagg.transport import secagg_pb2 as pb
from secagg.transport import secagg_pb2_grpc as pb_grpc
from secagg.transport.auth import Authorizer
from secagg.transport.status import abort
from secagg.transport.tls import ServerTLS

log = logging.getLogger("secagg.server")
MAX_FETCH_WAIT = 30.0


def status_to_pb(s: RoundStatus, spec: ModelSpec) -> pb.RoundStatus:
    return pb.RoundStatus(
        round_id=s.round_id, state=s.state, submitted=s.submitted, expected=s.expected, min_clients=s.min_clients,
        clients=list(s.clients), deadline_unix=s.deadline_unix or 0.0, spec_hash=s.spec_hash, key_id=s.key_id,
        max_weight=s.max_weight, value_bound=s.value_bound, num_params=s.num_params, reason=s.reason,
        model_spec_json=spec.to_json(), dp_json=json.dumps(s.dp) if s.dp else "", enrolled=list(s.enrolled),
        epsilon_round=s.epsilon_round, epsilon_spent=s.epsilon_spent, epsilon_budget=s.epsilon_budget or 0.0,
        delta=s.delta or 0.0, min_cohort=s.min_cohort,
    )


def _dp_from_json(text: str) -> DPConfig | None:
    if not text:
        return None
    try:
        return DPConfig.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError) as exc:
        raise PrivacyError(f"the round's DP settings are not valid JSON of a DPConfig ({exc}); use the secagg client") from None


def chunk_to_pb(c: Chunk) -> pb.Chunk:
    return pb.Chunk(index=c.index, ciphertexts=list(c.ciphertexts), sha256=c.sha256)


def chunk_from_pb(c: pb.Chunk) -> Chunk:
    return Chunk(c.index, tuple(c.ciphertexts), c.sha256)


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """Every method: check the caller, parse the request, call the core, map :class:`SecAggError` to a status."""

    def __init__(self, core: Aggregator, auth: Authorizer | None = None) -> None:
        self.core = core
        self.auth = auth or Authorizer(enforce=False)

    def GetServerInfo(self, request, context):
        try:
            self.auth.caller(context)
        except SecAggError as exc:
            abort(context, exc)
        return pb.ServerInfo(
            key_id=self.core.key.key_id, poly_modulus_degree=keys.POLY_MODULUS_DEGREE,
            coeff_modulus_bits=list(keys.COEFF_MODULUS_BITS), scale_bits=keys.SCALE_BITS, format_version=1,
        )

    def CreateRound(self, request, context):
        try:
            self.auth.check_admin(context, "create rounds")
            spec = ModelSpec.from_json(request.model_spec_json)
            config = RoundConfig(
                round_id=request.round_id, spec=spec, expected_clients=request.expected_clients,
                min_clients=request.min_clients or request.expected_clients,
                deadline_unix=(self.core.clock() + request.deadline_seconds) if request.deadline_seconds > 0 else None,
                max_weight=request.max_weight or DEFAULT_MAX_WEIGHT, value_bound=request.value_bound or DEFAULT_VALUE_BOUND,
                dp=_dp_from_json(request.dp_json), enrolled=tuple(request.enrolled),
            )
            return status_to_pb(self.core.create_round(config), spec)
        except SecAggError as exc:
            abort(context, exc)

    def GetRound(self, request, context):
        try:
            self.auth.caller(context)
            return status_to_pb(self.core.status(request.round_id), self.core.round_config(request.round_id).spec)
        except SecAggError as exc:
            abort(context, exc)

    def Submit(self, request_iterator, context):
        try:
            self.auth.caller(context)  # before reading anything of the update
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise EnvelopeError("an update must start with its header; use the secagg client to submit")
            h = first.header
            header = Header(h.round_id, h.client_id, h.key_id, h.spec_hash, h.num_ciphertexts, h.num_chunks,
                            h.digest, h.format_version)
            # Before any chunk is read: an update claiming another client's id is refused unread.
            self.auth.check_submitter(context, header.client_id)
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
            self.auth.caller(context)
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
    """A running aggregator: gRPC server plus the deadline ticker. Use :func:`secagg.serve`.

    Without mutual TLS (``tls`` with a ``ca``) nobody's identity is checked, so that is allowed only
    on a loopback address, or anywhere with ``insecure=True``.
    """

    def __init__(self, core: Aggregator, listen: str, tls: ServerTLS | None = None, insecure: bool = False,
                 max_workers: int = 16) -> None:
        self.core = core
        host = listen.rsplit(":", 1)[0]
        exposure = _check_exposure(listen, host, tls, insecure)
        credentials = tls.credentials() if tls is not None else None  # bad files fail here, before binding
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
        self.mutual_tls = tls is not None and tls.mutual
        pb_grpc.add_AggregatorServicer_to_server(AggregatorServicer(core, Authorizer(self.mutual_tls)), self._grpc)
        if _port_taken(listen):
            raise SecAggError(f"cannot listen on {listen}: the port is taken; stop the other server or pick another port")
        try:
            if credentials is None:
                port = self._grpc.add_insecure_port(listen)
            else:
                port = self._grpc.add_secure_port(listen, credentials)
        except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
            port = 0
        if port == 0:
            raise SecAggError(f"cannot listen on {listen}: the address is invalid or the port is taken")
        self.address = f"{host}:{port}"
        self._tls = tls is not None
        if exposure:  # only once bound: a server that failed to start warns about nothing
            log.warning("listening on %s %s", self.address, exposure)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="secagg-deadlines", daemon=True)

    def start(self) -> "Server":
        self._grpc.start()
        self._ticker.start()
        security = "mutual TLS" if self.mutual_tls else "TLS" if self._tls else "no TLS"
        log.info("aggregator listening on %s (key %s, %s)", self.address, self.core.key.key_id, security)
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


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); an empty host binds every address."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def _check_exposure(listen: str, host: str, tls: ServerTLS | None, insecure: bool) -> str:
    """Refuse to serve other machines without credentials, unless the operator said so explicitly.

    Returns the warning to log once the server is bound ("" with mutual TLS).
    """
    if tls is not None and tls.mutual:
        return ""
    lacking = ("without TLS: updates are encrypted, but round metadata is not, and anyone who can connect may "
               "create rounds and submit as any client") if tls is None else (
               "with TLS but no client certificates (--tls-ca): the channel is protected, but anyone who can "
               "connect may create rounds and submit as any client")
    if is_loopback(host):
        return f"{lacking} (development only)"
    if insecure:
        return f"{lacking} (--insecure)"
    raise SecAggError(
        f"refusing to listen on {listen} {lacking}; give --tls-cert, --tls-key and --tls-ca (create them with "
        "'secagg certs'), or --insecure to accept this"
    )


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
