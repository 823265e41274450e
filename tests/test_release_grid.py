"""The release grid (secagg.release): the noise model it rests on, measured, and what a client releases.

The grid is a power of two at least 2^10 x 10 x noise_std(n). That is only as good as noise_std:
test_noise_model measures the decryption noise of real honest sums (TenSEAL encryption, the
aggregator's modular c0 sums, decryption from the contributors' seeds) and holds the model to it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import secagg
from secagg import ciphertexts
from secagg.polys import C0Sum, parse_c0
from secagg.release import GRID_FACTOR, NOISE_SIGMAS, grid, noise_std, release
from secagg.slots import VALUE_LIMIT


@pytest.mark.parametrize("n", [1, 2, 3, 5, 20, 100, 1000, 2**18])
def test_grid_is_the_smallest_power_of_two_above_the_noise_bound(n):
    g = grid(n)
    floor = GRID_FACTOR * NOISE_SIGMAS * noise_std(n)
    assert GRID_FACTOR == 2.0**10 and NOISE_SIGMAS == 10.0
    assert math.log2(g) == int(math.log2(g))  # a power of two: the grid points are exact in float64
    assert floor <= g < 2 * floor


def test_noise_std_grows_with_the_square_root_of_the_count():
    assert noise_std(0) == noise_std(1)  # an empty sum is never decrypted; it is not a smaller noise
    assert noise_std(4) == pytest.approx(2 * noise_std(1))
    assert noise_std(1) == pytest.approx(math.sqrt(4096 * (3.2**2 + 1 / 12)) / 2.0**40)


@pytest.mark.parametrize("n", [1, 3, 20])
def test_noise_model(client_key, n, rng):
    """The measurement behind the grid: the empirical standard deviation of (decrypted - exact) per
    real of an honest sum of n contributions is within [0.5, 1.5] x noise_std(n)."""
    blocks = 3  # 3 x 8,192 reals per sum: the estimate itself is good to about 0.5 %
    values = [rng.uniform(-1000.0, 1000.0, blocks * 8192) for _ in range(n)]
    encrypted = [ciphertexts.encrypt(client_key, v) for v in values]
    acc = C0Sum(client_key.parameters, blocks)
    for update in encrypted:
        for i, (c0, _) in enumerate(update):
            acc.add(i, parse_c0(client_key.parameters, c0))
    seeds = [[update[i][1] for update in encrypted] for i in range(blocks)]
    decrypted = ciphertexts.decrypt(client_key, [acc.row_bytes(i) for i in range(blocks)], seeds)
    error = decrypted - np.sum(values, axis=0)
    measured, model = float(np.std(error)), noise_std(n)
    print(f"noise model: n={n} empirical std {measured:.4g}, model {model:.4g}, ratio {measured / model:.3f}")
    assert 0.5 * model <= measured <= 1.5 * model
    assert abs(float(np.mean(error))) < 5 * model / math.sqrt(error.size) + 1e-15  # unbiased
    # The noise bound the grid uses is never reached in practice (10 sigma).
    assert np.max(np.abs(error)) < NOISE_SIGMAS * model
    assert np.max(np.abs(error)) * GRID_FACTOR < grid(n)


def test_release_rounds_to_the_grid(rng):
    sums = rng.uniform(-VALUE_LIMIT, VALUE_LIMIT, 10_000)
    for n in (1, 3, 20):
        g = grid(n)
        out = release(sums, n)
        q = out / g
        np.testing.assert_array_equal(q, np.round(q))  # exactly on the grid
        assert np.max(np.abs(out - sums)) <= g / 2
        # The same grid point for every noise draw except within one noise bound of a boundary.
        noisy = sums + rng.normal(0, noise_std(n), sums.size)
        moved = np.mean(release(noisy, n) != out)
        assert moved < 0.01


def test_released_average_lies_on_the_grid(server, keypair, npz_models, helpers):
    """Through secagg.fetch_average: the summed weighted values and the summed weight are grid points,
    so the average is a ratio of two of them; the total weight is released rounded as well."""
    paths, tensors = npz_models(3)
    # Weights whose encoded sum is not itself a grid point, so that rounding it is visible.
    weights = [1.0, 2.0, 4.0]
    status = secagg.create_round(server.address, "grid", template=paths[0], clients=3, max_weight=7.0,
                                 value_bound=8.0)
    for i, (p, w) in enumerate(zip(paths, weights)):
        secagg.submit(server.address, "grid", keypair.client, f"s{i}", p, w)
    avg = secagg.fetch_average(server.address, "grid", keypair.client, min_cohort=3)
    g = grid(3)
    headroom = VALUE_LIMIT / (3 * 8.0)
    summed_weight = avg.total_weight * headroom / 7.0  # back in the encoded domain
    assert summed_weight / g == pytest.approx(round(summed_weight / g), abs=1e-6)
    exact_summed_weight = headroom * sum(weights) / 7.0
    assert summed_weight == pytest.approx(round(exact_summed_weight / g) * g, rel=1e-12)
    assert abs(summed_weight - exact_summed_weight) <= g / 2
    assert summed_weight != exact_summed_weight  # the release is the rounded value, not the decryption
    # Multiplying back leaves float64 rounding (about 1e-5 grid units at these magnitudes); values
    # off the grid would be spread over the whole unit.
    sums = avg.vector * summed_weight / g
    assert np.max(np.abs(sums - np.round(sums))) < 1e-3
    # The status tells every site the grid and the precision it implies.
    assert status.release_grid == grid(3)
    assert status.release_precision == pytest.approx(g * 8.0 / VALUE_LIMIT)
    # And the average is exact within the grid (helpers.release_bound: why this is the bound).
    expected = helpers.weighted_average(tensors, weights)
    flat = np.concatenate([expected[n].ravel() for n in ("dense/kernel", "dense/bias", "odd", "out/kernel")])
    bound = helpers.release_bound(3, 7.0, 8.0, weights, float(np.max(np.abs(flat))))
    assert np.max(np.abs(avg.vector - flat)) <= bound < 1e-6


def test_every_site_at_the_max_weight_is_released(server, keypair, rng):
    """3 sites at the max weight with value bound 7e5: the summed encoded weight 3 * 2^18 / (3 * 7e5) =
    0.3744914 lies just below a grid point (2^-18) and is released rounded up; that is honest."""
    model = {"w": rng.uniform(-1, 1, 10).astype(np.float32)}
    secagg.create_round(server.address, "top", template=model, clients=3, max_weight=1.0, value_bound=7e5)
    for i in range(3):
        secagg.submit(server.address, "top", keypair.client, f"s{i}", model, 1.0)
    avg = secagg.fetch_average(server.address, "top", keypair.client)
    assert avg.total_weight == pytest.approx(3.0, rel=1e-4)
