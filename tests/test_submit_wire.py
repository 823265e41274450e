"""The aggregator's zero-copy reader of Submit messages agrees with protobuf, and is stricter."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.transport import secagg_pb2 as pb
from secagg.transport.submit_wire import parse_submit_message

SETTINGS = settings(max_examples=300, deadline=None)

chunks = st.builds(
    lambda index, c0, seeds, digest: pb.Chunk(index=index, c0=c0, seeds=seeds, digest=digest),
    st.integers(0, 2**32 - 1), st.lists(st.binary(max_size=300), max_size=5),
    st.lists(st.binary(max_size=80), max_size=5), st.binary(max_size=40))


def _as_protobuf_reads_it(data: bytes) -> tuple:
    c = pb.SubmitMessage.FromString(data).chunk
    return c.index, tuple(c.c0), tuple(c.seeds), c.digest


def _as_read(data: bytes) -> tuple:
    c = parse_submit_message(data).chunk
    return c.index, tuple(map(bytes, c.c0s)), tuple(map(bytes, c.seeds)), c.digest


@SETTINGS
@given(chunks)
def test_a_chunk_reads_as_protobuf_reads_it(chunk):
    data = pb.SubmitMessage(chunk=chunk).SerializeToString()
    msg = parse_submit_message(data)
    assert msg.error is None and msg.header is None and msg.wire_bytes == len(data)
    assert _as_read(data) == _as_protobuf_reads_it(data)


def test_polynomials_are_views_of_the_received_message_not_copies():
    c0s = [os.urandom(65536) for _ in range(3)]
    data = pb.SubmitMessage(chunk=pb.Chunk(index=7, c0=c0s, seeds=[b"s" * 64] * 3, digest=b"d" * 32)).SerializeToString()
    chunk = parse_submit_message(data).chunk
    assert all(isinstance(c, memoryview) and c.obj is data for c in chunk.c0s)
    assert [bytes(c) for c in chunk.c0s] == c0s and chunk.index == 7 and chunk.digest == b"d" * 32


def test_a_header_is_read_by_protobuf():
    header = pb.UpdateHeader(round_id="r1", client_id="site-1", num_ciphertexts=3, num_chunks=1, digest=b"x" * 32)
    msg = parse_submit_message(pb.SubmitMessage(header=header).SerializeToString())
    assert msg.chunk is None and msg.error is None and msg.header == header


@SETTINGS
@given(st.binary(max_size=400))
def test_any_bytes_give_a_message_or_a_reason_never_an_exception(data):
    msg = parse_submit_message(data)
    assert sum(x is not None for x in (msg.header, msg.chunk, msg.error)) == 1
    if msg.error:
        assert "malformed Submit message" in msg.error and "secagg client" in msg.error
    if msg.chunk is not None:  # whatever is accepted, protobuf reads the same way
        assert _as_read(data) == _as_protobuf_reads_it(data)


@SETTINGS
@given(chunks, st.data())
def test_a_truncated_chunk_is_refused(chunk, data):
    whole = pb.SubmitMessage(chunk=chunk).SerializeToString()
    cut = data.draw(st.integers(1, len(whole) - 1)) if len(whole) > 1 else 0
    assert parse_submit_message(whole[:cut]).error or cut == 0


def test_what_protobuf_tolerates_is_refused_with_its_reason():
    chunk = pb.SubmitMessage(chunk=pb.Chunk(index=1, c0=[b"a"], seeds=[b"b"], digest=b"d")).SerializeToString()
    header = pb.SubmitMessage(header=pb.UpdateHeader(round_id="r")).SerializeToString()
    unknown_field = chunk[:1] + bytes([chunk[1] + 2]) + chunk[2:] + b"\x28\x01"  # chunk field 5 = 1
    cases = {
        "both": (header + chunk, "exactly one of a header and a chunk"),
        "neither": (b"", "exactly one of a header and a chunk"),
        "unknown field": (unknown_field, "unexpected field 5"),
        "index twice": (b"\x12\x04\x08\x01\x08\x02", "index appears twice"),
        "index as bytes": (b"\x12\x03\x0a\x01\x00", "unexpected field 1 (wire type 2)"),
        "index beyond uint32": (b"\x12\x06\x08\x80\x80\x80\x80\x10", "beyond uint32"),
        "overlong varint": (b"\x12\x0b\x08" + b"\xff" * 10, "varint"),
        "runs past the end": (b"\x12\x05\x12\x09abc", "runs past the end"),
    }
    for name, (data, reason) in cases.items():
        msg = parse_submit_message(data)
        assert msg.error and reason in msg.error, (name, msg)
