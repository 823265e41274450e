"""Audit item 7 and issue 10's attack 3: what a client releases after decryption is rounded to an
absolute grid, never the raw CKKS decryption.

A raw decryption carries the scheme's noise in its low-order bits; together with the ciphertext it
gives the secret key (Li and Micciancio 2021), and the aggregator holds every encrypted sum. The
OLD release rounded to float32, which is relative: where a block of the model is zero at every
site, float32 keeps the noise (about 1e-10) to 24 bits, and one published model plus the aggregate
gave the key. ``secagg.release`` now rounds the decrypted sums AND the summed weight to a power of
two at least 2^10 times the noise bound; ``open_aggregate`` (behind ``fetch_average``, the only path
from a sum to numbers) applies it before anything leaves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import secagg
from secagg import ciphertexts, slots
from secagg.packing import ModelSpec
from secagg.release import GRID_FACTOR, NOISE_SIGMAS, grid, noise_std, release
from secagg.transport.client import AggregatorClient
from secagg.transport.server import record_from_pb
from secagg.updates import checks, open_chunks

from .conftest import N, add_mod_q, key_from_decryption, second_polynomial, secret_key_words

WEIGHTS = (1.0, 2.0, 3.0)
MAX_WEIGHT = 3.0


def served_sum(address: str, round_id: str, key):
    """(status, spec, records, [(c0 sum, joined seeds)]) exactly as a client receives them."""
    with AggregatorClient(address) as client:
        status, spec_json = client.status(round_id)
        head, chunks = client.fetch(round_id, 30.0)
        records = [record_from_pb(r) for r in head.records]
        pairs = list(open_chunks(key, status, head, len(records), chunks))
    return status, ModelSpec.from_json(spec_json), records, pairs


def raw_sums(address: str, round_id: str, key) -> tuple[np.ndarray, object]:
    """The decrypted, checked sums [w*theta, w] exactly as CKKS returns them, by hand (what release must hide)."""
    status, spec, records, pairs = served_sum(address, round_id, key)
    n = len(records)
    seeds = [[joined[j * 64:(j + 1) * 64] for j in range(n)] for _, joined in pairs]
    reals = ciphertexts.decrypt(key, [c0 for c0, _ in pairs], seeds)
    return slots.decode_aggregate(reals, spec.num_params, n, checks(key, round_id)), status


def encoded_weight(status, total_weight: float) -> float:
    return total_weight * slots.VALUE_LIMIT / (status.expected * status.value_bound) / status.max_weight


def test_released_average_is_the_rounded_decryption(server, client_key, npz_models, keypair, tmp_path):
    paths, tensors = npz_models(3)
    secagg.create_round(server.address, "r1", template=paths[0], clients=3, max_weight=MAX_WEIGHT)
    for i, p in enumerate(paths):
        secagg.submit(server.address, "r1", client_key, f"site{i}", p, weight=WEIGHTS[i])
    average = secagg.fetch_average(server.address, "r1", client_key, wait=30)
    raw, status = raw_sums(server.address, "r1", client_key)

    # What the API hands out is exactly the released sums divided by the released total weight ...
    released = release(raw, 3)
    np.testing.assert_array_equal(average.vector, released[:-1] / released[-1])
    assert encoded_weight(status, average.total_weight) == pytest.approx(released[-1], rel=1e-15)
    # ... which are whole multiples of the grid (the weight too), unlike the raw decryption: its
    # low-order bits, where the noise lives, are gone. (If release were skipped, nothing here would hold.)
    g = grid(3)
    assert g == status.release_grid
    np.testing.assert_array_equal(released / g, np.round(released / g))
    assert np.mean(raw != released) > 0.99 and raw[-1] != released[-1]
    assert np.max(np.abs(raw - released)) <= g / 2
    # Still the average the user asked for.
    w = np.array(WEIGHTS)
    want = sum(wi * t["dense/kernel"].astype(np.float64) for wi, t in zip(w, tensors)) / w.sum()
    got = average.vector[: want.size].reshape(want.shape)
    assert float(np.max(np.abs(got - want))) < 1e-6
    assert average.total_weight == pytest.approx(w.sum(), abs=g * MAX_WEIGHT / (slots.VALUE_LIMIT / 300))

    # The model file written by fetch holds exactly the released values (float64 tensor "odd").
    out = secagg.fetch(server.address, "r1", client_key, paths[0], tmp_path / "g.npz")
    odd = np.load(out)["odd"]
    start = 64 * 64 + 64
    assert odd.dtype == np.float64
    np.testing.assert_array_equal(odd, average.vector[start:start + 7])


def test_release_function():
    for n in (1, 3, 100, 10_000):
        g = grid(n)
        # A power of two at least 2^10 times the noise bound, and less than twice that.
        assert math.log2(g) == round(math.log2(g))
        assert GRID_FACTOR * NOISE_SIGMAS * noise_std(n) <= g < 2 * GRID_FACTOR * NOISE_SIGMAS * noise_std(n)
    g, bound = grid(3), NOISE_SIGMAS * noise_std(3)
    x = np.array([0.0, 1.0, -5 * g, 12345 * g, 1e3 + g])
    y = release(x, 3)
    np.testing.assert_array_equal(y, x)  # grid points stay
    # Anything within the noise bound of a grid point is released as that grid point, whatever the noise.
    rng = np.random.default_rng(0)
    for _ in range(100):
        np.testing.assert_array_equal(release(x + rng.uniform(-bound, bound, x.size), 3), x)
    # The old failure: pure noise around zero is released as exactly zero (float32 kept it to 24 bits).
    noise = rng.normal(0, noise_std(3), 8192)
    assert np.all(noise.astype(np.float32) != 0) and np.all(release(noise, 3) == 0.0)


# -- attack 3: passive key recovery from one honest release ----------------------------------------

# Four ciphertexts: "a" fills the first; "zeros" the second, and is zero at every site; "cancel"
# the third, and sums to exactly zero over the sites (x, -x, 0 with equal weights); "b" and the
# weight are in the fourth.
BLOCK = slots.DATA_SLOTS
ZERO_LAYOUT = {"a": ((BLOCK,), "float32"), "zeros": ((BLOCK,), "float32"), "cancel": ((BLOCK,), "float32"),
               "b": ((100,), "float32")}


def _zero_block_models(rng):
    x = rng.standard_normal(BLOCK).astype(np.float32)
    models = []
    for sign in (1.0, -1.0, 0.0):
        models.append({"a": rng.standard_normal(BLOCK).astype(np.float32), "zeros": np.zeros(BLOCK, np.float32),
                       "cancel": (sign * x).astype(np.float32), "b": rng.standard_normal(100).astype(np.float32)})
    return models


def test_a_zero_block_is_released_without_noise(server, client_key, tmp_path, helpers, rng):
    """Three rounds of the same three models, each encrypted afresh (new seeds, new noise). The blocks
    that are zero at every site, or sum to zero, are released as exactly 0.0; total weight and every
    other value are grid points that the noise does not move, except at most a few values within one
    noise bound of a grid boundary, which move by exactly one grid step."""
    models = _zero_block_models(rng)
    paths = [helpers.save_npz(tmp_path / f"site{i}.npz", m) for i, m in enumerate(models)]
    averages, statuses = [], []
    for r in range(3):
        secagg.create_round(server.address, f"z{r}", template=paths[0], clients=3, max_weight=2.0, value_bound=10.0)
        for i, p in enumerate(paths):
            secagg.submit(server.address, f"z{r}", client_key, f"site{i}", p, weight=2.0)
        averages.append(secagg.fetch_average(server.address, f"z{r}", client_key))
        statuses.append(secagg.round_status(server.address, f"z{r}"))

    g = grid(3)
    for a in averages:
        assert np.all(a.vector[BLOCK:2 * BLOCK] == 0.0), "the all-zero block carries noise"
        assert np.all(a.vector[2 * BLOCK:3 * BLOCK] == 0.0), "the block that sums to zero carries noise"
        w = encoded_weight(statuses[0], a.total_weight)
        assert w / g == round(w / g)  # the total weight is a grid point
        assert a.total_weight == averages[0].total_weight
    wsum = encoded_weight(statuses[0], averages[0].total_weight)
    for a in averages[1:]:
        moved = np.flatnonzero(a.vector != averages[0].vector)
        assert moved.size <= 12, f"{moved.size} released values depend on the noise draw"
        np.testing.assert_allclose(np.abs(a.vector[moved] - averages[0].vector[moved]) * wsum, g, rtol=1e-6)


def test_one_raw_decryption_gives_the_key(server, client_key, tmp_path, helpers, rng):
    """Sanity check of attack 3's arithmetic, so that the tests above prove something: the raw decryption
    of ONE ciphertext of the aggregate, with that ciphertext (c0 served, c1 expanded from the public
    seeds), gives the secret key; so does its float32 rounding where the block is zero (the OLD
    release); its release (all zeros here) does not."""
    models = _zero_block_models(rng)
    paths = [helpers.save_npz(tmp_path / f"site{i}.npz", m) for i, m in enumerate(models)]
    secagg.create_round(server.address, "z", template=paths[0], clients=3, max_weight=2.0, value_bound=10.0)
    for i, p in enumerate(paths):
        secagg.submit(server.address, "z", client_key, f"site{i}", p, weight=2.0)
    _, _, records, pairs = served_sum(server.address, "z", client_key)
    c0, joined = pairs[1]  # the all-zero block
    seeds = [joined[j * 64:(j + 1) * 64] for j in range(3)]
    c1 = second_polynomial(client_key, seeds)
    raw = ciphertexts.codec(client_key).decrypt(c0, seeds)
    secret = secret_key_words(client_key)
    assert key_from_decryption(raw, c0, c1) == secret

    # The released block: exactly zero, which gives nothing.
    released = release(raw[:BLOCK], 3)
    assert np.all(released == 0.0)
    recovered = key_from_decryption(np.concatenate([released, raw[BLOCK:] * 0]), c0, c1)
    assert sum(a == b for a, b in zip(recovered, secret)) <= 1

    # The OLD format's block held 8,192 data values and nothing else: a sum of three encryptions of
    # zeros, released as float32, still gives the key (the noise survives float32 to 24 bits).
    zeros = [ciphertexts.codec(client_key).encrypt(np.zeros(N)) for _ in range(3)]
    old_c0, old_seeds = add_mod_q(*(c for c, _ in zeros)), [s for _, s in zeros]
    old_raw = ciphertexts.codec(client_key).decrypt(old_c0, old_seeds)
    as_float32 = old_raw.astype(np.float32).astype(np.float64)
    assert np.all(as_float32 != 0) and np.max(np.abs(as_float32 / old_raw - 1)) < 2.0**-23
    assert key_from_decryption(as_float32, old_c0, second_polynomial(client_key, old_seeds)) == secret
    assert np.all(release(old_raw, 3) == 0.0)
