"""Audit 3: encryption is randomized.

Two encryptions of the same model under the same key share nothing: a ciphertext travels as its
first polynomial c0 (8,192 words) and the 64-byte seed of its second polynomial c1, with no header,
and neither c0, nor the seed, nor the c1 it expands to repeats. Both decrypt to the model. Through
a real aggregator, two sites submitting the same model send different bytes.
"""

from __future__ import annotations

import numpy as np

import secagg
from secagg import ciphertexts, slots
from secagg.updates import checks

from .conftest import N, RecordingRelay, second_polynomial, windows

SEED_BYTES = 64


def _c1(key, seed: bytes) -> bytes:
    """The second polynomial a seed expands to, as uint64 words."""
    return np.array(second_polynomial(key, [seed]), dtype="<u8").tobytes()


def _common_windows(a: bytes, b: bytes, size: int = 32) -> list[int]:
    """Offsets in ``a`` of the ``size``-byte windows that occur anywhere in ``b``."""
    in_b = {b[i : i + size] for i in range(len(b) - size + 1)}
    return [i for i in range(len(a) - size + 1) if a[i : i + size] in in_b]


def test_two_encryptions_of_the_same_vector_differ(client_key, rng):
    bounds = slots.Bounds(expected_clients=3, max_weight=100.0, value_bound=10.0)
    vector = slots.encode_update(rng.standard_normal(12_000), 40.0, bounds, checks(client_key, "r1"))  # two ciphertexts
    first, second = ciphertexts.encrypt(client_key, vector), ciphertexts.encrypt(client_key, vector)
    other = ciphertexts.encrypt(client_key, np.zeros_like(vector))  # a different vector
    assert len(first) == len(second) == 2

    for (a0, a_seed), (b0, b_seed), (z0, _) in zip(first, second, other):
        # Nothing but the polynomial and the seed travels: no header that could be shared or carry data.
        assert (len(a0), len(a_seed)) == (len(b0), len(b_seed)) == (N * 8, SEED_BYTES)
        assert a0 != b0, "two encryptions of the same vector are byte-identical"
        assert a_seed != b_seed, "both ciphertexts carry the same seed"
        # Not one 32-byte window of one c0 occurs anywhere in the other (not shifted or partial copies),
        # nor in the encryption of another vector.
        assert _common_windows(a0, b0) == [] and _common_windows(a0, z0) == []
        # The second polynomials, expanded from the seeds, share nothing either.
        assert _common_windows(_c1(client_key, a_seed), _c1(client_key, b_seed)) == []
    # Nor does a polynomial repeat across positions of the same update.
    assert _common_windows(first[0][0], first[1][0]) == [] and first[0][1] != first[1][1]

    # Both decrypt to the vector, within CKKS precision.
    for cts in (first, second):
        got = ciphertexts.decrypt(client_key, [c0 for c0, _ in cts], [[seed] for _, seed in cts])
        assert np.max(np.abs(got - vector)) < 1e-6


def test_two_sites_submitting_the_same_model_send_different_bytes(server, keypair, client_key, helpers, rng,
                                                                  monkeypatch):
    model, other = helpers.random_tensors(rng), helpers.random_tensors(rng)
    encrypted: list[list[tuple[bytes, bytes]]] = []  # what each submit encrypted, recorded on its way through

    def recording_encrypt(*args, **kwargs):
        cts = real_encrypt(*args, **kwargs)
        encrypted.append(cts)
        return cts

    real_encrypt = ciphertexts.encrypt
    monkeypatch.setattr(ciphertexts, "encrypt", recording_encrypt)
    secagg.create_round(server.address, "same", template=model, clients=3, max_weight=4.0)
    wire = []
    for site in ("site-a", "site-b"):
        # One relay per site: gRPC shares connections between channels to the same address.
        with RecordingRelay(server.address) as relay:
            secagg.submit(relay.address, "same", client_key, site, model, weight=4.0)
        wire.append(relay.received())
    secagg.submit(server.address, "same", client_key, "site-c", other, weight=4.0)
    average = secagg.fetch_average(server.address, "same", client_key)

    ((a, a_seed),), ((b, b_seed),), _ = encrypted  # one ciphertext per update at this model size
    assert a != b and a_seed != b_seed, "two sites encrypted the same model to the same bytes"
    # 64-byte windows of each site's polynomial: found in its own connection's bytes (the relay saw the
    # ciphertext; HTTP/2 framing may split a few windows), never in the other site's.
    body_a, body_b = windows(a, 64, 200), windows(b, 64, 200)
    assert sum(w in wire[0] for w in body_a) >= 180 and sum(w in wire[1] for w in body_b) >= 180
    assert not any(w in wire[1] for w in body_a) and not any(w in wire[0] for w in body_b)
    assert a_seed in wire[0] and a_seed not in wire[1] and b_seed in wire[1] and b_seed not in wire[0]
    # Both carried the same model: the average of (model, model, other) comes back.
    expected = helpers.weighted_average([model, model, other], [4.0, 4.0, 4.0])
    names = ["dense/kernel", "dense/bias", "odd", "out/kernel"]
    assert np.max(np.abs(average.vector - np.concatenate([expected[n].ravel() for n in names]))) < 1e-5
