"""A shared scaler from encrypted sums: every site, and every new site, normalizes the same way.

Each site contributes its per-feature mean and mean of squares of f(values), f = log1p or the
identity, weighted by its number of rows; the decrypted average is the pooled mean and second
moment, from which every site computes the same mean and standard deviation. No site reveals its
statistics. A site that later joins uses the published scaler as is.

Only ``standard`` scaling can be shared this way. A shared ``minmax`` scaler needs the minimum and
maximum over all sites, and a sum cannot give a maximum: it would take each site's own extremes
(e.g. its busiest hour) in the clear, which is what secure aggregation exists to hide. So
:func:`shared_scaler` refuses ``minmax``; share a ``standard`` scaler, or let every site use its
own min-max scaler (``secagg scaler --local``) and de-scale its own forecasts with it.

Why it matters: a model trained in one normalized space and de-normalized with another site's
statistics gives forecasts whose shape is right and whose values are wrong ("trend right, values
wrong"). Either every site de-normalizes with its own statistics, or all share this scaler.
"""

from __future__ import annotations

import numpy as np

from secagg.errors import ScalerError
from secagg.merge.protocol import Exchange, SiteProtocol
from secagg.scaler import Scaler, finite_rows

SHARED_MINMAX_REFUSED = (
    "a shared min-max scaler needs the minimum and maximum over all sites, and an encrypted sum cannot give a "
    "maximum without revealing each site's own extremes; share a standard scaler (--kind standard), or let each "
    "site fit its own min-max scaler with --local and de-scale its own forecasts with it"
)


def shared_scaler(values: np.ndarray, log1p: bool = True, value_bound: float = 1e3,
                  kind: str = "standard") -> SiteProtocol:
    """Protocol: contribute this site's moments, return the pooled :class:`~secagg.scaler.Scaler`.

    ``value_bound`` caps |f(v)|^2 and must be the same at every site (it sizes the round). The
    returned scaler's ``rows`` is this site's own row count (the pooled count is not revealed).
    """
    if kind == "minmax":
        raise ScalerError(SHARED_MINMAX_REFUSED)
    if kind != "standard":
        raise ScalerError(f"unknown scaler kind {kind!r}; a shared scaler is 'standard' (mean/std)")
    values = finite_rows(values)
    if log1p and np.any(values <= -1):
        raise ScalerError("log1p scaling needs values > -1 (counts, amounts); drop --log1p for signed data")
    f = np.log1p(values) if log1p else values
    pooled = yield Exchange("scaling", {"mean": f.mean(axis=0), "sq": (f**2).mean(axis=0)}, float(len(f)),
                            value_bound=value_bound)
    var = np.maximum(pooled["sq"] - pooled["mean"] ** 2, 0.0)
    std = np.where(var > 1e-24, np.sqrt(var), 1.0)
    return Scaler("standard", log1p, mean=pooled["mean"], std=std, rows=len(f))
