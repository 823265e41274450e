"""The envelope: header + checksummed chunks, validated before any ciphertext is parsed."""

from __future__ import annotations

import dataclasses
import os

import pytest

from secagg import envelope
from secagg.envelope import CIPHERTEXTS_PER_CHUNK, MAX_CIPHERTEXT_BYTES, Chunk, ChunkValidator, chunk_digest, seal_update
from secagg.errors import EnvelopeError

N = 2 * CIPHERTEXTS_PER_CHUNK + 5  # three chunks, the last one short


@pytest.fixture
def sealed():
    blobs = [os.urandom(1000 + i) for i in range(N)]
    header, chunks = seal_update("r1", "site-1", "k" * 32, "s" * 64, blobs)
    return blobs, header, chunks


def _run(header, chunks):
    v = ChunkValidator(header)
    out = []
    for c in chunks:
        out.extend(v.accept(c))
    v.finish()
    return out


def test_seal_update_is_accepted(sealed):
    blobs, header, chunks = sealed
    assert header.num_ciphertexts == N and header.num_chunks == 3 == len(chunks)
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [len(c.ciphertexts) for c in chunks] == [CIPHERTEXTS_PER_CHUNK, CIPHERTEXTS_PER_CHUNK, 5]
    assert header.format_version == envelope.FORMAT_VERSION
    assert header.digest == chunk_digest(blobs)
    assert _run(header, chunks) == blobs
    assert list(envelope.iter_chunks(header, chunks)) == blobs


def test_single_chunk_update(sealed):
    header, chunks = seal_update("r1", "c", "k", "s", [b"x" * 10])
    assert header.num_chunks == 1 and _run(header, chunks) == [b"x" * 10]


def test_out_of_order_chunk(sealed):
    _, header, chunks = sealed
    v = ChunkValidator(header)
    v.accept(chunks[0])
    with pytest.raises(EnvelopeError, match="chunk 2 arrived where chunk 1 was expected"):
        v.accept(chunks[2])


def test_duplicate_chunk(sealed):
    _, header, chunks = sealed
    v = ChunkValidator(header)
    v.accept(chunks[0])
    with pytest.raises(EnvelopeError, match="chunk 0 arrived where chunk 1 was expected"):
        v.accept(chunks[0])


def test_flipped_byte_fails_the_checksum(sealed):
    _, header, chunks = sealed
    cts = list(chunks[1].ciphertexts)
    b = bytearray(cts[3])
    b[500] ^= 0x01
    cts[3] = bytes(b)
    bad = dataclasses.replace(chunks[1], ciphertexts=tuple(cts))
    v = ChunkValidator(header)
    v.accept(chunks[0])
    with pytest.raises(EnvelopeError, match="chunk 1 failed its checksum"):
        v.accept(bad)


def test_moving_a_ciphertext_between_chunks_fails_the_checksum(sealed):
    _, header, chunks = sealed
    a = Chunk(0, chunks[0].ciphertexts[:-1], chunks[0].sha256)
    with pytest.raises(EnvelopeError, match="checksum"):
        ChunkValidator(header).accept(a)


def test_missing_last_chunk_is_truncated(sealed):
    _, header, chunks = sealed
    v = ChunkValidator(header)
    for c in chunks[:-1]:
        v.accept(c)
    with pytest.raises(EnvelopeError, match=r"truncated: got 2 of 3 chunks \(48 of 53 ciphertexts\)"):
        v.finish()
    with pytest.raises(EnvelopeError, match="truncated"):
        list(envelope.iter_chunks(header, chunks[:-1]))


def test_empty_stream_is_truncated(sealed):
    _, header, _ = sealed
    with pytest.raises(EnvelopeError, match="truncated: got 0 of 3 chunks"):
        ChunkValidator(header).finish()


def test_extra_ciphertexts(sealed):
    blobs, header, chunks = sealed
    # One more ciphertext in the last chunk, correctly checksummed: more than the header announced.
    extra = chunks[2].ciphertexts + (b"y" * 100,)
    bad = Chunk(2, extra, chunk_digest(extra))
    v = ChunkValidator(header)
    v.accept(chunks[0])
    v.accept(chunks[1])
    with pytest.raises(EnvelopeError, match=f"more ciphertexts than the {N} the header announced"):
        v.accept(bad)


def test_extra_chunk(sealed):
    _, header, chunks = sealed
    v = ChunkValidator(header)
    for c in chunks:
        v.accept(c)
    with pytest.raises(EnvelopeError, match="chunk 3 is beyond the 3 chunks"):
        v.accept(Chunk(3, (), chunk_digest(())))


def test_oversize_ciphertext(sealed):
    _, header, _ = sealed
    big = (b"z" * (MAX_CIPHERTEXT_BYTES + 1),)
    with pytest.raises(EnvelopeError, match=f"ciphertext of {MAX_CIPHERTEXT_BYTES + 1} bytes is larger"):
        ChunkValidator(header).accept(Chunk(0, big, chunk_digest(big)))


def test_wrong_overall_digest(sealed):
    _, header, chunks = sealed
    wrong = dataclasses.replace(header, digest=bytes(32))
    v = ChunkValidator(wrong)
    for c in chunks:
        v.accept(c)  # every chunk is intact on its own
    with pytest.raises(EnvelopeError, match="digest does not match its header"):
        v.finish()


def test_reordered_chunks_with_renumbered_indices_fail_the_digest(sealed):
    """Swapping whole chunks (and their indices) passes each chunk check but not the overall digest."""
    _, header, chunks = sealed
    swapped = [Chunk(0, chunks[1].ciphertexts, chunks[1].sha256), Chunk(1, chunks[0].ciphertexts, chunks[0].sha256),
               chunks[2]]
    with pytest.raises(EnvelopeError, match="digest does not match"):
        _run(header, swapped)


def test_chunk_digest_is_length_prefixed():
    assert chunk_digest([b"ab", b"c"]) != chunk_digest([b"a", b"bc"])
    assert chunk_digest([b"abc"]) != chunk_digest([b"abc", b""])


@pytest.mark.parametrize("value", ["site-1", "a", "A.b_c-9", "x" * 64])
def test_valid_ids(value):
    assert envelope.check_id("client", value) == value


@pytest.mark.parametrize("value", ["", "-x", ".hidden", "../etc", "a/b", "x" * 65, "sp ace", "é", None])
def test_invalid_ids(value):
    with pytest.raises(EnvelopeError, match="invalid client id"):
        envelope.check_id("client", value)
