"""Masks modulo the data prime q: AES-256-CTR streams keyed by HKDF, uniform modulo q by rejection.

A mask is defined per (secret, purpose, ciphertext index): the aggregator and every site derive the
same words from the same secret. The stream is cryptographic (a mask must be unpredictable without
its secret: a non-cryptographic generator seeded with 32 bits, as some peers use, can be searched).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LOW60 = np.uint64((1 << 60) - 1)


class MaskStream:
    """The mask words of one secret for one purpose (``context``: the round and the pair or site it serves)."""

    def __init__(self, secret: bytes, context: bytes, q: int) -> None:
        if not (1 << 59) < q < (1 << 60):
            raise ValueError("masks are drawn for a 60-bit data prime")
        self.key = HKDF(hashes.SHA256(), 32, salt=b"secagg-mask-v1", info=context).derive(secret)
        self.q = np.uint64(q)

    def words(self, index: int, n: int) -> np.ndarray:
        """``n`` words uniform in [0, q) for ciphertext ``index`` (each index has its own counter range)."""
        enc = Cipher(algorithms.AES(self.key), modes.CTR(index.to_bytes(8, "big") + bytes(8))).encryptor()
        out = np.frombuffer(enc.update(bytes(8 * n)), dtype="<u8") & LOW60
        bad = np.flatnonzero(out >= self.q)
        while bad.size:  # probability 2^-44 per word: almost never, but exactly uniform when it happens
            out = out.copy() if not out.flags.writeable else out
            extra = np.frombuffer(enc.update(bytes(8 * bad.size)), dtype="<u8") & LOW60
            out[bad] = extra
            bad = bad[extra >= self.q]
        return out


def add_mod(row: np.ndarray, words: np.ndarray, q: np.uint64) -> None:
    """row += words mod q, in place (both < q < 2^60)."""
    np.add(row, words, out=row)
    np.minimum(row, row - q, out=row)


def sub_mod(row: np.ndarray, words: np.ndarray, q: np.uint64) -> None:
    """row -= words mod q, in place."""
    np.subtract(row, words, out=row)
    np.minimum(row, row + q, out=row)
