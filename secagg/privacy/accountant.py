"""Privacy accounting: the (epsilon, delta) that a sequence of DP rounds has spent.

Each DP round releases one decrypted sum of clipped updates carrying Gaussian noise of standard
deviation ``z * C`` (``z`` the round's noise multiplier, ``C`` the clip norm). One site changes that
sum by at most ``C`` (the zero-out relation, see :mod:`secagg.privacy.mechanism`), so a round is
the Gaussian mechanism with sensitivity 1 and noise ``z`` in units of ``C``. Every site takes part
in every round: there is no sampling to amplify privacy (sampling rate 1).

:func:`epsilon` composes rounds in Renyi DP and converts to (epsilon, delta) exactly as opacus's
``RDPAccountant`` does, in plain numpy, so the aggregator needs neither torch nor opacus.
:func:`analytic_gaussian_epsilon` is the exact value for comparison; :func:`opacus_epsilon` asks
opacus itself. Both exist to check :func:`epsilon`, which is what secagg charges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from secagg.errors import PrivacyError

# opacus.accountants.RDPAccountant.DEFAULT_ALPHAS (opacus 1.6), so that our epsilon is opacus's.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])

ACCOUNTANTS = ("rdp", "prv")


def check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise PrivacyError(f"--delta must be between 0 and 1 (exclusive), got {delta}; 1e-5 or less is usual")


def _check_noise(noise_multipliers: Sequence[float]) -> None:
    for z in noise_multipliers:
        if not (z > 0 and math.isfinite(z)):
            raise PrivacyError(
                f"a DP round needs a positive, finite --noise-multiplier, got {z}; no noise is not DP"
            )


def epsilon(noise_multipliers: Sequence[float], delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """The epsilon at ``delta`` of running one Gaussian round per entry of ``noise_multipliers``.

    RDP of the composition at order a is ``sum_i a / (2 z_i^2)``; the conversion to (epsilon, delta)
    is opacus's (Balle et al. 2020, Thm 21), minimised over ``orders``. No rounds spend nothing: 0.0.
    """
    check_delta(delta)
    _check_noise(noise_multipliers)
    if len(noise_multipliers) == 0:
        return 0.0
    a = np.asarray(orders, dtype=np.float64)
    rdp = a * sum(1.0 / (2.0 * float(z) ** 2) for z in noise_multipliers)
    eps = rdp - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    return float(np.min(eps))


def noise_multiplier_for(target_epsilon: float, delta: float, rounds: int = 1, spent: Sequence[float] = ()) -> float:
    """The smallest noise multiplier for ``rounds`` more rounds that keeps total epsilon <= ``target_epsilon``.

    ``spent`` lists the noise multipliers of rounds already run. The answer is found by bisection to
    relative precision 1e-4 and rounded up to 5 significant digits; it always satisfies
    ``epsilon([*spent, *[z] * rounds], delta) <= target_epsilon``.
    """
    check_delta(delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyError(f"--target-epsilon must be a positive number, got {target_epsilon}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PrivacyError(f"the number of rounds to plan for must be a whole number >= 1, got {rounds!r}")
    spent = [float(z) for z in spent]
    already = epsilon(spent, delta)
    if already >= target_epsilon:
        raise PrivacyError(
            f"the {len(spent)} round(s) already run spent epsilon={already:.4g} at delta={delta:g}, which reaches "
            f"--target-epsilon {target_epsilon:g}; no noise can keep more rounds within it: raise the target or stop"
        )

    def fits(z: float) -> bool:
        return epsilon([*spent, *[z] * rounds], delta) <= target_epsilon

    # epsilon decreases in z and tends to `already` < target as z grows, so a bracket exists.
    hi = 1.0
    while not fits(hi):
        hi *= 2.0
        if hi > 1e12:
            raise PrivacyError(
                f"--target-epsilon {target_epsilon:g} leaves almost no budget after epsilon={already:.4g} already "
                "spent; raise the target"
            )
    lo = hi / 2.0
    while fits(lo):
        hi, lo = lo, lo / 2.0
    while (hi - lo) > 1e-4 * hi:
        mid = (lo + hi) / 2.0
        if fits(mid):
            hi = mid
        else:
            lo = mid
    # Round up to 5 significant digits for a readable value; rounding up only adds noise.
    exponent = math.floor(math.log10(hi)) - 4
    mantissa = math.ceil(hi / 10.0**exponent)
    while True:
        z = float(f"{mantissa}e{exponent}")
        if z >= hi and fits(z):
            return z
        mantissa += 1


def opacus_epsilon(noise_multipliers: Sequence[float], delta: float, accountant: str = "rdp") -> float:
    """The same epsilon as :func:`epsilon`, computed by opacus's own accountant ("rdp" or "prv").

    One accountant step per round at sample rate 1.0. Needs opacus (``pip install 'secagg[dp]'``).
    """
    check_delta(delta)
    _check_noise(noise_multipliers)
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:
        raise PrivacyError("opacus is not installed; install it with pip install 'secagg[dp]'") from None
    if len(noise_multipliers) == 0:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for z in noise_multipliers:
        acc.step(noise_multiplier=float(z), sample_rate=1.0)
    return float(acc.get_epsilon(delta=delta))


def _log_phi(x: float) -> float:
    """log of the standard normal CDF, accurate far into the lower tail."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # erfc underflows below about -37; the asymptotic series is exact to ~1e-14 here.
    inv = 1.0 / (x * x)
    series, term = 1.0, 1.0
    for n in range(1, 7):
        term *= -(2 * n - 1) * inv
        series += term
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log(series)


def _gaussian_delta(eps: float, s: float) -> float:
    """delta(eps) of the Gaussian mechanism with noise s (sensitivity 1), Balle & Wang 2018 Thm 8."""
    a = 1.0 / (2.0 * s) - eps * s
    b = -1.0 / (2.0 * s) - eps * s
    # e^eps * Phi(b) in log space: both factors can leave float range while their product cannot.
    return math.exp(_log_phi(a)) - math.exp(eps + _log_phi(b))


def analytic_gaussian_epsilon(noise_multiplier: float, delta: float, rounds: int = 1) -> float:
    """The exact (smallest) epsilon at ``delta`` of ``rounds`` Gaussian rounds with noise ``noise_multiplier``.

    ``rounds`` Gaussians with noise z compose to one Gaussian with noise ``z / sqrt(rounds)``, whose
    privacy curve is known in closed form (Balle & Wang 2018, Thm 8); epsilon is found by bisection
    and returned rounded up (relative 1e-12).
    """
    check_delta(delta)
    _check_noise([noise_multiplier])
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PrivacyError(f"rounds must be a whole number >= 1, got {rounds!r}")
    s = noise_multiplier / math.sqrt(rounds)
    if _gaussian_delta(0.0, s) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _gaussian_delta(hi, s) > delta:  # delta(eps) decreases in eps
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2.0
        if _gaussian_delta(mid, s) > delta:
            lo = mid
        else:
            hi = mid
    return hi
