"""Audit item 5: an empirical DP audit of the real clip-and-noise code (:func:`privatize`).

Neighbouring relation (the one the accountant assumes, see secagg.privacy.mechanism): world IN,
the target site submits its real update; world OUT, it submits a zero update (its model equals the
reference). Every other site submits the same update in both worlds. Clipping bounds the
difference of the two sums by C: sensitivity C, noise multiplier z, as the accountant counts.

The attacker is as strong as the DP definition allows: it knows every other site's update and
the target's update, so it subtracts the others' (clipped) contribution from the observed sum and
projects the rest on the target's direction. For Gaussian noise that score is the
likelihood-ratio test, the most powerful attack there is. What it observes:

- local mode: the target's own submission (local DP claims each submission alone is private);
- distributed mode: the sum of K = 4 honest submissions, each carrying 1/K of the noise variance.
"""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import ModelFormatError, PrivacyError
from secagg.privacy import DPConfig, clip, epsilon, noise_multiplier_for, privatize
from secagg.privacy import mechanism
from secagg.privacy.audit import clopper_pearson, epsilon_lower_bound, max_auditable_epsilon

stats = pytest.importorskip("scipy.stats")

DIM = 50
TRIALS = 3000  # per world; half choose the threshold, half test it
DELTA = 1e-5
C = 1.0
SITES = {"local": 1, "distributed": 4}
CEILING = max_auditable_epsilon(TRIALS, DELTA)  # about 5.83: no audit with 3000 trials can show more


def _clipped(u: np.ndarray) -> np.ndarray:
    """Clipping written independently of the code under test: the attacker's knowledge."""
    return u * min(1.0, C / np.linalg.norm(u))


def _audit(mode: str, claim: float, seed: int, target_norm: float = 10 * C, noise: bool = True):
    """Run privatize TRIALS times per world; return (lower bound, claimed epsilon, z, scores in, scores out)."""
    z = noise_multiplier_for(claim, DELTA)
    claimed = epsilon([z], DELTA)
    sites = SITES[mode]
    config = DPConfig(C, z, DELTA, mode, sites).validate()
    data = np.random.default_rng(seed)
    reference = data.normal(size=DIM)
    target = data.normal(size=DIM)
    target *= target_norm / np.linalg.norm(target)  # far outside the clip ball: clipping matters
    others = [u * 3 * C / np.linalg.norm(u) for u in data.normal(size=(sites - 1, DIM))]
    known = sites * reference + sum((_clipped(u) for u in others), np.zeros(DIM))
    direction = target / np.linalg.norm(target)
    rng = np.random.default_rng(seed + 1)

    def world(target_update: np.ndarray) -> np.ndarray:
        scores = np.empty(TRIALS)
        for i in range(TRIALS):
            total = privatize(reference + target_update, config, reference, rng, _noise=noise)
            for u in others:
                total = total + privatize(reference + u, config, reference, rng, _noise=noise)
            scores[i] = (total - known) @ direction
        return scores

    scores_in, scores_out = world(target), world(np.zeros(DIM))
    return epsilon_lower_bound(scores_in, scores_out, DELTA), claimed, z, scores_in, scores_out


@pytest.mark.parametrize("mode", ["local", "distributed"])
@pytest.mark.parametrize("claim, seed", [(1.0, 11), (4.0, 12), (8.0, 13)])
def test_audit_finds_no_violation_and_the_noise_is_what_the_accountant_counts(mode, claim, seed):
    lower, claimed, z, scores_in, scores_out = _audit(mode, claim, seed)
    assert lower <= claimed
    # The lower bound alone is weak (it can never exceed CEILING), so also check the two numbers the
    # accountant's upper bound rests on. Noise: the released sum's std is z*C. A chi-square test at
    # 1e-6 accepts a std within -6% to +6% of z*C here; half the noise would be far outside.
    n = len(scores_out)
    ratio = (n - 1) * np.var(scores_out, ddof=1) / (z * C) ** 2
    assert stats.chi2.ppf(1e-6, n - 1) < ratio < stats.chi2.isf(1e-6, n - 1)
    # Sensitivity: the target moves the sum by C along its direction, not by its unclipped norm 10C.
    shift = scores_in.mean() - scores_out.mean()
    assert abs(shift - C) < 6 * z * C * np.sqrt(2 / n)


@pytest.mark.parametrize("mode", ["local", "distributed"])
@pytest.mark.parametrize("claim, seed", [(1.0, 21), (4.0, 22)])
def test_audit_catches_missing_noise(mode, claim, seed):
    lower, claimed, *_ = _audit(mode, claim, seed, noise=False)
    assert lower > claimed + 1
    assert lower == pytest.approx(CEILING)  # the attack never errs: the audit's maximum


@pytest.mark.parametrize("mode", ["local", "distributed"])
@pytest.mark.parametrize("claim, seed", [(1.0, 31), (4.0, 32)])
def test_audit_catches_missing_clipping(mode, claim, seed, monkeypatch):
    monkeypatch.setattr(mechanism, "clip", lambda u, c: (np.array(u, dtype=np.float64), float(np.linalg.norm(u))))
    lower, claimed, *_ = _audit(mode, claim, seed, target_norm=50 * C)
    assert lower > claimed + 1


def test_lower_bound_is_zero_when_the_worlds_are_the_same():
    rng = np.random.default_rng(5)
    assert epsilon_lower_bound(rng.normal(size=4000), rng.normal(size=4000), DELTA) < 0.2


def test_clopper_pearson_covers_the_textbook_values():
    lo, hi = clopper_pearson(0, 10, 0.05)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(10, 10, 0.05)
    assert lo == pytest.approx(0.025 ** (1 / 10)) and hi == 1.0
    lo, hi = clopper_pearson(5, 10, 0.05)
    assert (lo, hi) == pytest.approx((0.187086, 0.812914), abs=1e-6)


# The mechanism's own contract.

def test_clip_bounds_the_norm_exactly_and_reports_the_original():
    rng = np.random.default_rng(1)
    for scale in (1e-3, 0.5, 1.0, 3.0, 1e6):
        for _ in range(200):
            u = rng.normal(size=37) * scale
            out, norm = clip(u, 1.0)
            assert np.linalg.norm(out) <= 1.0
            assert norm == pytest.approx(np.linalg.norm(u))
            if norm <= 1.0:
                assert np.array_equal(out, u)
            else:
                assert np.allclose(out * norm, u)  # same direction
    small = np.ones(3) * 0.1
    out, _ = clip(small, 1.0)
    out[0] = 7.0
    assert small[0] == 0.1  # a copy, never the caller's array


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_clip_refuses_non_finite_updates(bad):
    with pytest.raises(PrivacyError, match="NaN"):
        clip(np.array([1.0, bad]), 1.0)


def test_privatize_without_noise_is_reference_plus_clipped_update():
    config = DPConfig(2.0, 1.0, DELTA, "local", 1)
    reference = np.arange(6.0)
    theta = reference + np.array([30.0, 40.0, 0, 0, 0, 0])
    out = privatize(theta, config, reference, _noise=False)
    assert np.allclose(out, reference + np.array([1.2, 1.6, 0, 0, 0, 0]))
    assert np.allclose(privatize(theta, config, _noise=False), theta * 2.0 / np.linalg.norm(theta))
    with pytest.raises(ModelFormatError):
        privatize(theta, config, reference[:5])
    with pytest.raises(PrivacyError, match="--noise-multiplier"):
        privatize(theta, DPConfig(2.0, 0.0, DELTA, "local", 1))


def test_privatize_default_randomness_is_fresh():
    config = DPConfig(1.0, 1.0, DELTA, "distributed", 3)
    theta = np.zeros(20)
    assert not np.array_equal(privatize(theta, config), privatize(theta, config))


def test_site_noise_shares_add_up_to_the_accounted_noise():
    local = DPConfig(0.5, 2.0, DELTA, "local", 9)
    distributed = DPConfig(0.5, 2.0, DELTA, "distributed", 9)
    assert local.site_noise_std() == pytest.approx(1.0)
    assert 9 * distributed.site_noise_std() ** 2 == pytest.approx(1.0)  # k honest sites: std z*C on the sum


def test_config_round_trips_through_a_dict():
    config = DPConfig(0.5, 1.3, 1e-6, "distributed", np.int64(4)).validate()
    again = DPConfig.from_dict(config.to_dict())
    assert again == config and type(again.min_honest) is int
    with pytest.raises(KeyError):
        DPConfig.from_dict({**config.to_dict(), "epsilon": 3})
    with pytest.raises(KeyError):
        DPConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "mode"})
