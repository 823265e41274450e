"""What a ciphertext's 8,192 reals hold (secagg.slots): data, a count slot and secret check slots.

Sums are real: clients' slot vectors are encrypted with TenSEAL, their first polynomials added modulo
q as the aggregator adds them (secagg.polys), and the sum decrypted from every contributor's seed
(secagg.ciphertexts). A tampered sum is made by leaving out, repeating or shifting what the
aggregator could leave out, repeat or shift.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from secagg import ciphertexts
from secagg.contribution import CHECK_LABEL
from secagg.errors import AggregateCheckError, OverflowRiskError
from secagg.polys import C0Sum, parse_c0
from secagg.release import grid, noise_std
from secagg.slots import (
    CHECK_SCALE,
    CHECK_SIGMAS,
    CHECK_SLOTS,
    COUNT_SLOT,
    DATA_SLOTS,
    REALS_PER_CIPHERTEXT,
    VALUE_LIMIT,
    Bounds,
    Checks,
    decode_aggregate,
    encode_update,
    num_ciphertexts,
)


def _checks(key, round_id: str = "r1") -> Checks:
    return Checks(key.derive(CHECK_LABEL), round_id)


def _encrypt_all(key, vectors):
    return [ciphertexts.encrypt(key, v) for v in vectors]


def _aggregate(key, updates, left_out: dict[int, int] | None = None, repeated: dict[int, int] | None = None):
    """Decrypted sum of ``updates`` (each a list of (c0, seed)) as the aggregator would add them.

    ``left_out``/``repeated``: {ciphertext index: update index} that the aggregator leaves out of,
    or adds twice to, that one ciphertext (its c0 and its seed alike).
    """
    left_out, repeated = left_out or {}, repeated or {}
    n = len(updates[0])
    acc = C0Sum(key.parameters, n)
    seeds: list[list[bytes]] = [[] for _ in range(n)]
    for i in range(n):
        for j, update in enumerate(updates):
            times = 0 if left_out.get(i) == j else 2 if repeated.get(i) == j else 1
            for _ in range(times):
                acc.add(i, parse_c0(key.parameters, update[i][0]))
                seeds[i].append(update[i][1])
    return ciphertexts.decrypt(key, [acc.row_bytes(i) for i in range(n)], seeds)


def _tolerance(contributions: int) -> float:
    # A check slot holds c / CHECK_SCALE: its noise counts CHECK_SCALE times, the data's once.
    return CHECK_SIGMAS * math.sqrt(CHECK_SCALE**2 + 1.0) * noise_std(contributions)


# -- layout -----------------------------------------------------------------------------------------


def test_layout_of_an_update(client_key, rng):
    bounds = Bounds(4, 100.0, 5.0)
    theta = rng.uniform(-5, 5, DATA_SLOTS + 10)  # the weight lands in the second ciphertext
    checks = _checks(client_key)
    out = encode_update(theta, 25.0, bounds, checks)
    w = bounds.headroom * 25.0 / 100.0
    assert num_ciphertexts(theta.size) == 2 and out.shape == (2 * REALS_PER_CIPHERTEXT,)
    blocks = out.reshape(2, REALS_PER_CIPHERTEXT)
    data = blocks[:, :DATA_SLOTS].reshape(-1)
    np.testing.assert_array_equal(data[:theta.size], theta * w)
    assert data[theta.size] == w and not data[theta.size + 1:].any()
    assert COUNT_SLOT == DATA_SLOTS and DATA_SLOTS + 1 + CHECK_SLOTS == REALS_PER_CIPHERTEXT == 8192
    for i, block in enumerate(blocks):
        assert block[COUNT_SLOT] == 1.0  # a count in EVERY ciphertext, not only the last
        np.testing.assert_allclose(CHECK_SCALE * block[COUNT_SLOT + 1:], checks.signs(i) @ block[:DATA_SLOTS], rtol=0,
                                   atol=1e-9)


@pytest.mark.parametrize("num_params, expected", [(1, 1), (DATA_SLOTS - 1, 1), (DATA_SLOTS, 2), (2 * DATA_SLOTS, 3),
                                                  (1_000_000, 123)])
def test_num_ciphertexts(num_params, expected):
    assert num_ciphertexts(num_params) == expected


# -- the honest sum ---------------------------------------------------------------------------------


def test_honest_sum_passes_every_check(client_key, rng):
    # Values within a quarter of the bound: spread over the whole range at the max weight, the check
    # slots of random values would reach the per-client limit (see test_check_slot_overflow_is_guarded).
    bounds = Bounds(3, 10.0, 8.0)
    checks = _checks(client_key)
    thetas = [rng.uniform(-2, 2, DATA_SLOTS + 500) for _ in range(3)]
    weights = [1.0, 4.0, 10.0]
    vectors = [encode_update(t, w, bounds, checks) for t, w in zip(thetas, weights)]
    reals = _aggregate(client_key, _encrypt_all(client_key, vectors))
    blocks = reals.reshape(2, REALS_PER_CIPHERTEXT)
    assert np.all(np.abs(blocks[:, COUNT_SLOT] - 3.0) < 10 * noise_std(3))
    sums = decode_aggregate(reals, thetas[0].size, 3, checks)
    exact = np.sum(vectors, axis=0).reshape(2, REALS_PER_CIPHERTEXT)[:, :DATA_SLOTS].reshape(-1)[:sums.size]
    # Only the CKKS noise separates the decryption from the exact sum (10 sigma: never exceeded in practice).
    assert np.max(np.abs(sums - exact)) < 10 * noise_std(3)


def test_worst_case_sum_stays_inside_the_ckks_range(client_key):
    """N clients at max weight with every value at +bound: the sum (2^18 in every data slot) decrypts
    without wrapping around."""
    bounds = Bounds(5, 50.0, 3.0)
    theta = np.full(500, 3.0)
    # The round's secret signs decide the check slots of a constant vector; take a round whose
    # checks fit (their own guard is tested below), so that this test is about the data slots.
    checks = next(c for c in (_checks(client_key, f"r{i}") for i in range(50))
                  if np.max(np.abs(c.signs(0) @ np.r_[theta, 1.0, np.zeros(DATA_SLOTS - 501)])) * bounds.headroom
                  <= VALUE_LIMIT / 5)
    vector = encode_update(theta, 50.0, bounds, checks)
    assert vector[0] * 5 == pytest.approx(VALUE_LIMIT)
    reals = _aggregate(client_key, _encrypt_all(client_key, [vector] * 5))
    sums = decode_aggregate(reals, theta.size, 5, checks)
    assert np.max(np.abs(sums[:500] - VALUE_LIMIT)) < 10 * noise_std(5)
    assert abs(sums[500] - 5 * bounds.headroom) < 10 * noise_std(5)


# -- the count slot ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_updates(client_key):
    """Three clients' encrypted updates of two ciphertexts each, and the round's checks."""
    rng = np.random.default_rng(7)
    bounds = Bounds(3, 10.0, 1.0)
    checks = _checks(client_key, "count-round")
    vectors = [encode_update(rng.uniform(-1, 1, DATA_SLOTS + 100), 5.0, bounds, checks) for _ in range(3)]
    return _encrypt_all(client_key, vectors), checks, DATA_SLOTS + 100


def test_count_slot_catches_a_contribution_left_out_of_one_ciphertext(client_key, three_updates):
    updates, checks, num_params = three_updates
    decode_aggregate(_aggregate(client_key, updates), num_params, 3, checks)  # the honest sum passes
    # The aggregator drops client 2 from the second ciphertext only: the first one is healthy.
    reals = _aggregate(client_key, updates, left_out={1: 2})
    with pytest.raises(AggregateCheckError, match=r"ciphertext 1 of the sum counts 2 contributions but the round "
                                                  r"lists 3"):
        decode_aggregate(reals, num_params, 3, checks)


def test_count_slot_catches_a_contribution_repeated_in_one_ciphertext(client_key, three_updates):
    updates, checks, num_params = three_updates
    reals = _aggregate(client_key, updates, repeated={0: 1})
    with pytest.raises(AggregateCheckError, match=r"ciphertext 0 of the sum counts 4 contributions but the round "
                                                  r"lists 3"):
        decode_aggregate(reals, num_params, 3, checks)


def test_count_slot_catches_a_wrong_number_of_contributions(client_key, three_updates):
    updates, checks, num_params = three_updates
    reals = _aggregate(client_key, updates)
    for claimed in (2, 4):
        with pytest.raises(AggregateCheckError, match=f"ciphertext 0 of the sum counts 3 contributions but the round "
                                                      f"lists {claimed}"):
            decode_aggregate(reals, num_params, claimed, checks)


# -- the check slots --------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [0, 1])
def test_a_shift_beyond_the_tolerance_is_refused(client_key, three_updates, block):
    """A data slot moved by x moves every check by x / sqrt(DATA_SLOTS): refused once that exceeds the
    tolerance 10 * sqrt(CHECK_SCALE^2 + 1) * sigma, accepted below it (no stricter than documented)."""
    updates, checks, num_params = three_updates
    honest = _aggregate(client_key, updates)
    tau = _tolerance(3)
    step = tau * math.sqrt(DATA_SLOTS)  # the shift of one slot that moves each check by exactly tau
    slot = block * REALS_PER_CIPHERTEXT + 1234

    small = honest.copy()
    small[slot] += 0.5 * step
    decode_aggregate(small, num_params, 3, checks)

    large = honest.copy()
    large[slot] += 1.5 * step
    with pytest.raises(AggregateCheckError, match=f"ciphertext {block} of the sum fails its integrity check"):
        decode_aggregate(large, num_params, 3, checks)
    # 1.5 * tau * 90 is below half a release grid step (secagg.release), invisible in what a site releases,
    # yet it is refused.
    assert 1.5 * step < grid(3) / 2


def test_a_dense_shift_is_refused(client_key, three_updates, rng):
    updates, checks, num_params = three_updates
    honest = _aggregate(client_key, updates)
    shifted = honest.copy()
    delta = rng.standard_normal(DATA_SLOTS)
    # L2 norm 100 x the tolerance per check: each check moves by about 100 tau, independently.
    shifted[:DATA_SLOTS] += delta / np.linalg.norm(delta) * 100 * _tolerance(3) * math.sqrt(DATA_SLOTS)
    with pytest.raises(AggregateCheckError, match="ciphertext 0 of the sum fails its integrity check"):
        decode_aggregate(shifted, num_params, 3, checks)


def test_checks_of_another_round_refuse_the_sum(client_key, three_updates):
    """A sum made for one round does not pass the checks of another (the signs are per round)."""
    updates, _, num_params = three_updates
    with pytest.raises(AggregateCheckError, match="integrity check"):
        decode_aggregate(_aggregate(client_key, updates), num_params, 3, _checks(client_key, "another-round"))


def test_check_signs_are_secret_per_round_and_ciphertext(client_key, other_client_key):
    a = _checks(client_key, "r1").signs(0)
    assert a.shape == (CHECK_SLOTS, DATA_SLOTS)
    assert set(np.unique(a * math.sqrt(DATA_SLOTS)).round(12)) == {-1.0, 1.0}
    # Balanced (a fair coin per sign): within 6 standard deviations of half.
    assert abs(np.mean(a > 0) - 0.5) < 6 * 0.5 / math.sqrt(a.size)
    np.testing.assert_array_equal(a, _checks(client_key, "r1").signs(0))  # deterministic: every client agrees
    for other in (_checks(client_key, "r2").signs(0), _checks(client_key, "r1").signs(1),
                  _checks(other_client_key, "r1").signs(0)):
        # Another round, ciphertext or federation: unrelated signs (about half agree).
        agree = np.mean(np.sign(other) == np.sign(a))
        assert abs(agree - 0.5) < 6 * 0.5 / math.sqrt(a.size)
    # Rows of one ciphertext are unrelated to each other as well.
    assert abs(np.mean(np.sign(a[0]) == np.sign(a[1])) - 0.5) < 6 * 0.5 / math.sqrt(DATA_SLOTS)


def test_check_slot_overflow_is_guarded(client_key):
    """Values aligned with a check's secret signs make that check sqrt(DATA_SLOTS) = 90 times the slot value;
    even stored at 1/CHECK_SCALE it could wrap around in the sum: the client refuses to encrypt it."""
    bounds = Bounds(4, 100.0, 1.0)
    checks = _checks(client_key, "guard")
    aligned = np.sign(checks.signs(0)[0]) * bounds.value_bound  # every value at the bound, signs of check 0
    with pytest.raises(OverflowRiskError, match="line up with a secret integrity check so far that its slot could "
                                                "overflow; create the round with a larger --value-bound"):
        encode_update(aligned, 100.0, bounds, checks)
    # Check 0 is about 90/4 x the weighted value; at a 40th of the max weight it fits within the limit again.
    out = encode_update(aligned, 2.5, bounds, checks)
    assert 0 < np.max(np.abs(out[COUNT_SLOT + 1:])) <= VALUE_LIMIT / bounds.expected_clients


def test_values_anywhere_within_the_bound_do_not_trip_the_guard(client_key, rng):
    """Uniform values over the whole bound at the max weight: their checks have a standard deviation of
    bound / sqrt(3), and stored at 1/4 they fit with room for 6.9 standard deviations (before the check
    scale, 47 of 50 such rounds were refused)."""
    bounds = Bounds(3, 10.0, 2.0)
    for r in range(50):
        encode_update(rng.uniform(-2, 2, 8000), 10.0, bounds, _checks(client_key, f"spread-{r}"))


# -- refusals before encryption ---------------------------------------------------------------------


def _encode(theta, weight, bounds, key):
    return encode_update(np.asarray(theta, dtype=float), weight, bounds, _checks(key))


def test_overflow_weight_above_max_weight(client_key):
    with pytest.raises(OverflowRiskError, match=r"weight 2000 exceeds the round's max weight 1000.*--max-weight 2000"):
        _encode(np.zeros(10), 2000.0, Bounds(3, 1000.0, 10.0), client_key)


def test_overflow_value_above_bound(client_key):
    theta = np.zeros(10)
    theta[4] = -12.5
    with pytest.raises(OverflowRiskError, match=r"magnitude 12.5 exceeds the round's value bound 10.*--value-bound 16"):
        _encode(theta, 1.0, Bounds(3, 1000.0, 10.0), client_key)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_overflow_nan_or_inf(client_key, bad):
    theta = np.zeros(10)
    theta[3] = bad
    with pytest.raises(OverflowRiskError, match="NaN or infinite"):
        _encode(theta, 1.0, Bounds(3, 1000.0, 10.0), client_key)


@pytest.mark.parametrize("weight", [0.0, -1.0, np.nan, np.inf])
def test_weight_must_be_positive_and_finite(client_key, weight):
    with pytest.raises(OverflowRiskError, match="weight must be a positive finite number"):
        _encode(np.zeros(10), weight, Bounds(3, 1000.0, 10.0), client_key)


@pytest.mark.parametrize("bounds, match", [
    (Bounds(0, 1.0, 1.0), "at least 1 expected client"),
    (Bounds(2, 0.0, 1.0), "max weight must be a positive number"),
    (Bounds(2, float("inf"), 1.0), "max weight must be a positive number"),
    (Bounds(2, 1.0, -1.0), "value bound must be a positive number"),
    (Bounds(2**18 + 1, 1.0, 1.0), "clients fit in one round's count slot"),
])
def test_bounds_check_refuses_nonsense(bounds, match):
    with pytest.raises(OverflowRiskError, match=match):
        bounds.check()


def test_headroom_keeps_every_partial_sum_below_the_limit():
    b = Bounds(7, 300.0, 2.5)
    assert b.headroom * b.expected_clients * b.value_bound == pytest.approx(VALUE_LIMIT)
    assert VALUE_LIMIT == 2.0**18
