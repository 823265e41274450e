"""Empirical DP auditing: a statistically valid LOWER bound on epsilon from a distinguishing attack.

Run the mechanism many times with the target's contribution present ("in") and absent ("out"),
give each output a score (higher = looks like "in"), and test whether any threshold on the score
tells the two worlds apart better than (epsilon, delta)-DP allows (Jagielski et al. 2020; Nasr et
al. 2021). If the mechanism is (eps, delta)-DP, then with probability at least ``confidence`` the
bound returned here is <= eps. A bound above the claimed epsilon proves the claim false; a bound
below it proves nothing about the claim, it only means this attack found no violation.

Needs scipy (beta quantiles), which the tests and auditors have; the aggregator never imports it.
"""

from __future__ import annotations

import math

import numpy as np

from secagg.errors import PrivacyError


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """The exact two-sided ``1 - alpha`` confidence interval of a binomial proportion."""
    if not (0 <= successes <= trials and trials > 0):
        raise PrivacyError(f"need 0 <= successes <= trials and trials > 0, got {successes} of {trials}")
    if not (0 < alpha < 1):
        raise PrivacyError(f"alpha must be between 0 and 1, got {alpha}")
    lo = _cp_lower(np.asarray([successes]), trials, alpha)[0]
    hi = _cp_upper(np.asarray([successes]), trials, alpha)[0]
    return float(lo), float(hi)


def _cp_upper(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    from scipy.stats import beta

    x = np.asarray(successes, dtype=np.float64)
    full = x >= trials
    hi = beta.ppf(1 - alpha / 2, x + 1, np.where(full, 1.0, trials - x))
    return np.where(full, 1.0, hi)


def _cp_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    from scipy.stats import beta

    x = np.asarray(successes, dtype=np.float64)
    none = x <= 0
    lo = beta.ppf(alpha / 2, np.where(none, 1.0, x), trials - x + 1)
    return np.where(none, 0.0, lo)


def _bound(miss_a: np.ndarray, n_a: int, miss_b: np.ndarray, n_b: int, delta: float, alpha: float) -> np.ndarray:
    """log((1 - delta - A_upper) / B_upper) for miss counts A of n_a and B of n_b; 0 where not positive."""
    a_up = _cp_upper(miss_a, n_a, alpha)
    b_up = _cp_upper(miss_b, n_b, alpha)
    num = 1.0 - delta - a_up
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(num > 0, np.log(np.maximum(num, 1e-300) / b_up), 0.0)
    return np.maximum(eps, 0.0)


def _rates(scores_in: np.ndarray, scores_out: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the attack "in if score > t": false positives (out > t) and false negatives (in <= t)."""
    sin, sout = np.sort(scores_in), np.sort(scores_out)
    fp = len(sout) - np.searchsorted(sout, t, side="right")
    fn = np.searchsorted(sin, t, side="right")
    return fp, fn


def epsilon_lower_bound(
    scores_in: np.ndarray, scores_out: np.ndarray, delta: float, confidence: float = 0.95
) -> float:
    """A lower bound on epsilon, valid with probability ``confidence``, from threshold attacks on the scores.

    The threshold is chosen on the first half of each array and the attack's false positive and
    false negative rates are bounded on the second half with Clopper-Pearson. Both directions of
    the DP inequality are tried: log((1 - delta - FNR) / FPR) and log((1 - delta - FPR) / FNR),
    each with its own threshold; the larger is returned.
    """
    scores_in = np.asarray(scores_in, dtype=np.float64).ravel()
    scores_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if min(len(scores_in), len(scores_out)) < 4:
        raise PrivacyError("an audit needs at least 4 scores per world (half choose the threshold, half test it)")
    if not (np.all(np.isfinite(scores_in)) and np.all(np.isfinite(scores_out))):
        raise PrivacyError("audit scores must be finite numbers")
    if not (0 < delta < 1) or not (0 < confidence < 1):
        raise PrivacyError(f"need 0 < delta < 1 and 0 < confidence < 1, got delta={delta}, confidence={confidence}")
    # Four one-sided upper bounds are used (FPR and FNR for each direction). A two-sided interval at
    # alpha/2 makes each fail with probability alpha/4, so all hold together with probability >= 1 - alpha.
    alpha = (1.0 - confidence) / 2.0
    h_in, h_out = len(scores_in) // 2, len(scores_out) // 2
    sel_in, test_in = scores_in[:h_in], scores_in[h_in:]
    sel_out, test_out = scores_out[:h_out], scores_out[h_out:]

    candidates = np.unique(np.concatenate([sel_in, sel_out]))
    fp, fn = _rates(sel_in, sel_out, candidates)
    # "in if score > t": P_in[S] <= e^eps P_out[S] + delta with S = {score > t}.
    t_in = candidates[np.argmax(_bound(fn, h_in, fp, h_out, delta, alpha))]
    # The other direction: P_out[S'] <= e^eps P_in[S'] + delta with S' = {score <= t}.
    t_out = candidates[np.argmax(_bound(fp, h_out, fn, h_in, delta, alpha))]

    n_in, n_out = len(test_in), len(test_out)
    fp_a, fn_a = _rates(test_in, test_out, np.asarray([t_in]))
    fp_b, fn_b = _rates(test_in, test_out, np.asarray([t_out]))
    eps_a = _bound(fn_a, n_in, fp_a, n_out, delta, alpha)[0]
    eps_b = _bound(fp_b, n_out, fn_b, n_in, delta, alpha)[0]
    return float(max(0.0, eps_a, eps_b))


def max_auditable_epsilon(trials: int, delta: float, confidence: float = 0.95) -> float:
    """The largest bound :func:`epsilon_lower_bound` can return with ``trials`` scores per world.

    Reached by a perfect attack (no errors on the test half). Claims above it cannot be refuted
    with that many trials, however badly the mechanism leaks.
    """
    n = trials - trials // 2
    alpha = (1.0 - confidence) / 2.0
    up = float(_cp_upper(np.asarray([0]), n, alpha)[0])
    return max(0.0, math.log((1.0 - delta - up) / up))
