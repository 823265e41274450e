"""The gRPC client: a thin wrapper that sends core records and raises secagg errors."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterable, Iterator

import grpc

from secagg.envelope import MAX_MESSAGE_BYTES, Chunk, Header
from secagg.errors import BusyError, SecAggError, TransportError
from secagg.rounds import RoundStatus, RoundSummary
from secagg.transport import secagg_pb2 as pb
from secagg.transport import secagg_pb2_grpc as pb_grpc
from secagg.transport.server import ADMITTED_KEY, chunk_from_pb, chunk_to_pb, header_to_pb
from secagg.transport.status import error_from_rpc
from secagg.transport.tls import ClientTLS, handshake_hint

# How long an upload waits for the aggregator to admit it before sending anyway (an aggregator older
# than this client never says so; it waits for the first chunk up to its idle timeout, 30 s).
ADMISSION_WAIT_SECONDS = 10.0


def status_from_pb(s: pb.RoundStatus) -> RoundStatus:
    return RoundStatus(
        s.round_id, s.state, s.submitted, s.expected, s.min_clients, tuple(s.clients), s.deadline_unix or None,
        s.spec_hash, s.key_id, s.max_weight, s.value_bound, s.num_params, s.reason,
        dp=json.loads(s.dp_json) if s.dp_json else None, enrolled=tuple(s.enrolled), epsilon_round=s.epsilon_round,
        epsilon_spent=s.epsilon_spent, epsilon_budget=s.epsilon_budget or None, delta=s.delta or None,
        min_cohort=s.min_cohort, release_grid=s.release_grid, release_precision=s.release_precision,
        masking=json.loads(s.masking_json) if s.masking_json else None, stage=s.stage,
    )


def summary_from_pb(s: pb.RoundSummary) -> RoundSummary:
    return RoundSummary(s.round_id, s.state, s.submitted, s.expected, s.created_unix or None, s.reason)


class AggregatorClient:
    """One connection to an aggregator at ``server`` ("host:port").

    With ``tls`` (or, if it is None, the ``SECAGG_TLS_*`` environment variables) the channel is TLS,
    checked against ``tls.ca``; the aggregator's certificate must name the host in ``server``.
    """

    def __init__(self, server: str, timeout: float | None = None, tls: ClientTLS | None = None) -> None:
        self.server = server
        self.timeout = timeout
        self.tls = tls if tls is not None else ClientTLS.from_env()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   # Streams have no overall deadline (a 50M-parameter update is 400 MB); pings
                   # find a dead connection instead.
                   ("grpc.keepalive_time_ms", 30_000),
                   ("grpc.keepalive_timeout_ms", 20_000),
                   ("grpc.keepalive_permit_without_calls", 0),
                   # gRPC waits up to 2 minutes between attempts to reconnect to an aggregator that
                   # was down; secagg's own retries (secagg.api) need it to try again within seconds.
                   ("grpc.initial_reconnect_backoff_ms", 500),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        self._options = options
        self._channel = self._open_channel(server)
        self._stub = pb_grpc.AggregatorStub(self._channel)
        self._ingest_ports: tuple[int, ...] | None = None  # asked once, at the first upload
        self._ingest_channels: dict[int, grpc.Channel] = {}

    def _open_channel(self, address: str) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(address, options=self._options)
        return grpc.secure_channel(address, self.tls.credentials(), options=self._options)

    def __enter__(self) -> "AggregatorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()
        for channel in self._ingest_channels.values():
            channel.close()

    def _error(self, err: grpc.RpcError) -> SecAggError:
        return error_from_rpc(err, self.server, handshake_hint(err.details() or "", self.tls, self.server))

    def _call(self, method, request, **kw):
        try:
            return method(request, timeout=kw.pop("timeout", self.timeout), **kw)
        except grpc.RpcError as err:
            raise self._error(err) from None

    def server_info(self) -> pb.ServerInfo:
        return self._call(self._stub.GetServerInfo, pb.ServerInfoRequest(), timeout=30)

    def create_round(self, request: pb.CreateRoundRequest) -> tuple[RoundStatus, str]:
        reply = self._call(self._stub.CreateRound, request, timeout=30)
        return status_from_pb(reply), reply.model_spec_json

    def status(self, round_id: str) -> tuple[RoundStatus, str]:
        """The round's status and its model spec JSON."""
        reply = self._call(self._stub.GetRound, pb.GetRoundRequest(round_id=round_id), timeout=30)
        return status_from_pb(reply), reply.model_spec_json

    def cancel_round(self, round_id: str, reason: str) -> RoundStatus:
        reply = self._call(self._stub.CancelRound, pb.CancelRoundRequest(round_id=round_id, reason=reason), timeout=30)
        return status_from_pb(reply)

    def list_rounds(self) -> list[RoundSummary]:
        reply = self._call(self._stub.ListRounds, pb.ListRoundsRequest(), timeout=30)
        return [summary_from_pb(s) for s in reply.rounds]

    def submit(self, header: Header, chunks: Iterable[Chunk]) -> pb.SubmitReply:
        """Stream one update: its header, then (once the aggregator has admitted the upload) its chunks."""
        decided = threading.Event()
        send_chunks: list[bool] = []  # empty while undecided; then [True] (admitted) or [False] (refused)

        def messages() -> Iterator[pb.SubmitMessage]:
            yield pb.SubmitMessage(header=header_to_pb(header))
            # The aggregator answers an admitted upload with its initial metadata at once, and refuses one
            # beyond its limits before reading it: sending nothing more until then keeps a refused upload
            # from filling the aggregator's receive window (1 MiB per stream) with data it will drop.
            decided.wait(ADMISSION_WAIT_SECONDS)
            if send_chunks == [False]:
                return
            for c in chunks:
                yield pb.SubmitMessage(chunk=chunk_to_pb(c))

        ingest = self._ingest_stub()
        call = (ingest or self._stub).Submit.future(messages(), timeout=self.timeout)
        try:
            # Returns once admitted, or once the call has ended (refused: no metadata before the status).
            send_chunks.append(ADMITTED_KEY in dict(call.initial_metadata() or ()))
            decided.set()
            return call.result()
        except grpc.RpcError as err:
            error = self._error(err)
            if ingest is not None and isinstance(error, TransportError) and not isinstance(error, BusyError):
                self._ingest_ports = ()  # that worker is gone or stopping: the retry goes to the aggregator's port
            raise error from None
        except BaseException:
            call.cancel()
            raise
        finally:
            if not send_chunks:
                send_chunks.append(False)
            decided.set()

    def _ingest_stub(self) -> pb_grpc.AggregatorStub | None:
        """A stub on one of the aggregator's ingest workers (``ServerInfo.ingest_ports``), if it has any."""
        if self._ingest_ports is None:
            try:
                self._ingest_ports = tuple(self.server_info().ingest_ports)
            except SecAggError:
                return None  # the upload itself will say what is wrong
        if not self._ingest_ports:
            return None
        port = random.choice(self._ingest_ports)  # spreads the clients over the workers
        if port not in self._ingest_channels:
            self._ingest_channels[port] = self._open_channel(f"{self.server.rsplit(':', 1)[0]}:{port}")
        return pb_grpc.AggregatorStub(self._ingest_channels[port])

    def mask_stage(self, round_id: str, client_id: str, stage: str, payload: dict | None,
                   wait: float) -> tuple[bool, dict, str]:
        """Post this site's message for a masked round's stage and/or wait for the stage's outcome (secagg.masking)."""
        request = pb.MaskRequest(round_id=round_id, client_id=client_id, stage=stage,
                                 payload_json=json.dumps(payload) if payload is not None else "", wait_seconds=wait)
        reply = self._call(self._stub.MaskStage, request, timeout=wait + 30)
        try:
            view = json.loads(reply.payload_json) if reply.payload_json else {}
        except (ValueError, RecursionError):
            view = None
        if not isinstance(view, dict):
            raise SecAggError(f"the aggregator answered the {stage} stage with something that is not a JSON object")
        return reply.ready, view, reply.stage

    def fetch(self, round_id: str, wait: float) -> tuple[pb.AggregateHeader, Iterator[Chunk]]:
        """The aggregate's header and a lazy iterator over its chunks."""
        try:
            stream = self._stub.FetchAggregate(pb.FetchRequest(round_id=round_id, wait_seconds=wait),
                                               timeout=None if self.timeout is None else self.timeout + wait)
            first = next(stream)
        except grpc.RpcError as err:
            raise self._error(err) from None
        if first.WhichOneof("kind") != "header":
            raise SecAggError("the aggregator sent an aggregate without a header; upgrade the aggregator")

        def chunks() -> Iterator[Chunk]:
            try:
                for msg in stream:
                    yield chunk_from_pb(msg.chunk)
            except grpc.RpcError as err:
                raise self._error(err) from None

        return first.header, chunks()
