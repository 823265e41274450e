"""A client's two ends of a round, transport-free: sealing an update, and opening a sum it fetched.

``seal_update``: a flat parameter vector -> slot vectors with count and check slots
(:mod:`secagg.slots`) -> seeded ciphertexts (:mod:`secagg.ciphertexts`) -> checksummed chunks and a
header carrying the contribution record (:mod:`secagg.envelope`, :mod:`secagg.contribution`).

``open_aggregate``: what the aggregator served (every contributor's record and seeds, the summed
first polynomials) -> checks of every record -> rebuilt second polynomials -> decryption -> count
and integrity checks of every ciphertext -> rounding to the release grid (:mod:`secagg.release`)
-> the weighted average. Nothing the aggregator served is trusted before it passed its check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from secagg import ciphertexts, contribution, envelope, slots
from secagg.contribution import Contribution
from secagg.errors import AggregateCheckError, EnvelopeError
from secagg.keys import ClientKey
from secagg.packing import ModelSpec
from secagg.polys import SEED_BYTES, c0_bytes
from secagg.release import grid, release
from secagg.rounds import RoundStatus
from secagg.slots import Bounds

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class SealedUpdate:
    """An encrypted update ready to stream: its header (with the contribution record) and chunks."""

    header: envelope.Header
    chunks: list[envelope.Chunk]

    @property
    def wire_bytes(self) -> int:
        """Payload bytes: polynomials, seeds, digests and the contribution record."""
        r = self.header.contribution
        return (sum(len(c0) + len(seed) for c in self.chunks for c0, seed in zip(c.c0s, c.seeds))
                + sum(len(c.digest) for c in self.chunks) + len(self.header.digest)
                + len(r.tag) + len(r.seeds_digest) + len(r.certificate) + len(r.signature))


@dataclasses.dataclass(frozen=True)
class Average:
    """A decrypted, checked and released aggregate: the weighted mean as a flat vector and its context."""

    spec: ModelSpec
    vector: np.ndarray
    contributions: int
    clients: tuple[str, ...]
    total_weight: float


def bounds(status: RoundStatus) -> Bounds:
    return Bounds(status.expected, status.max_weight, status.value_bound)


def checks(key: ClientKey, round_id: str) -> slots.Checks:
    """The round's secret check signs, from this federation's key."""
    return slots.Checks(key.derive(contribution.CHECK_LABEL), round_id)


def encrypt_update(key: ClientKey, status: RoundStatus, theta: np.ndarray, weight: float,
                   progress: Progress | None = None) -> list[tuple[bytes, bytes]]:
    """``theta`` (the flat parameter vector, in the round's spec order) times ``weight`` as seeded ciphertexts
    (c0, seed), with the round's count and check slots."""
    vector = slots.encode_update(theta, float(weight), bounds(status), checks(key, status.round_id))
    return ciphertexts.encrypt(key, vector, progress=progress)


def seal_ciphertexts(key: ClientKey, status: RoundStatus, client_id: str, cts: list[tuple[bytes, bytes]],
                     tls=None) -> SealedUpdate:
    """Chunks, digest and the contribution record of ciphertexts as they will be sent (masked or not).

    ``tls`` with a client certificate also signs the contribution (mutual TLS).
    """
    chunks = envelope.split_chunks(cts)
    digest = envelope.update_digest(c.digest for c in chunks)
    record = contribution.make(key, status.terms(), client_id, digest,
                               contribution.seeds_digest(seed for _, seed in cts), tls)
    header = envelope.Header(status.round_id, client_id, key.key_id, status.spec_hash, len(cts), len(chunks),
                             digest, record)
    return SealedUpdate(header, chunks)


def seal_update(key: ClientKey, status: RoundStatus, client_id: str, theta: np.ndarray, weight: float,
                tls=None, progress: Progress | None = None) -> SealedUpdate:
    """Encrypt ``theta`` times ``weight`` for the round and seal it (:func:`encrypt_update`, :func:`seal_ciphertexts`)."""
    return seal_ciphertexts(key, status, client_id, encrypt_update(key, status, theta, weight, progress), tls)


def open_chunks(key: ClientKey, status: RoundStatus, head, contributions: int,
                chunks: Iterable[envelope.Chunk]) -> Iterator[tuple[bytes, bytes]]:
    """The served sum's (c0 sum, every contributor's seeds) per ciphertext, after the envelope's checks."""
    if head.key_id != key.key_id or head.spec_hash != status.spec_hash:
        raise EnvelopeError("the aggregate's header does not match the round's key id or model spec")
    want = slots.num_ciphertexts(status.num_params)
    if head.num_ciphertexts != want:
        raise AggregateCheckError(f"the aggregate has {head.num_ciphertexts} ciphertexts; the round's model needs {want}")
    header = envelope.Header(status.round_id, "", head.key_id, head.spec_hash, head.num_ciphertexts, head.num_chunks,
                             head.digest)
    return envelope.iter_chunks(header, chunks, c0_bytes(key.parameters), SEED_BYTES * max(contributions, 1),
                                per_chunk=None)


def open_aggregate(key: ClientKey, status: RoundStatus, spec: ModelSpec, records: list[Contribution],
                   pairs: list[tuple[bytes, bytes]], tls=None, min_cohort: int = 3,
                   progress: Progress | None = None) -> Average:
    """Check, decrypt and release a served sum (see the module docstring); raises before anything is released."""
    n = len(records)
    if len(pairs) != slots.num_ciphertexts(spec.num_params):
        raise AggregateCheckError(f"the aggregate has {len(pairs)} ciphertexts; the round's model needs "
                                  f"{slots.num_ciphertexts(spec.num_params)}")
    seeds = [[joined[j * SEED_BYTES:(j + 1) * SEED_BYTES] for j in range(n)] for _, joined in pairs]
    per_client = [b"".join(ct[j] for ct in seeds) for j in range(n)]
    ca = tls.ca.read_bytes() if tls is not None and tls.cert is not None else None
    contribution.verify(key, status.terms(), records, per_client, ca_pem=ca, enrolled=status.enrolled,
                        min_cohort=min_cohort)
    reals = ciphertexts.decrypt(key, [c0 for c0, _ in pairs], seeds, progress=progress)
    sums = slots.decode_aggregate(reals, spec.num_params, n, checks(key, status.round_id))
    # Never hand out a raw CKKS decryption: round to the absolute grid first (secagg.release).
    released = release(sums, n)
    wsum = float(released[-1])
    b = bounds(status)
    if not 0 < wsum <= n * b.headroom + grid(n):  # rounding to the grid may lift it by up to half a step
        raise AggregateCheckError(f"the decrypted total weight {wsum:.6g} is impossible; the aggregate is corrupted")
    return Average(spec, released[:-1] / wsum, n, tuple(r.client_id for r in records),
                   wsum * b.max_weight / b.headroom)
