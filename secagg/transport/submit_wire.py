"""The aggregator's reader of ``SubmitMessage``: the protobuf wire format parsed without copying.

An update is ~8 bytes per parameter; protobuf's generated parser copies every polynomial twice
(into its arena, then into a new ``bytes`` on field access), and asking it for the message's size
walks it a third time. On a 1M-parameter update that was several milliseconds of the aggregator's
CPU per submission. This reader slices the received message instead: the polynomials and seeds of
a chunk are ``memoryview`` s into it, hashed and written to disk from there.

It reads exactly the messages of ``proto/secagg.proto`` (``SubmitMessage`` holding either an
``UpdateHeader``, parsed by protobuf since it is small, or a ``Chunk``) and is stricter than
protobuf: unknown fields, repeated singular fields, both or neither of the oneof's members, and
wrong wire types are refused. It never raises: gRPC would end the stream quietly on a deserializer
exception, so a malformed message becomes a :class:`SubmitMessage` carrying the reason, and the
servicer refuses the update with it.
"""

from __future__ import annotations

import dataclasses

from google.protobuf.message import DecodeError

from secagg.envelope import Chunk
from secagg.transport import secagg_pb2 as pb

_VARINT, _LENGTH = 0, 2  # the two protobuf wire types these messages use


class _Malformed(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class SubmitMessage:
    """One message of a Submit stream: exactly one of ``header`` and ``chunk``, or ``error``."""

    wire_bytes: int
    header: pb.UpdateHeader | None = None
    chunk: Chunk | None = None
    error: str | None = None


def parse_submit_message(data: bytes) -> SubmitMessage:
    """gRPC's request deserializer for ``Submit``: the message, or what is wrong with it."""
    try:
        fields = _fields(memoryview(data), {1: _LENGTH, 2: _LENGTH})
        if len(fields) != 1:
            raise _Malformed("a Submit message holds exactly one of a header and a chunk")
        (number, [value]), = fields.items()
        if number == 1:
            return SubmitMessage(len(data), header=pb.UpdateHeader.FromString(value))
        return SubmitMessage(len(data), chunk=_chunk(value))
    except (_Malformed, DecodeError) as exc:
        return SubmitMessage(len(data), error=f"a malformed Submit message ({exc or 'undecodable header'}); "
                                              "submit with the secagg client")


def _chunk(view: memoryview) -> Chunk:
    fields = _fields(view, {1: _VARINT, 2: _LENGTH, 3: _LENGTH, 4: _LENGTH})
    for number, name in ((1, "index"), (4, "digest")):
        if len(fields.get(number, ())) > 1:
            raise _Malformed(f"a chunk's {name} appears twice")
    index = fields.get(1, [0])[0]
    if index >= 1 << 32:
        raise _Malformed("a chunk index beyond uint32")
    digest = bytes(fields[4][0]) if 4 in fields else b""
    return Chunk(index, tuple(fields.get(2, ())), tuple(fields.get(3, ())), digest)


def _fields(view: memoryview, expected: dict[int, int]) -> dict[int, list]:
    """Field number -> values, in order (varints as int, length-delimited fields as memoryview slices)."""
    out: dict[int, list] = {}
    pos, end = 0, len(view)
    while pos < end:
        key, pos = _varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if expected.get(number) != wire_type:
            raise _Malformed(f"unexpected field {number} (wire type {wire_type})")
        if wire_type == _VARINT:
            value, pos = _varint(view, pos)
        else:
            size, pos = _varint(view, pos)
            if size > end - pos:
                raise _Malformed(f"field {number} runs past the end of the message")
            value, pos = view[pos:pos + size], pos + size
        out.setdefault(number, []).append(value)
    return out


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(view))):
        byte = view[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >= 1 << 64:
                raise _Malformed("a varint beyond 64 bits")
            return value, i + 1
        shift += 7
    raise _Malformed("a truncated or overlong varint")
