"""The envelope around an encrypted update (or aggregate): validated before any ciphertext is parsed.

An update travels as one header followed by chunks of ciphertexts:

* header: format version, round id, client id, key id, model spec hash, number of ciphertexts,
  number of chunks, and a SHA-256 digest of all ciphertexts in order;
* chunk: its index, up to a few dozen ciphertexts, and the SHA-256 of those ciphertexts.

Checks happen in this order, cheapest and least trusting first: version, ids and hashes against the
round; then each chunk's index, size and checksum as it arrives; then the overall digest at the
end. Only after all of that is a single ciphertext handed to SEAL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
from collections.abc import Iterable, Iterator

from secagg.errors import EnvelopeError

FORMAT_VERSION = 1
# A seeded ciphertext at N = 8192 with one data prime is 65.6 kB and a full one 131 kB; anything
# much larger is not ours and is refused before it is buffered.
MAX_CIPHERTEXT_BYTES = 140_000
# gRPC's default receive limit is 4 MiB; chunks stay well below it.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CIPHERTEXTS_PER_CHUNK = 24
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_id(kind: str, value: str) -> str:
    """Round and client ids become file names on the aggregator, so they are restricted."""
    # fullmatch, not match: "$" also matches before a trailing newline, so "site-1\n" passed as an id
    # distinct from "site-1" (a second round folder, a second client).
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise EnvelopeError(
            f"invalid {kind} id {value!r}: use 1-64 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value


@dataclasses.dataclass(frozen=True)
class Header:
    """What the aggregator checks before it accepts any chunk of an update."""

    round_id: str
    client_id: str
    key_id: str
    spec_hash: str
    num_ciphertexts: int
    num_chunks: int
    digest: bytes
    format_version: int = FORMAT_VERSION


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A run of consecutive ciphertexts with its own checksum."""

    index: int
    ciphertexts: tuple[bytes, ...]
    sha256: bytes


def chunk_digest(ciphertexts: Iterable[bytes]) -> bytes:
    """SHA-256 over length-prefixed ciphertexts (the prefix makes the split unambiguous)."""
    h = hashlib.sha256()
    for ct in ciphertexts:
        h.update(struct.pack(">I", len(ct)))
        h.update(ct)
    return h.digest()


def seal_update(
    round_id: str, client_id: str, key_id: str, spec_hash: str, ciphertexts: list[bytes]
) -> tuple[Header, list[Chunk]]:
    """Wrap ciphertexts into a header and checksummed chunks."""
    chunks = [
        Chunk(i, tuple(ciphertexts[s : s + CIPHERTEXTS_PER_CHUNK]), chunk_digest(ciphertexts[s : s + CIPHERTEXTS_PER_CHUNK]))
        for i, s in enumerate(range(0, len(ciphertexts), CIPHERTEXTS_PER_CHUNK))
    ]
    header = Header(round_id, client_id, key_id, spec_hash, len(ciphertexts), len(chunks), chunk_digest(ciphertexts))
    return header, chunks


class ChunkValidator:
    """Checks a stream of chunks against its header, one chunk at a time."""

    def __init__(self, header: Header) -> None:
        self.header = header
        self._next_index = 0
        self._count = 0
        self._digest = hashlib.sha256()

    def accept(self, chunk: Chunk) -> tuple[bytes, ...]:
        """Validate ``chunk``; return its ciphertexts (still unparsed) if it is in order and intact."""
        if chunk.index != self._next_index:
            raise EnvelopeError(
                f"chunk {chunk.index} arrived where chunk {self._next_index} was expected; resend the whole update"
            )
        if chunk.index >= self.header.num_chunks:
            raise EnvelopeError(f"chunk {chunk.index} is beyond the {self.header.num_chunks} chunks the header announced")
        if self._count + len(chunk.ciphertexts) > self.header.num_ciphertexts:
            raise EnvelopeError(
                f"more ciphertexts than the {self.header.num_ciphertexts} the header announced; resend the update"
            )
        for ct in chunk.ciphertexts:
            if len(ct) > MAX_CIPHERTEXT_BYTES:
                raise EnvelopeError(f"a ciphertext of {len(ct)} bytes is larger than any valid one ({MAX_CIPHERTEXT_BYTES})")
        if chunk_digest(chunk.ciphertexts) != chunk.sha256:
            raise EnvelopeError(f"chunk {chunk.index} failed its checksum: the data was corrupted in transit; resend")
        for ct in chunk.ciphertexts:
            self._digest.update(struct.pack(">I", len(ct)))
            self._digest.update(ct)
        self._next_index += 1
        self._count += len(chunk.ciphertexts)
        return chunk.ciphertexts

    def finish(self) -> None:
        """Call after the last chunk: checks nothing is missing and the overall digest matches."""
        if self._next_index != self.header.num_chunks or self._count != self.header.num_ciphertexts:
            raise EnvelopeError(
                f"update is truncated: got {self._next_index} of {self.header.num_chunks} chunks "
                f"({self._count} of {self.header.num_ciphertexts} ciphertexts); resend the whole update"
            )
        if self._digest.digest() != self.header.digest:
            raise EnvelopeError("the update's digest does not match its header; it was altered or corrupted; resend")


def iter_chunks(header: Header, chunks: Iterable[Chunk]) -> Iterator[bytes]:
    """Validate a whole stream and yield its ciphertexts; for the client reading an aggregate."""
    validator = ChunkValidator(header)
    for chunk in chunks:
        yield from validator.accept(chunk)
    validator.finish()
