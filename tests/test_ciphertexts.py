"""CKKS encoding, encryption, wire size, overflow refusals and the aggregator's encrypted sum."""

from __future__ import annotations

import numpy as np
import pytest

from secagg import ciphertexts, envelope
from secagg.ciphertexts import EXTRA_SLOTS, REALS_PER_CIPHERTEXT, Bounds, EncryptedSum
from secagg.errors import AggregateCheckError, CiphertextError, OverflowRiskError


def _roundtrip(client_key, server_key, thetas, weights, bounds):
    n = ciphertexts.num_ciphertexts(thetas[0].size)
    acc = EncryptedSum(server_key, n)
    for theta, w in zip(thetas, weights):
        for i, blob in enumerate(ciphertexts.encrypt(client_key, ciphertexts.encode_update(theta, w, bounds))):
            acc.add(i, blob)
    vec = ciphertexts.decrypt(client_key, list(acc.iter_blobs()), thetas[0].size + EXTRA_SLOTS)
    return ciphertexts.decode_aggregate(vec, len(thetas), bounds)


def test_encrypt_decrypt_accuracy(client_key, server_key, rng):
    bounds = Bounds(1, 1000.0, 10.0)
    theta = rng.uniform(-10, 10, REALS_PER_CIPHERTEXT + 123)  # spans two ciphertexts, values at the bound
    mean, weight = _roundtrip(client_key, server_key, [theta], [250.0], bounds)
    assert mean.shape == theta.shape
    assert np.max(np.abs(mean - theta)) < 1e-7
    assert abs(weight - 250.0) < 1e-6


def test_weighted_sum_of_several(client_key, server_key, rng):
    bounds = Bounds(4, 100.0, 5.0)
    thetas = [rng.normal(0, 1, 3000) for _ in range(4)]
    weights = [1.0, 7.5, 30.0, 100.0]
    mean, total = _roundtrip(client_key, server_key, thetas, weights, bounds)
    expected = np.average(np.stack(thetas), axis=0, weights=weights)
    assert np.max(np.abs(mean - expected)) < 1e-7
    assert abs(total - sum(weights)) < 1e-5


def test_decrypted_layout_is_weighted_theta_then_weight_then_count(client_key, rng):
    bounds = Bounds(2, 10.0, 4.0)
    theta = rng.normal(0, 1, 100)
    vec = ciphertexts.encode_update(theta, 5.0, bounds)
    w = bounds.headroom * 5.0 / 10.0
    np.testing.assert_allclose(vec[:-2], theta * w)
    assert vec[-2] == pytest.approx(w) and vec[-1] == 1.0
    dec = ciphertexts.decrypt(client_key, ciphertexts.encrypt(client_key, vec), vec.size)
    assert np.max(np.abs(dec - vec)) < 1e-6


def test_wire_size_per_parameter_for_a_million_params(client_key, rng):
    n = 1_000_000
    theta = rng.normal(0, 0.05, n)
    blobs = ciphertexts.encrypt(client_key, ciphertexts.encode_update(theta, 1.0, Bounds(10, 1.0, 1.0)))
    assert len(blobs) == ciphertexts.num_ciphertexts(n) == 123
    header, chunks = envelope.seal_update("r", "c", client_key.key_id, "0" * 64, blobs)
    ct_bytes = sum(map(len, blobs))
    wire_bytes = ct_bytes + sum(len(c.sha256) for c in chunks) + len(header.digest)
    # Seeded ciphertexts: about 8 bytes per parameter. A full (unseeded) one would be about 16.
    assert ct_bytes / n <= 8.1, ct_bytes / n
    assert wire_bytes / n <= 8.1, wire_bytes / n
    assert all(len(b) <= envelope.MAX_CIPHERTEXT_BYTES for b in blobs)


def test_two_encryptions_of_the_same_vector_differ(client_key):
    vec = ciphertexts.encode_update(np.ones(1000), 1.0, Bounds(1, 1.0, 1.0))
    a = ciphertexts.encrypt(client_key, vec)
    b = ciphertexts.encrypt(client_key, vec)
    assert len(a) == len(b) == 1
    assert a[0] != b[0]
    # Both decrypt to the same values.
    da = ciphertexts.decrypt(client_key, a, vec.size)
    db = ciphertexts.decrypt(client_key, b, vec.size)
    assert np.max(np.abs(da - db)) < 1e-6


def test_overflow_weight_above_max_weight():
    with pytest.raises(OverflowRiskError, match=r"weight 2000 exceeds the round's max weight 1000.*--max-weight 2000"):
        ciphertexts.encode_update(np.zeros(10), 2000.0, Bounds(3, 1000.0, 10.0))


def test_overflow_value_above_bound():
    theta = np.zeros(10)
    theta[4] = -12.5
    with pytest.raises(OverflowRiskError, match=r"magnitude 12.5 exceeds the round's value bound 10.*--value-bound 16"):
        ciphertexts.encode_update(theta, 1.0, Bounds(3, 1000.0, 10.0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_overflow_nan_or_inf(bad):
    theta = np.zeros(10)
    theta[3] = bad
    with pytest.raises(OverflowRiskError, match="NaN or infinite"):
        ciphertexts.encode_update(theta, 1.0, Bounds(3, 1000.0, 10.0))


@pytest.mark.parametrize("weight", [0.0, -1.0, np.nan, np.inf])
def test_weight_must_be_positive_and_finite(weight):
    with pytest.raises(OverflowRiskError, match="weight must be a positive finite number"):
        ciphertexts.encode_update(np.zeros(10), weight, Bounds(3, 1000.0, 10.0))


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


def test_worst_case_sum_stays_inside_the_ckks_range(client_key, server_key):
    """N clients at max weight with every value at +bound: the sum decrypts exactly (no wrap-around)."""
    bounds = Bounds(5, 50.0, 3.0)
    theta = np.full(500, 3.0)
    mean, total = _roundtrip(client_key, server_key, [theta] * 5, [50.0] * 5, bounds)
    assert np.max(np.abs(mean - 3.0)) < 1e-7 and abs(total - 250.0) < 1e-5


def test_decode_aggregate_checks_the_count(client_key, server_key, rng):
    bounds = Bounds(2, 10.0, 1.0)
    thetas = [rng.uniform(-1, 1, 50) for _ in range(2)]
    acc = EncryptedSum(server_key, 1)
    for t in thetas:
        acc.add(0, ciphertexts.encrypt(client_key, ciphertexts.encode_update(t, 3.0, bounds))[0])
    vec = ciphertexts.decrypt(client_key, list(acc.iter_blobs()), 52)
    ciphertexts.decode_aggregate(vec, 2, bounds)  # right count: fine
    with pytest.raises(AggregateCheckError, match="counts 2 contributions but the aggregator accepted 3"):
        ciphertexts.decode_aggregate(vec, 3, bounds)
    broken = vec.copy()
    broken[-2] = -1.0
    with pytest.raises(AggregateCheckError, match="total weight"):
        ciphertexts.decode_aggregate(broken, 2, bounds)


def test_load_ciphertext_refuses_garbage(client_key, server_key):
    blob = ciphertexts.encrypt(client_key, np.zeros(10))[0]
    for bad in (b"", b"garbage" * 100, blob[: len(blob) // 2], blob[:16] + bytes(len(blob) - 16)):
        with pytest.raises(CiphertextError):
            ciphertexts.load_ciphertext(server_key, bad)
    ct = ciphertexts.load_ciphertext(server_key, blob)
    assert ct.size() == 2


def test_encrypted_sum_subtract_undoes_add_exactly(client_key, server_key, rng):
    """Rolling back a refused update must leave the sum exactly as before, including for the first one."""
    bounds = Bounds(3, 10.0, 2.0)
    a, b = rng.uniform(-1, 1, 200), rng.uniform(-1, 1, 200)
    blob_a = ciphertexts.encrypt(client_key, ciphertexts.encode_update(a, 2.0, bounds))[0]
    blob_b = ciphertexts.encrypt(client_key, ciphertexts.encode_update(b, 4.0, bounds))[0]
    acc = EncryptedSum(server_key, 1)

    # The first contribution at a position, rolled back: the position is empty again.
    acc.add(0, blob_a)
    acc.subtract(0, blob_a)
    with pytest.raises(CiphertextError, match="incomplete"):
        list(acc.iter_blobs())

    acc.add(0, blob_a)
    acc.add(0, blob_b)
    acc.subtract(0, blob_b)
    acc.add(0, blob_b)
    vec = ciphertexts.decrypt(client_key, list(acc.iter_blobs()), 202)
    mean, total = ciphertexts.decode_aggregate(vec, 2, bounds)
    assert np.max(np.abs(mean - (2 * a + 4 * b) / 6)) < 1e-8 and abs(total - 6.0) < 1e-8
