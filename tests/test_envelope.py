"""The envelope (format 2): header + checksummed chunks of (c0, seed) pairs, validated before any
coefficient is parsed. Sizes here are the real ones (65,536-byte polynomials, 64-byte seeds); the
bytes are random, since the envelope never looks inside them."""

from __future__ import annotations

import dataclasses
import os

import pytest

from secagg import envelope
from secagg.envelope import (
    CIPHERTEXTS_PER_CHUNK,
    Chunk,
    ChunkValidator,
    Header,
    chunk_digest,
    split_chunks,
    update_digest,
)
from secagg.errors import EnvelopeError
from secagg.polys import SEED_BYTES

C0 = 8 * 8192
N = 2 * CIPHERTEXTS_PER_CHUNK + 5  # three chunks, the last one short


def _pairs(n: int) -> list[tuple[bytes, bytes]]:
    return [(os.urandom(C0), os.urandom(SEED_BYTES)) for _ in range(n)]


def _header(chunks: list[Chunk], n: int) -> Header:
    return Header("r1", "site-1", "k" * 32, "s" * 64, n, len(chunks), update_digest(c.digest for c in chunks))


@pytest.fixture(scope="module")
def sealed():
    pairs = _pairs(N)
    chunks = split_chunks(pairs)
    return pairs, _header(chunks, N), chunks


def _run(header, chunks, **kw):
    v = ChunkValidator(header, C0, **kw)
    out = []
    for c in chunks:
        out.extend(v.accept(c))
    v.finish()
    return out


def test_split_chunks_is_accepted(sealed):
    pairs, header, chunks = sealed
    assert CIPHERTEXTS_PER_CHUNK == 24 and envelope.FORMAT_VERSION == 2
    assert header.num_ciphertexts == N and header.num_chunks == 3 == len(chunks)
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [len(c.c0s) for c in chunks] == [24, 24, 5] == [len(c.seeds) for c in chunks]
    assert header.format_version == envelope.FORMAT_VERSION
    assert chunks[1].digest == chunk_digest(1, [c for c, _ in pairs[24:48]], [s for _, s in pairs[24:48]])
    assert header.digest == update_digest([c.digest for c in chunks])
    assert _run(header, chunks) == pairs
    assert list(envelope.iter_chunks(header, chunks, C0)) == pairs


def test_single_chunk_update():
    pairs = _pairs(1)
    chunks = split_chunks(pairs)
    assert len(chunks) == 1 and _run(_header(chunks, 1), chunks) == pairs


def test_out_of_order_chunk(sealed):
    _, header, chunks = sealed
    v = ChunkValidator(header, C0)
    v.accept(chunks[0])
    with pytest.raises(EnvelopeError, match="chunk 2 arrived where chunk 1 was expected"):
        v.accept(chunks[2])


def test_duplicate_chunk(sealed):
    _, header, chunks = sealed
    v = ChunkValidator(header, C0)
    v.accept(chunks[0])
    with pytest.raises(EnvelopeError, match="chunk 0 arrived where chunk 1 was expected"):
        v.accept(chunks[0])


@pytest.mark.parametrize("part", ["c0", "seed"])
def test_flipped_byte_fails_the_checksum(sealed, part):
    _, header, chunks = sealed
    c0s, seeds = list(chunks[1].c0s), list(chunks[1].seeds)
    target = c0s if part == "c0" else seeds
    b = bytearray(target[3])
    b[50] ^= 0x01
    target[3] = bytes(b)
    bad = dataclasses.replace(chunks[1], c0s=tuple(c0s), seeds=tuple(seeds))
    v = ChunkValidator(header, C0)
    v.accept(chunks[0])
    with pytest.raises(EnvelopeError, match="chunk 1 failed its checksum"):
        v.accept(bad)


def test_a_chunk_digest_binds_its_index(sealed):
    """The same ciphertexts under another index have another digest: chunks cannot be renumbered."""
    _, _, chunks = sealed
    c = chunks[0]
    assert chunk_digest(0, c.c0s, c.seeds) != chunk_digest(1, c.c0s, c.seeds)


def test_swapping_seeds_between_ciphertexts_fails_the_checksum(sealed):
    _, header, chunks = sealed
    c = chunks[0]
    seeds = (c.seeds[1], c.seeds[0]) + c.seeds[2:]
    with pytest.raises(EnvelopeError, match="chunk 0 failed its checksum"):
        ChunkValidator(header, C0).accept(dataclasses.replace(c, seeds=seeds))


def test_missing_last_chunk_is_truncated(sealed):
    _, header, chunks = sealed
    v = ChunkValidator(header, C0)
    for c in chunks[:-1]:
        v.accept(c)
    with pytest.raises(EnvelopeError, match=r"truncated: got 2 of 3 chunks \(48 of 53 ciphertexts\)"):
        v.finish()
    with pytest.raises(EnvelopeError, match="truncated"):
        list(envelope.iter_chunks(header, chunks[:-1], C0))


def test_empty_stream_is_truncated(sealed):
    _, header, _ = sealed
    with pytest.raises(EnvelopeError, match="truncated: got 0 of 3 chunks"):
        ChunkValidator(header, C0).finish()


def test_extra_ciphertexts(sealed):
    pairs, header, chunks = sealed
    # One more ciphertext in the last chunk, correctly checksummed: more than the header announced.
    c0s, seeds = chunks[2].c0s + (pairs[0][0],), chunks[2].seeds + (pairs[0][1],)
    bad = Chunk(2, c0s, seeds, chunk_digest(2, c0s, seeds))
    v = ChunkValidator(header, C0, per_chunk=None)
    v.accept(chunks[0])
    v.accept(chunks[1])
    with pytest.raises(EnvelopeError, match=f"more ciphertexts than the {N} the header announced"):
        v.accept(bad)
    # With the fixed cut (updates), the chunk is refused for its size first.
    v = ChunkValidator(header, C0)
    v.accept(chunks[0])
    v.accept(chunks[1])
    with pytest.raises(EnvelopeError, match="chunk 2 holds 6 ciphertexts; updates are cut into chunks of 24"):
        v.accept(bad)


def test_extra_chunk(sealed):
    pairs, header, chunks = sealed
    v = ChunkValidator(header, C0)
    for c in chunks:
        v.accept(c)
    c0s, seeds = (pairs[0][0],), (pairs[0][1],)
    with pytest.raises(EnvelopeError, match="chunk 3 is beyond the 3 chunks"):
        v.accept(Chunk(3, c0s, seeds, chunk_digest(3, c0s, seeds)))


def test_an_empty_chunk_or_unpaired_seeds_are_refused(sealed):
    pairs, header, _ = sealed
    with pytest.raises(EnvelopeError, match="chunk 0 has 0 polynomials and 0 seeds"):
        ChunkValidator(header, C0).accept(Chunk(0, (), (), chunk_digest(0, (), ())))
    with pytest.raises(EnvelopeError, match="chunk 0 has 2 polynomials and 1 seeds"):
        ChunkValidator(header, C0).accept(Chunk(0, (pairs[0][0], pairs[1][0]), (pairs[0][1],), b""))


@pytest.mark.parametrize("c0_size, seed_size", [(C0 - 8, SEED_BYTES), (C0 + 1, SEED_BYTES), (C0, SEED_BYTES - 1),
                                                (C0, SEED_BYTES + 64), (0, 0)])
def test_wrong_sizes_are_refused_before_the_checksum(c0_size, seed_size):
    pairs = [(os.urandom(c0_size), os.urandom(seed_size))] + _pairs(23)
    chunks = split_chunks(pairs)
    with pytest.raises(EnvelopeError, match=f"a ciphertext of {c0_size} \\+ {seed_size} bytes; this federation's are "
                                            f"{C0} \\+ {SEED_BYTES}"):
        ChunkValidator(_header(chunks, 24), C0).accept(chunks[0])


def test_an_update_cut_into_other_chunks_is_refused():
    """Updates are cut into chunks of exactly 24 (the last one: the rest), so that the aggregator can
    recompute a stored update's digest at start; any other cut is refused, even with valid digests."""
    pairs = _pairs(30)
    for sizes in ([1] * 30, [25, 5], [12, 18], [23, 7], [20, 10]):
        chunks, start = [], 0
        for i, size in enumerate(sizes):
            part = pairs[start:start + size]
            c0s, seeds = tuple(c for c, _ in part), tuple(s for _, s in part)
            chunks.append(Chunk(i, c0s, seeds, chunk_digest(i, c0s, seeds)))
            start += size
        with pytest.raises(EnvelopeError, match=f"chunk 0 holds {sizes[0]} ciphertexts; updates are cut into chunks "
                                                "of 24"):
            _run(_header(chunks, 30), chunks)
        # An aggregate (per_chunk=None) may be cut as its server likes: its digest covers the cut.
        assert _run(_header(chunks, 30), chunks, per_chunk=None) == pairs
    assert _run(_header(split_chunks(pairs), 30), split_chunks(pairs)) == pairs  # [24, 6]


def test_aggregate_chunks_carry_every_contributors_seed():
    c0s = tuple(os.urandom(C0) for _ in range(2))
    seeds = tuple(os.urandom(3 * SEED_BYTES) for _ in range(2))
    chunks = [Chunk(0, c0s, seeds, chunk_digest(0, c0s, seeds))]
    out = list(envelope.iter_chunks(_header(chunks, 2), chunks, C0, seed_size=3 * SEED_BYTES, per_chunk=None))
    assert out == list(zip(c0s, seeds))
    with pytest.raises(EnvelopeError, match="a ciphertext of"):
        list(envelope.iter_chunks(_header(chunks, 2), chunks, C0, seed_size=2 * SEED_BYTES, per_chunk=None))


def test_wrong_overall_digest(sealed):
    _, header, chunks = sealed
    wrong = dataclasses.replace(header, digest=bytes(32))
    v = ChunkValidator(wrong, C0)
    for c in chunks:
        v.accept(c)  # every chunk is intact on its own
    with pytest.raises(EnvelopeError, match="digest does not match its header"):
        v.finish()


def test_chunk_digest_is_length_prefixed():
    a, b = os.urandom(10), os.urandom(10)
    assert chunk_digest(0, [a + b[:1]], [b[1:]]) != chunk_digest(0, [a], [b])
    assert chunk_digest(0, [a], [b]) != chunk_digest(0, [a, b""], [b, b""])
    with pytest.raises(ValueError):  # zip(strict=True): a polynomial without its seed is not hashed
        chunk_digest(0, [a, b], [b])


def test_update_digest_depends_on_the_chunk_order(sealed):
    _, _, chunks = sealed
    d = [c.digest for c in chunks]
    assert update_digest(d) != update_digest([d[1], d[0], d[2]])


@pytest.mark.parametrize("value", ["site-1", "a", "A.b_c-9", "x" * 64])
def test_valid_ids(value):
    assert envelope.check_id("client", value) == value


@pytest.mark.parametrize("value", ["", "-x", ".hidden", "../etc", "a/b", "x" * 65, "sp ace", "é", None, "site-1\n"])
def test_invalid_ids(value):
    with pytest.raises(EnvelopeError, match="invalid client id"):
        envelope.check_id("client", value)
