"""Audit item 7: what a client releases after decryption is rounded, never the raw CKKS decryption.

A raw decryption carries the scheme's noise in its low-order bits; together with the ciphertext it
can reveal the secret key (Li and Micciancio 2021). ``secagg.release`` rounds to float32 and every
path that hands decrypted values out (the API's average, model files, the merge exchanges) goes
through ``fetch_average``, which applies it.
"""

from __future__ import annotations

import numpy as np

import secagg
from secagg import ciphertexts, envelope
from secagg.release import release
from secagg.transport.client import AggregatorClient


def _raw_decryption(address: str, round_id: str, key) -> np.ndarray:
    """The decrypted weighted mean exactly as CKKS returns it, by hand (what release must hide)."""
    with AggregatorClient(address) as client:
        status, spec_json = client.status(round_id)
        head, chunks = client.fetch(round_id, 30.0)
        header = envelope.Header(round_id, "", head.key_id, head.spec_hash, head.num_ciphertexts, head.num_chunks,
                                 head.digest)
        blobs = list(envelope.iter_chunks(header, chunks))
    spec = secagg.packing.ModelSpec.from_json(spec_json)
    vector = ciphertexts.decrypt(key, blobs, spec.num_params + ciphertexts.EXTRA_SLOTS)
    mean, _ = ciphertexts.decode_aggregate(vector, head.contributions,
                                           ciphertexts.Bounds(status.expected, status.max_weight, status.value_bound))
    return mean


def test_released_average_is_the_rounded_decryption(server, client_key, npz_models, keypair, tmp_path):
    paths, tensors = npz_models(3)
    secagg.create_round(server.address, "r1", template=paths[0], clients=3)
    for i, p in enumerate(paths):
        secagg.submit(server.address, "r1", client_key, f"site{i}", p, weight=float(i + 1))
    average = secagg.fetch_average(server.address, "r1", client_key, wait=30)
    raw = _raw_decryption(server.address, "r1", client_key)

    # What the API hands out is exactly the float32 rounding of the raw decryption ...
    np.testing.assert_array_equal(average.vector, raw.astype(np.float32).astype(np.float64))
    # ... which differs from the raw decryption: its low-order bits (where the noise lives) are gone.
    # (If release were skipped, every element would be equal here.)
    differs = np.mean(average.vector != raw)
    assert differs > 0.9, differs
    # Still the average the user asked for, to float32 precision.
    w = np.array([1.0, 2.0, 3.0])
    want = sum(wi * t["dense/kernel"].astype(np.float64) for wi, t in zip(w, tensors)) / w.sum()
    got = average.vector[: want.size].reshape(want.shape)
    assert float(np.max(np.abs(got - want))) < 1e-6

    # The model file written by fetch holds the released values, also for float64 tensors ("odd").
    out = secagg.fetch(server.address, "r1", client_key, paths[0], tmp_path / "g.npz")
    odd = np.load(out)["odd"]
    assert odd.dtype == np.float64
    np.testing.assert_array_equal(odd, odd.astype(np.float32).astype(np.float64))


def test_release_function():
    x = np.array([1.0 + 2.0**-40, np.pi, -1e-9 + 3e-20])
    y = release(x)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, x.astype(np.float32).astype(np.float64))
    assert y[0] == 1.0  # a difference far below float32's precision is removed
