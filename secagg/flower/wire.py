"""secagg's messages inside Flower's records: one packed Array per update and per encrypted sum.

Flower carries bytes in ``Array(dtype, shape, stype, data)``. An update is the same messages that
secagg's gRPC stream carries (``proto/secagg.proto``), framed back to back in ONE Array: a 4-byte
big-endian length, then a serialized ``SubmitMessage`` (frame 0: the header; then one per chunk).
One Array per ciphertext was measured 2.3x slower through a loopback deployment (Flower sends every
Array as objects of its own). The encrypted sum is framed the same way from ``AggregateMessage`` s.

Reading is strict: the stype, every length, the order (header first, then chunks) and trailing
bytes are checked, and each frame is parsed by the aggregator's own zero-copy reader
(:mod:`secagg.transport.submit_wire`), so a malformed update is refused before anything is added.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from secagg.envelope import Chunk, Header
from secagg.errors import EnvelopeError, ModelFormatError
from secagg.packing import ModelSpec
from secagg.rounds import Aggregate, RoundStatus
from secagg.transport import secagg_pb2 as pb
from secagg.transport.client import status_from_pb
from secagg.transport.server import (aggregate_header_to_pb, chunk_from_pb, chunk_to_pb, header_from_pb,
                                     header_to_pb, status_to_pb)
from secagg.transport.submit_wire import parse_submit_message

UPDATE_STYPE = "secagg.update/2"
AGGREGATE_STYPE = "secagg.aggregate/2"
#: The ConfigRecord holding a secagg round's public terms in a message, and the records that carry
#: the update (client -> server) and the encrypted global model (server -> client).
TERMS = "secagg"
UPDATE = "secagg.update"
GLOBAL = "secagg.global"
_LENGTH = struct.Struct(">I")


def _pack(messages: Iterable[bytes], stype: str) -> Array:
    parts = []
    for m in messages:
        parts += [_LENGTH.pack(len(m)), m]
    data = b"".join(parts)
    # dtype/shape describe the bytes honestly; the stype keeps Array.numpy() from ever treating them as weights.
    return Array(dtype="uint8", shape=(len(data),), stype=stype, data=data)


def _frames(array: Array, stype: str, what: str) -> Iterator[memoryview]:
    if not isinstance(array, Array) or array.stype != stype:
        raise EnvelopeError(f"the {what} is not a packed secagg {what} (stype {getattr(array, 'stype', None)!r}, "
                            f"expected {stype!r}); both sides must run secagg's Flower integration of one version")
    view = memoryview(array.data)
    pos = 0
    while pos < len(view):
        if len(view) - pos < _LENGTH.size:
            raise EnvelopeError(f"the packed {what} ends inside a frame length (trailing bytes)")
        (size,) = _LENGTH.unpack_from(view, pos)
        pos += _LENGTH.size
        if size > len(view) - pos:
            raise EnvelopeError(f"a frame of the packed {what} runs past its end")
        yield view[pos:pos + size]
        pos += size


def pack_update(header: Header, chunks: Iterable[Chunk]) -> Array:
    """A sealed update as one Array: its header, then every chunk, as ``SubmitMessage`` frames."""
    messages = [pb.SubmitMessage(header=header_to_pb(header)).SerializeToString()]
    messages += [pb.SubmitMessage(chunk=chunk_to_pb(c)).SerializeToString() for c in chunks]
    return _pack(messages, UPDATE_STYPE)


def read_update(array: Array) -> tuple[Header, Iterator[Chunk]]:
    """The header and (lazily) the chunks of a packed update, for :meth:`Aggregator.submit`.

    Raises :class:`EnvelopeError` for anything but a header frame first; a bad later frame raises
    while the chunks are read, i.e. inside ``submit``, which then keeps nothing of the update.
    """
    frames = _frames(array, UPDATE_STYPE, "update")
    first = next(frames, None)
    message = parse_submit_message(first) if first is not None else None
    if message is None or message.header is None:
        reason = message.error if message is not None and message.error else "the first frame must be its header"
        raise EnvelopeError(f"a malformed secagg update: {reason}")

    def chunks() -> Iterator[Chunk]:
        for frame in frames:
            m = parse_submit_message(frame)
            if m.chunk is None:
                raise EnvelopeError(f"a malformed secagg update: {m.error or 'a second header after the first'}")
            yield m.chunk

    return header_from_pb(message.header), chunks()


def pack_aggregate(agg: Aggregate) -> Array:
    """A closed round's encrypted sum as one Array: its header, then every chunk, as ``AggregateMessage`` frames."""
    messages = [pb.AggregateMessage(header=aggregate_header_to_pb(agg)).SerializeToString()]
    messages += [pb.AggregateMessage(chunk=chunk_to_pb(c)).SerializeToString() for c in agg.chunks()]
    return _pack(messages, AGGREGATE_STYPE)


def read_aggregate(array: Array) -> tuple[pb.AggregateHeader, Iterator[Chunk]]:
    """The header and (lazily) the chunks of a packed encrypted sum, for :func:`secagg.api.open_served`."""
    frames = _frames(array, AGGREGATE_STYPE, "aggregate")
    messages = (_aggregate_message(f) for f in frames)
    first = next(messages, None)
    if first is None or first.WhichOneof("kind") != "header":
        raise EnvelopeError("a malformed secagg aggregate: the first frame must be its header")

    def chunks() -> Iterator[Chunk]:
        for m in messages:
            if m.WhichOneof("kind") != "chunk":
                raise EnvelopeError("a malformed secagg aggregate: a second header after the first")
            yield chunk_from_pb(m.chunk)

    return first.header, chunks()


def _aggregate_message(frame: memoryview) -> pb.AggregateMessage:
    try:
        return pb.AggregateMessage.FromString(bytes(frame))
    except Exception as exc:  # protobuf's DecodeError and friends: one error for every bad frame
        raise EnvelopeError(f"a malformed secagg aggregate frame ({type(exc).__name__})") from None


def terms_record(status: RoundStatus, spec: ModelSpec, global_status: RoundStatus | None = None,
                 global_spec: ModelSpec | None = None) -> ConfigRecord:
    """The round's public terms (and those of the round whose sum is the global model) for a message."""
    record = {"format": 2, "round-status": status_to_pb(status, spec).SerializeToString()}
    if global_status is not None:
        record["global-status"] = status_to_pb(global_status, global_spec or spec).SerializeToString()
    return ConfigRecord(record)


def read_status(terms: ConfigRecord, field: str) -> tuple[RoundStatus, ModelSpec]:
    """A round status and its spec out of :func:`terms_record`'s record."""
    if terms.get("format") != 2:
        raise EnvelopeError(f"the secagg terms have format {terms.get('format')!r}, this client reads format 2; "
                            "run one version of secagg on the ServerApp and the ClientApps")
    raw = terms.get(field)
    if not isinstance(raw, bytes):
        raise EnvelopeError(f"the secagg terms carry no {field!r}")
    try:
        message = pb.RoundStatus.FromString(raw)
    except Exception as exc:
        raise EnvelopeError(f"the secagg terms' {field!r} is not a round status ({type(exc).__name__})") from None
    return status_from_pb(message), ModelSpec.from_json(message.model_spec_json)


def plain_record(spec: ModelSpec, vector: np.ndarray, fixed: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A decrypted flat vector as an ordinary ArrayRecord under the spec's names, dtypes and shapes.

    Tensors that are not aggregated (integers: counters) are taken from ``fixed`` by name: the
    ServerApp's initial values, which are public.
    """
    if vector.size != spec.num_params:
        raise ModelFormatError(f"the global model has {vector.size} values, the round's model needs {spec.num_params}")
    out, pos = {}, 0
    for t in spec.tensors:
        if t.aggregated:
            value = vector[pos:pos + t.size].reshape(t.shape).astype(t.dtype)
            pos += t.size
        else:
            value = fixed.get(t.name)
            if value is None or value.shape != t.shape or str(value.dtype) != t.dtype:
                raise ModelFormatError(f"the ServerApp sent no plaintext value of the non-aggregated tensor "
                                       f"{t.describe()}; it sends the initial values of integer tensors with every round")
        out[t.name] = Array(np.ascontiguousarray(value))
    return ArrayRecord(out)
