"""The aggregator's arithmetic (secagg.polys): strict parsing of first polynomials and exact sums modulo q.

The aggregator parses no ciphertext with SEAL: a first polynomial is N little-endian uint64 words,
each below the data prime q, and sums are computed with numpy. Everything here is checked against
Python's arbitrary-precision integers, so a wrap-around in uint64 arithmetic would show.
"""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import CiphertextError
from secagg.keys import DATA_PRIME, Parameters
from secagg.polys import SEED_BYTES, C0Sum, c0_bytes, check_seed, parse_c0

PARAMS = Parameters()
N = PARAMS.poly_modulus_degree
Q = DATA_PRIME


def _words(values) -> bytes:
    return np.asarray(values, dtype="<u8").tobytes()


def _random_row(rng: np.random.Generator, near_q: bool = False) -> np.ndarray:
    """N coefficients below q; ``near_q``: all within 2^20 of q, where a sum of two wraps past 2^60."""
    if near_q:
        return (Q - 1 - rng.integers(0, 2**20, size=N, dtype=np.uint64)).astype(np.uint64)
    return rng.integers(0, Q, size=N, dtype=np.uint64)


def test_parameters_and_wire_size():
    assert PARAMS.data_prime == Q and Q < 2**60 and c0_bytes(PARAMS) == 8 * N == 65_536


def test_parse_c0_returns_the_coefficients(rng):
    row = _random_row(rng)
    row[0], row[-1] = 0, Q - 1  # both ends of the valid range
    words = parse_c0(PARAMS, _words(row))
    assert words.dtype == np.dtype("<u8") and words.shape == (N,)
    np.testing.assert_array_equal(words, row)


@pytest.mark.parametrize("size", [0, 8, 8 * N - 1, 8 * N - 8, 8 * N + 1, 8 * N + 8, 16 * N])
def test_parse_c0_refuses_every_other_size(size):
    with pytest.raises(CiphertextError, match=f"a ciphertext polynomial of {size} bytes; this federation's are "
                                              f"{8 * N} bytes"):
        parse_c0(PARAMS, bytes(size))


@pytest.mark.parametrize("bad", [Q, Q + 1, 2**60, 2**63, 2**64 - 1])
@pytest.mark.parametrize("position", [0, 4097, N - 1])
def test_parse_c0_refuses_any_coefficient_not_below_q(rng, bad, position):
    row = _random_row(rng)
    row[position] = bad
    with pytest.raises(CiphertextError, match="coefficient is not below the federation's modulus"):
        parse_c0(PARAMS, _words(row))
    row[position] = Q - 1
    parse_c0(PARAMS, _words(row))  # one below q is a valid coefficient


def test_check_seed_size():
    seed = bytes(range(SEED_BYTES))
    assert check_seed(seed) == seed
    for size in (0, SEED_BYTES - 1, SEED_BYTES + 1):
        with pytest.raises(CiphertextError, match=f"a ciphertext seed of {size} bytes; seeds are {SEED_BYTES}"):
            check_seed(bytes(size))


def _reference(rows: list[np.ndarray]) -> list[int]:
    """The sum modulo q with Python integers (no overflow possible)."""
    out = [0] * N
    for row in rows:
        out = [(a + int(b)) % Q for a, b in zip(out, row.tolist())]
    return out


@pytest.mark.parametrize("near_q", [False, True], ids=["uniform", "near-q"])
def test_c0sum_add_is_exact_modulo_q(rng, near_q):
    rows = [_random_row(rng, near_q) for _ in range(7)]
    acc = C0Sum(PARAMS, 2)
    for row in rows:
        acc.add(1, parse_c0(PARAMS, _words(row)))
    assert acc.words[1].tolist() == _reference(rows)
    assert not acc.words[0].any()  # positions are independent
    assert int(acc.words.max()) < Q
    # The bytes the aggregate file stores are the same words, little-endian.
    np.testing.assert_array_equal(np.frombuffer(acc.row_bytes(1), dtype="<u8"), acc.words[1])


@pytest.mark.parametrize("near_q", [False, True], ids=["uniform", "near-q"])
def test_c0sum_subtract_undoes_add_exactly(rng, near_q):
    rows = [_random_row(rng, near_q) for _ in range(5)]
    acc = C0Sum(PARAMS, 1)
    for row in rows:
        acc.add(0, row)
    before = acc.words[0].copy()
    extra = _random_row(rng, near_q)
    acc.add(0, extra)
    acc.subtract(0, extra)
    np.testing.assert_array_equal(acc.words[0], before)
    # Removing a contribution from the middle leaves the sum of the others.
    acc.subtract(0, rows[2])
    assert acc.words[0].tolist() == _reference(rows[:2] + rows[3:])
    # Removing every contribution leaves zero (the first contribution rolled back: an empty position).
    for row in rows[:2] + rows[3:]:
        acc.subtract(0, row)
    assert not acc.words[0].any()


def test_c0sum_of_opposite_rows_wraps_to_zero(rng):
    """q - a + a = q = 0 mod q: the boundary case of the conditional subtraction."""
    row = _random_row(rng)
    row[row == 0] = 1
    acc = C0Sum(PARAMS, 1)
    acc.add(0, row)
    acc.add(0, (np.uint64(Q) - row).astype(np.uint64))
    assert not acc.words[0].any()
