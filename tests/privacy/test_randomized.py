"""Audit 3: encryption is randomized.

Two encryptions of the same model under the same key share nothing but the parameter header; both
decrypt to the model. Through a real aggregator, two sites submitting the same model send
different bytes.
"""

from __future__ import annotations

import numpy as np
import tenseal.sealapi as seal

import secagg
from secagg import ciphertexts
from secagg.ciphertexts import Bounds

from .conftest import RecordingRelay, windows

N = 8192  # coefficients per polynomial
SEED_BYTES = 64  # a seeded ciphertext ends with the 64-byte seed of its second polynomial


def _polynomials(key, blob: bytes) -> tuple[bytes, bytes]:
    """(c0, c1) of a ciphertext as raw uint64 coefficients; c1 is what the seed expands to."""
    ct = ciphertexts.load_ciphertext(key, blob)
    poly = ct.dyn_array()  # a view into ct: ct must stay alive while it is read
    raw = np.array([poly.at(i) for i in range(poly.size())], dtype="<u8").tobytes()
    assert len(raw) == 2 * N * 8
    return raw[: N * 8], raw[N * 8 :]


def _layout(key, blob: bytes) -> int:
    """Length of the blob's header: where the first polynomial's coefficients start, verbatim."""
    c0, _ = _polynomials(key, blob)
    start = blob.find(c0[:64])
    assert 0 < start < 256 and blob[start : start + len(c0)] == c0, "unexpected ciphertext layout"
    return start


def _common_windows(a: bytes, b: bytes, size: int = 32) -> list[int]:
    """Offsets in ``a`` of the ``size``-byte windows that occur anywhere in ``b``."""
    in_b = {b[i : i + size] for i in range(len(b) - size + 1)}
    return [i for i in range(len(a) - size + 1) if a[i : i + size] in in_b]


def test_two_encryptions_of_the_same_vector_differ(client_key, rng):
    bounds = Bounds(expected_clients=3, max_weight=100.0, value_bound=10.0)
    vector = ciphertexts.encode_update(rng.standard_normal(12_000), 40.0, bounds)  # two ciphertexts
    first, second = ciphertexts.encrypt(client_key, vector), ciphertexts.encrypt(client_key, vector)
    other = ciphertexts.encrypt(client_key, np.zeros_like(vector))  # a different vector
    assert len(first) == len(second) == 2

    for a, b, c in zip(first, second, other):
        assert a != b, "two encryptions of the same vector are byte-identical"
        assert len(a) == len(b)
        header = _layout(client_key, a)
        # What is legitimately shared is the header (SEAL's serialization header and the parameter
        # id); it is the same for any vector, so it says nothing about the data.
        assert a[:header] == b[:header] == c[:header]
        # Beyond it, not one 32-byte window of one ciphertext occurs anywhere in the other: they are
        # not shifted or partial copies of each other.
        shared = _common_windows(a, b)
        assert all(i + 32 <= header for i in shared), f"windows shared beyond the header at {[i for i in shared if i + 32 > header][:5]}"
        assert a[-SEED_BYTES:] != b[-SEED_BYTES:], "both ciphertexts carry the same seed"
        # The polynomials themselves: c0 (sent verbatim) and c1 (expanded from the seed) share nothing.
        (a0, a1), (b0, b1) = _polynomials(client_key, a), _polynomials(client_key, b)
        assert _common_windows(a0, b0) == [] and _common_windows(a1, b1) == []
    # Nor does a ciphertext repeat across positions of the same update.
    assert all(i + 32 <= _layout(client_key, first[0]) for i in _common_windows(first[0], second[1]))

    # Both decrypt to the vector, within CKKS precision.
    for blobs in (first, second):
        assert np.max(np.abs(ciphertexts.decrypt(client_key, blobs, vector.size) - vector)) < 1e-6


def test_two_sites_submitting_the_same_model_send_different_bytes(server, keypair, client_key, helpers, rng,
                                                                  monkeypatch):
    model, other = helpers.random_tensors(rng), helpers.random_tensors(rng)
    encrypted: list[list[bytes]] = []  # what each submit encrypted, recorded on its way through

    def recording_encrypt(*args, **kwargs):
        blobs = real_encrypt(*args, **kwargs)
        encrypted.append(blobs)
        return blobs

    real_encrypt = ciphertexts.encrypt
    monkeypatch.setattr(ciphertexts, "encrypt", recording_encrypt)
    secagg.create_round(server.address, "same", template=model, clients=3)
    wire = []
    for site in ("site-a", "site-b"):
        # One relay per site: gRPC shares connections between channels to the same address.
        with RecordingRelay(server.address) as relay:
            secagg.submit(relay.address, "same", client_key, site, model, weight=4.0)
        wire.append(relay.received())
    secagg.submit(server.address, "same", client_key, "site-c", other, weight=4.0)
    average = secagg.fetch_average(server.address, "same", client_key)

    (a,), (b,), _ = encrypted  # one ciphertext per update at this model size
    assert a != b, "two sites encrypted the same model to the same bytes"
    header = _layout(client_key, a)
    # 64-byte windows of each site's ciphertext body: found in its own connection's bytes (the relay
    # saw the ciphertext; HTTP/2 framing may split a few windows), never in the other site's.
    body_a, body_b = windows(a, 64, 200, header), windows(b, 64, 200, header)
    assert sum(w in wire[0] for w in body_a) >= 180 and sum(w in wire[1] for w in body_b) >= 180
    assert not any(w in wire[1] for w in body_a) and not any(w in wire[0] for w in body_b)
    # Both carried the same model: the average of (model, model, other) comes back.
    expected = helpers.weighted_average([model, model, other], [4.0, 4.0, 4.0])
    names = ["dense/kernel", "dense/bias", "odd", "out/kernel"]
    assert np.max(np.abs(average.vector - np.concatenate([expected[n].ravel() for n in names]))) < 1e-5
