"""The gRPC servicer: translates messages to and from the core (``secagg.rounds.Aggregator``).

:class:`Server` also carries the operations surface: gRPC health checking and server reflection on
the aggregator's port, optionally a plaintext health-only port (``health_listen``) for probes that
cannot present a client certificate, and Prometheus metrics over HTTP.
"""

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
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from secagg import keys
from secagg.contribution import Contribution
from secagg.envelope import FORMAT_VERSION, MAX_MESSAGE_BYTES, Chunk, Header, check_id
from secagg.errors import EnvelopeError, MaskingError, PrivacyError, SecAggError, TransportError
from secagg.masking.settings import MaskSettings
from secagg.metrics import Metrics, MetricsEndpoint
from secagg.packing import ModelSpec
from secagg.privacy.mechanism import DPConfig
from secagg.rounds import (DEFAULT_MAX_WEIGHT, DEFAULT_VALUE_BOUND, Aggregate, Aggregator, RoundConfig, RoundStatus,
                           RoundSummary)
from secagg.transport import secagg_pb2 as pb
from secagg.transport import secagg_pb2_grpc as pb_grpc
from secagg.transport.admission import Admission, Limits
from secagg.transport.auth import Authorizer, Identity
from secagg.transport.status import abort
from secagg.transport.submit_wire import SubmitMessage, parse_submit_message
from secagg.transport.tls import ServerTLS

log = logging.getLogger("secagg.server")
MAX_FETCH_WAIT = 30.0
ADMITTED_KEY = "secagg-admitted"  # initial metadata of an upload the aggregator has admitted
AGGREGATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name  # "secagg.v1.Aggregator"


def status_to_pb(s: RoundStatus, spec: ModelSpec) -> pb.RoundStatus:
    return pb.RoundStatus(
        round_id=s.round_id, state=s.state, submitted=s.submitted, expected=s.expected, min_clients=s.min_clients,
        clients=list(s.clients), deadline_unix=s.deadline_unix or 0.0, spec_hash=s.spec_hash, key_id=s.key_id,
        max_weight=s.max_weight, value_bound=s.value_bound, num_params=s.num_params, reason=s.reason,
        model_spec_json=spec.to_json(), dp_json=json.dumps(s.dp) if s.dp else "", enrolled=list(s.enrolled),
        epsilon_round=s.epsilon_round, epsilon_spent=s.epsilon_spent, epsilon_budget=s.epsilon_budget or 0.0,
        delta=s.delta or 0.0, min_cohort=s.min_cohort, release_grid=s.release_grid,
        release_precision=s.release_precision, masking_json=json.dumps(s.masking) if s.masking else "",
        stage=s.stage,
    )


def summary_to_pb(s: RoundSummary) -> pb.RoundSummary:
    return pb.RoundSummary(round_id=s.round_id, state=s.state, submitted=s.submitted, expected=s.expected,
                           created_unix=s.created_unix or 0.0, reason=s.reason)


def _dp_from_json(text: str) -> DPConfig | None:
    if not text:
        return None
    try:
        return DPConfig.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise PrivacyError(f"the round's DP settings are not valid JSON of a DPConfig ({exc}); use the secagg client") from None


def _masking_from_json(text: str) -> dict | None:
    if not text:
        return None
    try:
        return MaskSettings.from_dict(_json_object(text, "masking settings")).to_dict()
    except RecursionError:
        raise MaskingError("the round's masking settings are not valid JSON; use the secagg client") from None


def _json_object(text: str, what: str) -> dict:
    """A JSON object from a request field; anything else (or absurd nesting) is a clear error."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MaskingError(f"the {what} are not valid JSON ({type(exc).__name__}); use the secagg client") from None
    if not isinstance(value, dict):
        raise MaskingError(f"the {what} must be a JSON object; use the secagg client")
    return value


def chunk_to_pb(c: Chunk) -> pb.Chunk:
    return pb.Chunk(index=c.index, c0=list(c.c0s), seeds=list(c.seeds), digest=c.digest)


def chunk_from_pb(c: pb.Chunk) -> Chunk:
    return Chunk(c.index, tuple(c.c0), tuple(c.seeds), c.digest)


def record_to_pb(r: Contribution) -> pb.ContributionRecord:
    return pb.ContributionRecord(client_id=r.client_id, digest=r.digest, seeds_digest=r.seeds_digest, tag=r.tag,
                                 certificate=r.certificate, signature=r.signature)


def record_from_pb(r: pb.ContributionRecord) -> Contribution:
    return Contribution(r.client_id, r.digest, r.seeds_digest, r.tag, r.certificate, r.signature)


def header_to_pb(h: Header) -> pb.UpdateHeader:
    return pb.UpdateHeader(format_version=h.format_version, round_id=h.round_id, client_id=h.client_id,
                           key_id=h.key_id, spec_hash=h.spec_hash, num_ciphertexts=h.num_ciphertexts,
                           num_chunks=h.num_chunks, digest=h.digest, contribution=record_to_pb(h.contribution))


def aggregate_header_to_pb(agg: Aggregate) -> pb.AggregateHeader:
    """What precedes a served sum's chunks: the round, key, spec, every contributor's record."""
    h = agg.header
    return pb.AggregateHeader(
        round_id=h.round_id, key_id=h.key_id, spec_hash=h.spec_hash, contributions=agg.contributions,
        clients=list(agg.clients), num_ciphertexts=h.num_ciphertexts, num_chunks=h.num_chunks, digest=h.digest,
        records=[record_to_pb(r) for r in agg.records],
    )


def header_from_pb(h: pb.UpdateHeader) -> Header:
    return Header(h.round_id, h.client_id, h.key_id, h.spec_hash, h.num_ciphertexts, h.num_chunks, h.digest,
                  record_from_pb(h.contribution) if h.HasField("contribution") else None, h.format_version)


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """Every method: check the caller, parse the request, call the core, map :class:`SecAggError` to a status."""

    def __init__(self, core: Aggregator, auth: Authorizer | None = None, metrics: Metrics | None = None,
                 admission: Admission | None = None, ingest_ports=lambda: ()) -> None:
        self.core = core
        self.auth = auth or Authorizer(enforce=False)
        self.metrics = metrics or Metrics()
        self.admission = admission or Admission(Limits())
        self.ingest_ports = ingest_ports  # () -> the running ingest workers' ports

    def _identify(self, context) -> tuple[Identity | None, str | None]:
        """The verified caller and the name its calls are counted under; (None, None) without mutual TLS.

        Without mutual TLS nothing identifies a client (sites behind one NAT, or every local process,
        share an address), so only the global limits apply there.
        """
        who = self.auth.caller(context)
        return who, who.name if who is not None else None

    def GetServerInfo(self, request, context):
        try:
            self.auth.caller(context)
        except SecAggError as exc:
            abort(context, exc)
        return pb.ServerInfo(
            key_id=self.core.key.key_id, poly_modulus_degree=keys.POLY_MODULUS_DEGREE,
            coeff_modulus_bits=list(keys.COEFF_MODULUS_BITS), scale_bits=keys.SCALE_BITS, format_version=FORMAT_VERSION,
            ingest_ports=list(self.ingest_ports()),
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
                masking=_masking_from_json(request.masking_json),
            )
            return status_to_pb(self.core.create_round(config), spec)
        except SecAggError as exc:
            abort(context, exc)

    def GetRound(self, request, context):
        try:
            self.auth.caller(context)
            return status_to_pb(self.core.status(request.round_id), self.core.round_spec(request.round_id))
        except SecAggError as exc:
            abort(context, exc)

    def CancelRound(self, request, context):
        try:
            who = self.auth.check_admin(context, "cancel rounds")
            status = self.core.cancel_round(request.round_id, request.reason, by=who.name if who else None)
            return status_to_pb(status, self.core.round_spec(request.round_id))
        except SecAggError as exc:
            abort(context, exc)

    def ListRounds(self, request, context):
        try:
            self.auth.caller(context)
            return pb.RoundList(rounds=[summary_to_pb(s) for s in self.core.list_rounds()])
        except SecAggError as exc:
            abort(context, exc)

    def Submit(self, request_iterator, context):
        ids: dict[str, str] = {}
        slot = None
        try:
            _, name = self._identify(context)  # before reading anything of the update
            slot = self.admission.upload(name, context, request_iterator)
            with slot:
                # Admitted: tell the client at once (it sends its chunks only then; secagg.transport.client).
                context.send_initial_metadata(((ADMITTED_KEY, "1"),))
                return self._submit(slot, context, ids)
        except SecAggError as exc:
            self.metrics.refused.labels(self.metrics.reason(exc)).inc()
            log.info("update refused: %s", exc, extra={**ids, "reason": type(exc).__name__})
            abort(context, exc)
        except grpc.RpcError:  # the client went away mid-stream, or the idle watchdog cancelled it
            self.metrics.refused.labels("idle" if slot is not None and slot.idle else TransportError.__name__).inc()
            raise
        except Exception:
            self.metrics.refused.labels("internal").inc()
            raise

    def _submit(self, slot, context, ids: dict[str, str]):
        messages = self._counted(slot.messages())
        first = next(messages, None)
        if first is None or first.header is None:
            raise EnvelopeError(first.error if first is not None and first.error else
                                "an update must start with its header; use the secagg client to submit")
        header = header_from_pb(first.header)
        ids.update(_log_ids(header))
        # Before any chunk is read: an update claiming another client's id is refused unread.
        self.auth.check_submitter(context, header.client_id)
        result = self.core.submit(header, self._chunks(messages, context))
        (self.metrics.resent if result.already_accepted else self.metrics.accepted).inc()
        return pb.SubmitReply(round_id=result.round_id, client_id=result.client_id, submitted=result.submitted,
                              already_accepted=result.already_accepted)

    def _counted(self, messages: Iterator[SubmitMessage]) -> Iterator[SubmitMessage]:
        for msg in messages:
            self.metrics.received_bytes.inc(msg.wire_bytes)
            yield msg

    @staticmethod
    def _chunks(messages: Iterator[SubmitMessage], context) -> Iterator[Chunk]:
        for msg in messages:
            if msg.error:
                raise EnvelopeError(msg.error)
            if msg.chunk is None:
                raise EnvelopeError("a second header arrived inside an update; send one update per call")
            yield msg.chunk
        # A call cancelled or broken mid-stream can end the request iterator quietly: the chunks
        # before that must not be accepted as a complete update. (A malformed message no longer
        # does: submit_wire hands it over with its reason, refused above.)
        if not context.is_active():
            raise EnvelopeError("the update's stream broke off at a message that could not be parsed; resend the "
                                "whole update with the secagg client")

    def MaskStage(self, request, context):
        try:
            who, name = self._identify(context)
            payload = _json_object(request.payload_json, "stage message") if request.payload_json else None
            with self.admission.wait(name):
                ready, view, stage = self.core.mask_stage(
                    request.round_id, request.client_id, request.stage, payload,
                    wait=min(max(request.wait_seconds, 0.0), MAX_FETCH_WAIT), caller=who.name if who is not None else None)
        except SecAggError as exc:
            abort(context, exc)
            return
        return pb.MaskReply(ready=ready, payload_json=json.dumps(view), stage=stage)

    def FetchAggregate(self, request, context):
        try:
            who, name = self._identify(context)
            slot = self.admission.wait(name)
        except SecAggError as exc:
            self.metrics.fetches_refused.labels(self.metrics.reason(exc)).inc()
            abort(context, exc)
            return
        with slot:  # held while the sum streams out: a client that stops reading holds one slot, not the server
            yield from self._fetch(request, context, who)

    def _fetch(self, request, context, who):
        try:
            agg = self.core.aggregate(request.round_id, wait=min(max(request.wait_seconds, 0.0), MAX_FETCH_WAIT),
                                      caller=who.name if who is not None and not who.is_admin else None)
        except SecAggError as exc:
            self.metrics.fetches_refused.labels(self.metrics.reason(exc)).inc()
            abort(context, exc)
            return
        yield pb.AggregateMessage(header=aggregate_header_to_pb(agg))
        for chunk in agg.chunks():
            yield pb.AggregateMessage(chunk=chunk_to_pb(chunk))
        self.metrics.fetches.inc()


def _log_ids(header: Header) -> dict[str, str]:
    """The update's round and client ids for log fields, if they are well-formed (a bad one is in the message)."""
    ids = {}
    for field, kind, value in (("round", "round", header.round_id), ("client", "client", header.client_id)):
        try:
            ids[field] = check_id(kind, value)
        except SecAggError:
            pass
    return ids


class Server:
    """A running aggregator: gRPC server plus the deadline ticker. Use :func:`secagg.serve`.

    Without mutual TLS (``tls`` with a ``ca``) nobody's identity is checked, so that is allowed only
    on a loopback address, or anywhere with ``insecure=True``.

    Operations: the gRPC port also serves ``grpc.health.v1.Health`` (overall "" and
    ``secagg.v1.Aggregator``: SERVING once started, NOT_SERVING from the moment :meth:`stop` begins)
    and server reflection. ``health_listen`` adds a plaintext port that serves health checks and
    nothing else, for probes that cannot present a client certificate. ``metrics`` receives the
    counts (pass the one the core reports to); ``metrics_port`` serves them over HTTP on
    ``metrics_host`` (default: the host of ``listen``).
    """

    def __init__(self, core: Aggregator, listen: str, tls: ServerTLS | None = None, insecure: bool = False,
                 limits: Limits | None = None, *, metrics: Metrics | None = None, metrics_port: int | None = None,
                 metrics_host: str | None = None, health_listen: str | None = None, ingest_workers: int = 0) -> None:
        self.core = core
        if ingest_workers < 0:
            raise SecAggError(f"--ingest-workers must be 0 (ingest in the aggregator's process) or more, got {ingest_workers}")
        host = listen.rsplit(":", 1)[0]
        exposure = _check_exposure(listen, host, tls, insecure)
        credentials = tls.credentials() if tls is not None else None  # bad files fail here, before binding
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.admission = Admission(self.limits)
        # Enough workers for every admitted long call plus a reserve: short calls (status, health) never wait.
        self._grpc = _grpc_server(self.limits.workers)
        self.mutual_tls = tls is not None and tls.mutual
        self.metrics.count_open_rounds(core.open_rounds)
        self._ingest = None
        servicer = AggregatorServicer(core, Authorizer(self.mutual_tls), self.metrics, self.admission,
                                      lambda: self._ingest.ports if self._ingest is not None else ())
        add_servicer(servicer, self._grpc)
        # Health answers without a caller check: it tells nothing but up or down.
        self.health = health.HealthServicer()
        for service in ("", AGGREGATOR_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((AGGREGATOR_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._grpc)
        self.address = f"{host}:{_bind(self._grpc, listen, credentials)}"
        self._tls = tls is not None
        self._health_grpc = None
        self.health_address: str | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        try:
            if health_listen is not None:
                self._health_grpc = _grpc_server(2)
                health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
                reflection.enable_server_reflection((health.SERVICE_NAME, reflection.SERVICE_NAME), self._health_grpc)
                port = _bind(self._health_grpc, health_listen, None)
                self.health_address = f"{health_listen.rsplit(':', 1)[0]}:{port}"
            if metrics_port is not None:
                self._metrics_endpoint = MetricsEndpoint(self.metrics, _metrics_host(metrics_host, host), metrics_port)
            if ingest_workers:
                from secagg.transport.ingest import WorkerPool

                self._ingest = WorkerPool(core, self.metrics, ingest_workers, host, tls, self.limits)
        except BaseException:
            self._grpc.stop(None)
            if self._health_grpc is not None:
                self._health_grpc.stop(None)
            if self._metrics_endpoint is not None:
                self._metrics_endpoint.stop()
            raise
        if exposure:  # only once bound: a server that failed to start warns about nothing
            log.warning("listening on %s %s", self.address, exposure)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="secagg-deadlines", daemon=True)

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics``, or None without a metrics port."""
        return self._metrics_endpoint.url if self._metrics_endpoint else None

    def start(self) -> "Server":
        self._grpc.start()
        if self._health_grpc is not None:
            self._health_grpc.start()
        self._ticker.start()
        # The core recovered its state when it was built: from here on it serves.
        for service in ("", AGGREGATOR_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        security = "mutual TLS" if self.mutual_tls else "TLS" if self._tls else "no TLS"
        log.info("aggregator listening on %s (key %s, %s)", self.address, self.core.key.key_id, security,
                 extra={"address": self.address})
        if self.health_address:
            log.info("health checks (plaintext, health only) on %s", self.health_address,
                     extra={"address": self.health_address})
        if self._metrics_endpoint:
            log.info("metrics on %s", self._metrics_endpoint.url, extra={"address": self._metrics_endpoint.address})
        return self

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.core.tick()
            except Exception:  # a failing tick must not kill the ticker; it is logged and retried
                log.exception("deadline check failed")

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; in-flight calls get ``grace`` seconds.

        Health turns NOT_SERVING first (watchers are told); the health-only port keeps answering
        until the aggregator's port has stopped.
        """
        self.health.enter_graceful_shutdown()
        self._stop.set()
        self._grpc.stop(grace).wait()
        if self._ingest is not None:
            self._ingest.stop()
        self.admission.stop()
        if self._health_grpc is not None:
            self._health_grpc.stop(0).wait()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()

    def wait(self) -> None:
        """Block until the server stops."""
        self._grpc.wait_for_termination()


#: Receive window per stream (see _grpc_server).
STREAM_WINDOW_BYTES = 1 << 20


class _Handlers:
    """Stands in for a server to collect the generated code's method handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def add_servicer(servicer: pb_grpc.AggregatorServicer, server: grpc.Server) -> None:
    """Register the generated handlers, except that Submit's messages are read by :mod:`submit_wire` (no copies)."""
    collected = _Handlers()
    pb_grpc.add_AggregatorServicer_to_server(servicer, collected)
    handlers = collected.handlers
    handlers["Submit"] = _submit_handler(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AGGREGATOR_SERVICE, handlers),))
    server.add_registered_method_handlers(AGGREGATOR_SERVICE, handlers)


def submit_only_handlers(core, auth: Authorizer, metrics: Metrics, admission: Admission) -> grpc.GenericRpcHandler:
    """``Submit`` alone, served by ``core.submit`` (an ingest worker's; :mod:`secagg.transport.ingest`)."""
    return grpc.method_handlers_generic_handler(
        AGGREGATOR_SERVICE, {"Submit": _submit_handler(AggregatorServicer(core, auth, metrics, admission))})


def _submit_handler(servicer: pb_grpc.AggregatorServicer) -> grpc.RpcMethodHandler:
    return grpc.stream_unary_rpc_method_handler(servicer.Submit, request_deserializer=parse_submit_message,
                                                response_serializer=pb.SubmitReply.SerializeToString)


def _grpc_server(max_workers: int) -> grpc.Server:
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 # Clients ping every 30 s during long streams; allow it.
                 ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                 # gRPC sets SO_REUSEPORT by default, so a second aggregator could bind a port
                 # that one already serves and the kernel would split clients between the two.
                 ("grpc.so_reuseport", 0),
                 # Flow control: gRPC otherwise grows each connection's receive window with its
                 # bandwidth-delay estimate (to several MB) and buffers that much of every incoming
                 # stream, including streams that are then refused as busy: 200 clients sending 8 MB
                 # updates at once took the aggregator to 1.3 GB. A fixed 1 MiB window per stream
                 # bounds that and still allows 20 MB/s per upload at 50 ms round trips.
                 ("grpc.http2.bdp_probe", 0),
                 ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES)],
    )


def _bind(server: grpc.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``listen``; the port bound (port 0 picks one)."""
    if _port_taken(listen):
        raise SecAggError(f"cannot listen on {listen}: the port is taken; stop the other server or pick another port")
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
        port = 0
    if port == 0:
        raise SecAggError(f"cannot listen on {listen}: the address is invalid or the port is taken")
    return port


def _metrics_host(metrics_host: str | None, listen_host: str) -> str:
    """Where the metrics port binds: as asked, else where the gRPC port does (every address for an empty host)."""
    host = (metrics_host if metrics_host is not None else listen_host).strip("[]")
    return host or "0.0.0.0"


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
