"""A shared scaler from encrypted sums: every site, and every new site, normalizes the same way.

Each site contributes its per-feature mean and mean of squares of f(values), f = log1p or the
identity, weighted by its number of rows; the decrypted average is the pooled mean and second
moment, from which every site computes the same mean and standard deviation. No site reveals its
statistics. A site that later joins uses the published scaler as is.

Why it matters: a model trained in one normalized space and de-normalized with another site's
statistics gives forecasts whose shape is right and whose values are wrong ("trend right, values
wrong"). Either every site de-normalizes with its own statistics, or all share this scaler.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from secagg.errors import SecAggError
from secagg.merge.protocol import Exchange, SiteProtocol


@dataclasses.dataclass(frozen=True)
class SharedScaler:
    """z = (f(v) - mean) / std per feature, f = log1p if ``log1p``."""

    mean: np.ndarray
    std: np.ndarray
    log1p: bool
    site_rows: float  # this site's own row count (the pooled count is not needed)

    def transform(self, values: np.ndarray) -> np.ndarray:
        f = np.log1p(values) if self.log1p else values
        return (f - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        f = z * self.std + self.mean
        return np.expm1(f) if self.log1p else f

    def save(self, path: str | Path) -> Path:
        data = {"mean": self.mean.tolist(), "std": self.std.tolist(), "log1p": self.log1p, "site_rows": self.site_rows}
        if len(self.mean) == 1:  # a single feature is written as numbers, as `secagg diagnose --scaler` reads it
            data.update(mean=float(self.mean[0]), std=float(self.std[0]))
        Path(path).write_text(json.dumps(data, indent=1))
        return Path(path)


def shared_scaler(values: np.ndarray, log1p: bool = True, value_bound: float = 1e3) -> SiteProtocol:
    """Protocol: contribute this site's moments, return the pooled :class:`SharedScaler`.

    ``value_bound`` caps |f(v)|^2 and must be the same at every site (it sizes the round).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    values = values[np.all(np.isfinite(values), axis=1)]
    if len(values) == 0:
        raise SecAggError("no finite rows to compute scaling statistics from")
    if log1p and np.any(values <= -1):
        raise SecAggError("log1p scaling needs values > -1 (counts, amounts); drop --log1p for signed data")
    f = np.log1p(values) if log1p else values
    pooled = yield Exchange("scaling", {"mean": f.mean(axis=0), "sq": (f**2).mean(axis=0)}, float(len(f)),
                            value_bound=value_bound)
    var = np.maximum(pooled["sq"] - pooled["mean"] ** 2, 0.0)
    std = np.where(var > 1e-24, np.sqrt(var), 1.0)
    return SharedScaler(pooled["mean"], std, log1p, float(len(f)))
