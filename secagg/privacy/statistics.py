"""Differential privacy for merge statistics: row-clipped sums of second moments.

The statistics exchanges (readout, hybrid, linear) send sums over a site's training rows of
``r r^T`` with ``r = [z, y]`` (features, input window, 1, target). One row changes such a sum by
``r r^T``, whose L2 (Frobenius) norm is ``||r||^2``. So each site scales every row to
``||r||^2 <= clip_norm`` before summing: adding or removing one row then moves the site's
contribution, and the sum over sites, by at most ``clip_norm``, and Gaussian noise of std
``noise_multiplier * clip_norm`` on the summed vector is the Gaussian mechanism with that noise
multiplier, accounted by :mod:`secagg.privacy.accountant` like a weight release.

**The unit of privacy is one training row (one input window), not a site.** A site-level
guarantee for statistics would need noise of the size of a whole site's sum, which drowns it.
One hour of a series appears in up to window + horizon rows: protecting an hour is group
privacy over that many rows. A DP round of this kind carries ``unit: "row"`` in its settings,
so every site and the privacy officer can see which guarantee it gives.

:class:`RowSums` marks a contribution built here; :func:`secagg.api.submit` refuses any other
contribution to a row-level round, because a round of that kind adds noise without clipping the
whole vector (the clipping happened row by row, here).
"""

from __future__ import annotations

import numpy as np

from secagg.errors import PrivacyError

#: Default bound on ``||r||^2`` per row, as a multiple of the row's width: normalized data gives
#: entries of order 1, so a typical row has ``||r||^2`` near its width; twice that clips only outliers.
CLIP_PER_WIDTH = 2.0


class RowSums(dict):
    """Named sums of row-clipped second moments; ``clip_norm`` bounds one row's contribution (L2)."""

    def __init__(self, tensors: dict[str, np.ndarray], clip_norm: float) -> None:
        super().__init__(tensors)
        self.clip_norm = float(clip_norm)


def default_clip_norm(width: int) -> float:
    """The default bound on one row's ``||r||^2`` for rows of ``width`` values."""
    return CLIP_PER_WIDTH * width


def clip_rows(rows: np.ndarray, clip_norm: float) -> np.ndarray:
    """``rows`` with each row scaled so that ``||r||^2 <= clip_norm`` (a copy, float64)."""
    rows = np.array(rows, dtype=np.float64)
    if not np.all(np.isfinite(rows)):
        raise PrivacyError("a statistics row is not finite (the model's features diverged on this site's data); "
                           "fix the model before a DP exchange")
    if not clip_norm > 0:
        raise PrivacyError(f"the row clip norm must be positive, got {clip_norm!r}")
    sq = np.einsum("ij,ij->i", rows, rows)
    scale = np.where(sq > clip_norm, np.sqrt(clip_norm / np.maximum(sq, 1e-300)), 1.0)
    rows *= scale[:, None]
    # Rounding can leave a row an ulp above the bound; the sensitivity is a hard bound, so nudge down.
    over = np.einsum("ij,ij->i", rows, rows) > clip_norm
    while np.any(over):
        rows[over] *= 1.0 - 2.0**-50
        over = np.einsum("ij,ij->i", rows, rows) > clip_norm
    return rows


def second_moments(name: str, rows: np.ndarray, clip_norm: float) -> RowSums:
    """``{name: R^T R}`` of the row-clipped ``rows``: one row moves it by at most ``clip_norm`` (L2)."""
    r = clip_rows(rows, clip_norm)
    return RowSums({name: r.T @ r}, clip_norm)


def moments_from_release(average: np.ndarray) -> np.ndarray:
    """The released (noised) ``R^T R`` made symmetric and positive semi-definite (post-processing)."""
    m = (np.asarray(average, dtype=np.float64) + np.asarray(average, dtype=np.float64).T) / 2
    values, vectors = np.linalg.eigh(m)
    return (vectors * np.maximum(values, 0.0)) @ vectors.T
