"""Shamir secret sharing of short secrets (<= 64 bytes) over the prime field GF(2^521 - 1).

A secret is the constant term of a random polynomial of degree ``threshold - 1``; holder ``x``
(a positive integer, distinct per holder) gets its value at ``x``. Any ``threshold`` shares give the
secret back (Lagrange interpolation at 0); fewer reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from secagg.errors import MaskingError

PRIME = (1 << 521) - 1  # a Mersenne prime: larger than any 64-byte secret
SHARE_BYTES = 66
MAX_SECRET_BYTES = 64


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` for each holder x in ``holders``; any ``threshold`` of them recover it."""
    if len(secret) > MAX_SECRET_BYTES:
        raise MaskingError(f"a secret of {len(secret)} bytes; at most {MAX_SECRET_BYTES} can be shared")
    if not 1 <= threshold <= len(holders):
        raise MaskingError(f"threshold {threshold} for {len(holders)} share holders: it must be between 1 and the "
                           "number of holders")
    if len(set(holders)) != len(holders) or any(not 0 < x < PRIME for x in holders):
        raise MaskingError("share holders need distinct positive indices")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _eval(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in holders}


def combine(shares: Mapping[int, bytes], threshold: int, size: int) -> bytes:
    """The secret (``size`` bytes) from ``threshold`` of its shares (the first ones by holder index).

    Fewer shares raise :class:`MaskingError`; wrong shares give a wrong secret, which callers check
    against a commitment.
    """
    if len(shares) < threshold:
        raise MaskingError(f"{len(shares)} share(s) of a secret that needs {threshold}")
    points = sorted(shares.items())[:threshold]
    xs = [x for x, _ in points]
    ys = [int.from_bytes(y, "big") for _, y in points]
    if any(y >= PRIME for y in ys) or any(len(y) != SHARE_BYTES for _, y in points):
        raise MaskingError("a share is not an element of the sharing field")
    secret = 0
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * size):
        raise MaskingError("the shares do not combine to a secret of the expected size: at least one is wrong")
    return secret.to_bytes(size, "big")


def _eval(coeffs: list[int], x: int) -> int:
    y = 0
    for c in reversed(coeffs):
        y = (y * x + c) % PRIME
    return y
