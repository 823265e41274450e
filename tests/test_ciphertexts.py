"""Clients' encryption (secagg.ciphertexts): seeded CKKS ciphertexts as (c0, seed), their wire size,
and decryption of a sum from its contributors' seeds. Real TenSEAL throughout."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from secagg import ciphertexts, envelope
from secagg.errors import CiphertextError
from secagg.packing import ModelSpec, TensorSpec
from secagg.polys import SEED_BYTES, C0Sum, c0_bytes, parse_c0
from secagg.release import noise_std
from secagg.rounds import RoundStatus
from secagg.slots import num_ciphertexts
from secagg.updates import seal_update

REALS = ciphertexts.REALS_PER_CIPHERTEXT


def _decrypt_one(key, c0: bytes, seed: bytes) -> np.ndarray:
    return ciphertexts.decrypt(key, [c0], [[seed]])


def test_encrypt_decrypt_accuracy(client_key, rng):
    reals = rng.uniform(-1000, 1000, 2 * REALS)
    cts = ciphertexts.encrypt(client_key, reals)
    assert len(cts) == 2
    for c0, seed in cts:
        assert len(c0) == c0_bytes(client_key.parameters) == 65_536 and len(seed) == SEED_BYTES
        parse_c0(client_key.parameters, c0)  # what a client sends passes the aggregator's strict parse
    out = ciphertexts.decrypt(client_key, [c for c, _ in cts], [[s] for _, s in cts])
    assert np.max(np.abs(out - reals)) < 10 * noise_std(1)


def test_two_encryptions_of_the_same_vector_differ(client_key, rng):
    reals = rng.normal(0, 1, REALS)
    (c0a, seed_a), = ciphertexts.encrypt(client_key, reals)
    (c0b, seed_b), = ciphertexts.encrypt(client_key, reals)
    assert c0a != c0b and seed_a != seed_b  # fresh randomness in both halves
    da, db = _decrypt_one(client_key, c0a, seed_a), _decrypt_one(client_key, c0b, seed_b)
    assert np.max(np.abs(da - db)) < 20 * noise_std(1)


def test_the_seed_is_half_of_the_ciphertext(client_key, rng):
    """c1 is rebuilt from the seed: with another seed the first polynomial decrypts to garbage."""
    reals = rng.normal(0, 1, REALS)
    (c0, seed), = ciphertexts.encrypt(client_key, reals)
    (_, other_seed), = ciphertexts.encrypt(client_key, reals)
    assert np.max(np.abs(_decrypt_one(client_key, c0, other_seed) - reals)) > 1e3


def test_a_sum_decrypts_from_the_c0_sum_and_every_seed(client_key, rng):
    vectors = [rng.uniform(-10, 10, REALS) for _ in range(4)]
    cts = [ciphertexts.encrypt(client_key, v)[0] for v in vectors]
    acc = C0Sum(client_key.parameters, 1)
    for c0, _ in cts:
        acc.add(0, parse_c0(client_key.parameters, c0))
    seeds = [s for _, s in cts]
    exact = np.sum(vectors, axis=0)
    out = ciphertexts.decrypt(client_key, [acc.row_bytes(0)], [seeds])
    assert np.max(np.abs(out - exact)) < 10 * noise_std(4)
    # The seeds' order does not matter (c1 is their sum) ...
    shuffled = ciphertexts.decrypt(client_key, [acc.row_bytes(0)], [seeds[::-1]])
    assert np.max(np.abs(shuffled - exact)) < 10 * noise_std(4)
    # ... but every one of them does.
    assert np.max(np.abs(ciphertexts.decrypt(client_key, [acc.row_bytes(0)], [seeds[:3]]) - exact)) > 1e3
    with pytest.raises(CiphertextError, match="without contributions"):
        ciphertexts.decrypt(client_key, [acc.row_bytes(0)], [[]])


def test_encrypt_takes_whole_blocks(client_key):
    with pytest.raises(ValueError, match="whole 8,192-real blocks"):
        ciphertexts.encrypt(client_key, np.zeros(REALS + 1))


def test_encryption_in_threads(client_key, rng):
    """SEAL objects are per thread (secagg.ciphertexts.codec): concurrent clients in one process work."""
    vectors = [rng.normal(0, 1, REALS) for _ in range(4)]
    out: dict[int, list] = {}

    def work(i):
        out[i] = ciphertexts.encrypt(client_key, vectors[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, v in enumerate(vectors):
        (c0, seed), = out[i]
        assert np.max(np.abs(_decrypt_one(client_key, c0, seed) - v)) < 10 * noise_std(1)


def _status(num_params: int, key_id: str, expected: int = 10) -> RoundStatus:
    spec = ModelSpec((TensorSpec("w", (num_params,), "float32"),))
    return RoundStatus("r", "collecting", 0, expected, expected, (), None, spec.hash, key_id, 1.0, 1.0, num_params)


def test_wire_size_per_parameter_for_a_million_params(client_key, rng):
    n = 1_000_000
    theta = rng.normal(0, 0.05, n)
    update = seal_update(client_key, _status(n, client_key.key_id), "c", theta, 1.0)
    assert update.header.num_ciphertexts == num_ciphertexts(n) == 123
    assert [len(c.c0s) for c in update.chunks] == [24] * 5 + [3]
    ct_bytes = sum(len(c0) + len(seed) for c in update.chunks for c0, seed in zip(c.c0s, c.seeds))
    # Seeded ciphertexts: 8 bytes per real plus a 64-byte seed. A full (unseeded) one would be about 16.
    assert ct_bytes == 123 * (65_536 + 64)
    assert ct_bytes / n <= 8.1, ct_bytes / n
    assert update.wire_bytes / n <= 8.1, update.wire_bytes / n
    # Every chunk fits a gRPC message.
    assert max(sum(map(len, c.c0s)) + sum(map(len, c.seeds)) for c in update.chunks) < envelope.MAX_MESSAGE_BYTES
