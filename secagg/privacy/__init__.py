"""Client-level differential privacy: clip and noise each site's update, and count what rounds spend.

:mod:`~secagg.privacy.mechanism` is what a site runs before encrypting; :mod:`~secagg.privacy.accountant`
is what the aggregator charges (plain numpy); :mod:`~secagg.privacy.audit` is the empirical check of
the two used by the tests (it needs scipy).
"""

from secagg.privacy.accountant import (
    DEFAULT_ORDERS,
    analytic_gaussian_epsilon,
    epsilon,
    noise_multiplier_for,
    opacus_epsilon,
)
from secagg.privacy.audit import clopper_pearson, epsilon_lower_bound, max_auditable_epsilon
from secagg.privacy.mechanism import MODES, DPConfig, clip, privatize

__all__ = [
    "DEFAULT_ORDERS",
    "MODES",
    "DPConfig",
    "analytic_gaussian_epsilon",
    "clip",
    "clopper_pearson",
    "epsilon",
    "epsilon_lower_bound",
    "max_auditable_epsilon",
    "noise_multiplier_for",
    "opacus_epsilon",
    "privatize",
]
