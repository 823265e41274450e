"""How small a shift of the encrypted sum the check slots catch (the statistics behind the +0.01 test).

A malicious aggregator can add any plaintext to the sum (test_malicious_aggregator.py does it with
SEAL's encoder). It does not know the check signs, so a shift delta of a ciphertext's data slots
moves check t by <s_t, delta> (s_t: +-1/sqrt(8159)), and a client refuses the sum when any of the 32
checks is off by more than the tolerance tau = 10 * sqrt(8^2 + 1) * sigma (sigma: the decryption noise
of one real of the sum, ``secagg.release.noise_std``). Here ``secagg.slots`` is used directly: three
sites' encoded updates are summed, CKKS noise of standard deviation sigma is added to every real
(the noise model; calibrated against real CKKS decryptions below), a shift is added, and
``decode_aggregate`` accepts or refuses. Each rate is over 200 draws of the check key (and of the
updates and noise). Printed with ``pytest -s``; the figures are in docs/privacy-audit.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from secagg import ciphertexts, slots
from secagg.errors import AggregateCheckError
from secagg.release import grid, noise_std
from secagg.updates import checks

from .conftest import add_mod_q

DRAWS = 200
SITES = 3
BOUNDS = slots.Bounds(expected_clients=SITES, max_weight=50.0, value_bound=10.0)
WEIGHTS = (30.0, 50.0, 20.0)
SIGMA = noise_std(SITES)
TAU = slots.CHECK_SIGMAS * math.sqrt(slots.CHECK_SCALE**2 + 1.0) * SIGMA  # the check tolerance
D = slots.DATA_SLOTS
MULTIPLES = (1, 10, 30, 50, 70, 80, 90, 100, 120, 200)
SHAPES = ("one weight", "random direction", "every weight alike")


def _shift(shape: str, norm: float, rng: np.random.Generator) -> np.ndarray:
    """A shift of the data slots with L2 norm ``norm``."""
    delta = np.zeros(D)
    if shape == "one weight":
        delta[rng.integers(D)] = norm * rng.choice([-1.0, 1.0])
    elif shape == "random direction":
        v = rng.standard_normal(D)
        delta = norm * v / np.linalg.norm(v)
    else:
        delta[:] = norm / math.sqrt(D)
    return delta


def _accepts(total: np.ndarray, delta_reals: np.ndarray, check: slots.Checks) -> bool:
    try:
        slots.decode_aggregate(total + delta_reals, D - 1, SITES, check)
        return True
    except AggregateCheckError:
        return False


def detection_rates(draws: int = DRAWS, seed: int = 2024) -> dict:
    """{(shape, multiple of tau): rate} and the rates of the sign-guessing attacks."""
    rng = np.random.default_rng(seed)
    caught = {(shape, k): 0 for shape in SHAPES for k in MULTIPLES}
    guessed = {"one weight +0.01, every check sign guessed": 0, "two weights +-0.01": 0}
    agree = 0
    wsum = BOUNDS.headroom * sum(WEIGHTS) / BOUNDS.max_weight
    for d in range(draws):
        check = slots.Checks(rng.bytes(32), f"round-{d}")  # a fresh check key: another federation or round
        total = sum(slots.encode_update(rng.uniform(-1, 1, D - 1), w, BOUNDS, check) for w in WEIGHTS)
        total = total + rng.normal(0.0, SIGMA, total.size)
        assert _accepts(total, 0.0, check), "an honest sum was refused"
        for shape in SHAPES:
            for k in MULTIPLES:
                reals = np.zeros(slots.REALS_PER_CIPHERTEXT)
                reals[:D] = _shift(shape, k * TAU, rng)
                caught[(shape, k)] += not _accepts(total, reals, check)
        # Large shifts (0.01 in model units) that cancel in the checks if the attacker guesses signs:
        # one weight, with each check slot corrected by a guessed sign; or two weights moved in opposite
        # directions (cancel in check t exactly when their signs agree there).
        big = 0.01 * wsum
        j, k = rng.choice(D, 2, replace=False)
        reals = np.zeros(slots.REALS_PER_CIPHERTEXT)
        reals[j] = big
        # (a check slot holds c / CHECK_SCALE, so the attacker's correction is divided likewise)
        reals[slots.COUNT_SLOT + 1:] = (rng.choice([-1.0, 1.0], slots.CHECK_SLOTS) * big / math.sqrt(D)
                                        / slots.CHECK_SCALE)
        guessed["one weight +0.01, every check sign guessed"] += not _accepts(total, reals, check)
        reals = np.zeros(slots.REALS_PER_CIPHERTEXT)
        reals[j], reals[k] = big, -big
        guessed["two weights +-0.01"] += not _accepts(total, reals, check)
        signs = check.signs(0)
        agree += int(np.sum(signs[:, j] == signs[:, k]))
    rates = {key: n / draws for key, n in caught.items()}
    return {"rates": rates, "guessed": {key: n / draws for key, n in guessed.items()},
            "sign agreement": agree / (draws * slots.CHECK_SLOTS), "wsum": wsum}


@pytest.fixture(scope="module")
def table():
    return detection_rates()


def test_detection_rates(table):
    rates = table["rates"]
    lines = [f"tau = {TAU:.3g} (encoded units; sigma {SIGMA:.3g}); release grid {grid(SITES):.3g} = "
             f"{grid(SITES) / TAU:.0f} tau; summed encoded weight {table['wsum']:.6g}",
             "shift (L2 norm over one ciphertext's data slots) | " + " | ".join(SHAPES)]
    for k in MULTIPLES:
        lines.append(f"{k:>4} tau = {k * TAU / table['wsum']:.2e} model units | "
                     + " | ".join(f"{rates[(s, k)]:.3f}" for s in SHAPES))
    lines += [f"{name}: {rate:.3f}" for name, rate in table["guessed"].items()]
    lines.append(f"a check's signs agree at two slots in {table['sign agreement']:.3f} of cases")
    print("\n" + "\n".join(lines))

    # A single weight: each check moves by shift / sqrt(8175) = shift / 90.4, so the threshold is sharp
    # just below 90 tau (the noise helps a little): nothing up to 50 tau, everything from 90 tau.
    assert all(rates[("one weight", k)] == 0.0 for k in MULTIPLES if k <= 50)
    assert all(rates[("one weight", k)] == 1.0 for k in MULTIPLES if k >= 90)
    # Spread shifts move each check by a N(0, (norm/90.4)^2) amount: caught now and then from ~30 tau,
    # nearly always from 100 tau.
    for shape in ("random direction", "every weight alike"):
        assert rates[(shape, 1)] == 0.0 and rates[(shape, 10)] <= 0.02
        assert rates[(shape, 120)] >= 0.97 and rates[(shape, 200)] == 1.0
    # What the checks miss is below the release grid: a single weight moved by less than 90 tau (a third
    # of a grid step) moves its released value by at most one grid step, and only when it sat within 90
    # tau of a boundary.
    assert 90 * TAU < grid(SITES) / 3
    # Guessing signs: the +0.01 shifts are caught in every draw (they pass with probability 2^-32).
    assert table["guessed"] == {name: 1.0 for name in table["guessed"]}
    assert abs(table["sign agreement"] - 0.5) < 0.05


def test_the_noise_model_holds_for_real_decryptions(client_key, rng):
    """The tolerance rests on sigma = noise_std(n). Real sums of three CKKS encryptions: the check
    differences of honest sums stay far inside tau, with the spread the model predicts."""
    diffs, count_errors, value_errors = [], [], []
    for r in range(8):
        check = checks(client_key, f"noise-{r}")
        vectors = [slots.encode_update(rng.uniform(-1, 1, D - 1), w, BOUNDS, check) for w in WEIGHTS]
        cts = [ciphertexts.encrypt(client_key, v)[0] for v in vectors]
        reals = ciphertexts.decrypt(client_key, [add_mod_q(*(c0 for c0, _ in cts))], [[s for _, s in cts]])
        exact = sum(vectors)
        value_errors.append(reals[:D] - exact[:D])
        count_errors.append(reals[slots.COUNT_SLOT] - SITES)
        diffs.append(slots.CHECK_SCALE * reals[slots.COUNT_SLOT + 1:] - check.signs(0) @ reals[:D])
        slots.decode_aggregate(reals, D - 1, SITES, check)  # accepted
    diffs, values = np.concatenate(diffs), np.concatenate(value_errors)
    print(f"\nreal CKKS, 3 sites: value noise std {values.std():.3g} (model {SIGMA:.3g}); check differences std "
          f"{diffs.std():.3g} (model {math.sqrt(slots.CHECK_SCALE**2 + 1) * SIGMA:.3g}), largest {np.max(np.abs(diffs)) / TAU:.3f} tau; "
          f"count errors up to {np.max(np.abs(count_errors)):.3g}")
    assert 0.5 * SIGMA < values.std() < 1.5 * SIGMA
    assert np.max(np.abs(diffs)) < 0.6 * TAU
