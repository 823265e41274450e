"""The aggregator's arithmetic: first polynomials of seeded CKKS ciphertexts, added modulo the data prime.

A client's ciphertext is seeded: (c0, seed), where the second polynomial c1 = PRG(seed) is never
sent. The aggregator adds the clients' c0 polynomials coefficient by coefficient modulo the data
prime q (they are in NTT form; addition is the same in either form) and keeps every client's
seeds. It never expands a seed and never parses anything with SEAL: the wire format below is its
own, parsed strictly (exact sizes, every coefficient < q), so the aggregator needs neither TenSEAL
nor SEAL, and cannot change the c1 that clients rebuild from the seeds they received.

Wire format of one ciphertext: ``c0`` = N little-endian uint64 words (N = 8192: 65,536 bytes),
``seed`` = the 64 bytes of SEAL's Blake2xb seed of c1. 8,192 reals per ciphertext: 8.0 bytes per
real plus 64 bytes of seed.
"""

from __future__ import annotations

import numpy as np

from secagg.errors import CiphertextError
from secagg.keys import Parameters

SEED_BYTES = 64


def c0_bytes(params: Parameters) -> int:
    return params.poly_modulus_degree * 8


def parse_c0(params: Parameters, blob: bytes) -> np.ndarray:
    """The coefficients of one first polynomial, after checking its exact size and that every word is < q."""
    if len(blob) != c0_bytes(params):
        raise CiphertextError(f"a ciphertext polynomial of {len(blob)} bytes; this federation's are "
                              f"{c0_bytes(params)} bytes: the update is truncated, padded or not secagg's; resend it "
                              "with the secagg client")
    words = np.frombuffer(blob, dtype="<u8")
    if int(words.max()) >= params.data_prime:
        raise CiphertextError("a ciphertext coefficient is not below the federation's modulus: the update is corrupt "
                              "or not encrypted for this federation; resend it with the secagg client")
    return words


def check_seed(blob: bytes) -> bytes:
    if len(blob) != SEED_BYTES:
        raise CiphertextError(f"a ciphertext seed of {len(blob)} bytes; seeds are {SEED_BYTES} bytes: resend the update "
                              "with the secagg client")
    return blob


class C0Sum:
    """The running sum of first polynomials, one per ciphertext position: O(model) memory for any number of clients."""

    def __init__(self, params: Parameters, length: int) -> None:
        self.params = params
        self.q = np.uint64(params.data_prime)
        self.words = np.zeros((length, params.poly_modulus_degree), dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.words)

    def add(self, index: int, words: np.ndarray) -> None:
        """Add one polynomial (already checked by :func:`parse_c0`) at ``index``, modulo q."""
        row = self.words[index]
        np.add(row, words, out=row)  # both < q < 2^60: no uint64 overflow
        # row - q wraps around to a huge number where row < q, so the minimum is row mod q: two passes.
        np.minimum(row, row - self.q, out=row)

    def subtract(self, index: int, words: np.ndarray) -> None:
        """Undo an :meth:`add` exactly (a rolled-back or quarantined submission)."""
        row = self.words[index]
        np.subtract(row, words, out=row)  # wraps where row < words; adding q back lands below q
        np.minimum(row, row + self.q, out=row)

    def row_bytes(self, index: int) -> bytes:
        return self.words[index].astype("<u8", copy=False).tobytes()
