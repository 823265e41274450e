"""Shamir sharing, masks modulo q, the neighbour graph: the pieces masked rounds are built from."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest

from secagg.errors import MaskingError
from secagg.masking import graph, shamir
from secagg.masking.prg import MaskStream, add_mod, sub_mod
from secagg.masking.settings import MaskSettings

Q = 1152921504606748673


def test_any_threshold_shares_recover_the_secret_and_fewer_do_not():
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}, 3, 32) == secret
    with pytest.raises(MaskingError, match="needs 3"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3, 32)
    # Two shares of a threshold-3 sharing are consistent with every secret: combining them as if the
    # threshold were 2 gives something unrelated.
    assert shamir.combine({1: shares[1], 2: shares[2]}, 2, 66)[-32:] != secret


def test_a_wrong_share_gives_a_wrong_secret():
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, [1, 2, 3], 2)
    bad = dict(shares)
    bad[1] = (int.from_bytes(bad[1], "big") ^ 1).to_bytes(shamir.SHARE_BYTES, "big")
    try:
        assert shamir.combine(bad, 2, 32) != secret
    except MaskingError:
        pass  # or it does not even fit 32 bytes


def test_masks_are_uniform_below_q_deterministic_and_cancel():
    a, b = MaskStream(b"s" * 32, b"ctx", Q), MaskStream(b"s" * 32, b"ctx", Q)
    w = a.words(5, 8192)
    assert np.array_equal(w, b.words(5, 8192))
    assert not np.array_equal(w, a.words(6, 8192))  # every ciphertext its own mask
    assert not np.array_equal(w, MaskStream(b"s" * 32, b"other", Q).words(5, 8192))  # bound to its context
    assert int(w.max()) < Q
    big = np.concatenate([a.words(i, 8192) for i in range(64)]).astype(np.float64) / Q
    assert abs(big.mean() - 0.5) < 0.01 and abs(big.std() - (1 / 12) ** 0.5) < 0.01
    row = np.random.default_rng(0).integers(0, Q, 8192, dtype=np.uint64)
    orig = row.copy()
    add_mod(row, w, np.uint64(Q))
    assert int(row.max()) < Q and not np.array_equal(row, orig)
    sub_mod(row, w, np.uint64(Q))
    assert np.array_equal(row, orig)


def test_rejection_keeps_words_below_q():
    # A prime just above 2^59 rejects about half the 60-bit words: the refill path runs on every call.
    q = (1 << 59) + 21
    w = MaskStream(b"k" * 32, b"c", q).words(0, 4096)
    assert int(w.max()) < q and len(w) == 4096


@pytest.mark.parametrize("n", [3, 5, 9, 10, 40, 100])
def test_neighbour_graph_is_symmetric_and_regular(n):
    members = [f"s{i}" for i in range(n)]
    k = graph.default_degree(n)
    g = graph.neighbours(members, k, b"seed")
    assert all(len(v) == min(k, n - 1) for v in g.values())
    assert all(a in g[b] for a in g for b in g[a])
    assert g == graph.neighbours(list(reversed(members)), k, b"seed")  # every site computes the same graph
    if k < n - 1:
        assert g != graph.neighbours(members, k, b"other seed")
        assert k <= 2 * np.ceil(np.log2(n)) + 1


def test_threshold_below_a_majority_is_refused():
    MaskSettings(threshold=3).validate(4)
    with pytest.raises(MaskingError, match="majority"):
        MaskSettings(threshold=2).validate(4)
    with pytest.raises(MaskingError, match="between"):
        MaskSettings(threshold=5).validate(4)
    with pytest.raises(MaskingError, match="at least 3 sites"):
        MaskSettings().validate(2)
    assert MaskSettings().threshold_for(4) == 3 and MaskSettings().threshold_for(10) == 5
