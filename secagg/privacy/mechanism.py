"""Client-level DP for one round: clip each site's update, add Gaussian noise before encryption.

What is protected (the neighbouring relation): two federations are neighbours when one site's
update is replaced by a zero update ("zero-out"; the site still submits, so the count of
contributions, which secagg reveals anyway, is the same). A clipped update has L2 norm at most
``C``, so one site moves the sum by at most ``C``: sensitivity ``C``, which is what
:mod:`secagg.privacy.accountant` assumes. Replacing one site's update by another arbitrary one is
two zero-out steps (sensitivity ``2C``): its epsilon is that of noise multiplier ``z / 2``.

Where the noise comes from:

- ``local``: every site adds noise of std ``z * C`` itself, so each submission on its own is
  DP, even if it were decrypted alone. The sum carries more noise than the accountant counts.
- ``distributed``: every site adds std ``z * C / sqrt(k)``; any ``k`` honest sites together put
  std ``z * C`` on the sum. This holds while at least ``k`` honest sites (the protected one among
  them) are in every released sum: the round must not close with fewer than ``k`` contributions
  (``--min-clients`` >= ``--min-honest``), and sites that collude with the aggregator can subtract
  their own noise.

The accountant's epsilon is for the unweighted sum: DP rounds use equal weights (1), otherwise a
site's weight would scale its sensitivity.

The noise is numpy's floating-point Gaussian. Its low-order bits are not hardened against the
floating-point attacks of Mironov (2012); the analysis treats it as an exact Gaussian.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from typing import Any

import numpy as np

from secagg.errors import ModelFormatError, PrivacyError

MODES = ("local", "distributed")
UNITS = ("site", "row")
#: Sane range of noise multipliers: the accountant's arithmetic (alpha / (2 z^2)) stays finite.
MIN_NOISE_MULTIPLIER = 1e-6
MAX_NOISE_MULTIPLIER = 1e6


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """A round's DP settings. ``validate`` before use; ``from_dict`` validates for you.

    ``clip_norm`` C bounds the L2 norm of one site's contribution (its update relative to a
    reference model, or its whole vector). The decrypted sum carries Gaussian noise of std
    ``noise_multiplier * C``. ``min_honest`` k is the number of honest contributions distributed
    mode counts on (ignored in local mode).
    """

    clip_norm: float
    noise_multiplier: float
    delta: float
    mode: str
    min_honest: int
    #: "site" (client-level: a whole contribution is clipped to C here) or "row" (row-level: the
    #: contribution is a sum of rows each bounded by C, clipped by :mod:`secagg.privacy.statistics`).
    unit: str = "site"

    def validate(self) -> DPConfig:
        """Raise :class:`PrivacyError` naming the setting to fix; return ``self`` if all are sound."""
        if not (isinstance(self.clip_norm, numbers.Real) and self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise PrivacyError(
                f"--clip-norm must be a positive number (the largest L2 norm of one site's update), got {self.clip_norm!r}"
            )
        z = self.noise_multiplier
        if not (isinstance(z, numbers.Real) and z >= 0 and math.isfinite(z)):
            raise PrivacyError(f"--noise-multiplier must be a non-negative number, got {z!r}")
        if z != 0 and not MIN_NOISE_MULTIPLIER <= z <= MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"--noise-multiplier {z!r} is outside [{MIN_NOISE_MULTIPLIER}, {MAX_NOISE_MULTIPLIER}]: below, the "
                "epsilon is astronomically large (no privacy); above, the noise drowns any model"
            )
        if z == 0:
            raise PrivacyError(
                "--noise-multiplier 0 adds no noise, and no noise is not DP; give a positive "
                "--noise-multiplier or a --target-epsilon"
            )
        if not (isinstance(self.delta, numbers.Real) and 0 < self.delta < 1):
            raise PrivacyError(f"--delta must be between 0 and 1 (exclusive), got {self.delta!r}; 1e-5 or less is usual")
        if self.mode not in MODES:
            raise PrivacyError(f"--dp-mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.unit not in UNITS:
            raise PrivacyError(f"the DP unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if isinstance(self.min_honest, bool) or not isinstance(self.min_honest, numbers.Integral) or self.min_honest < 1:
            raise PrivacyError(
                f"--min-honest must be a whole number >= 1 (and at most --min-clients), got {self.min_honest!r}"
            )
        return self

    def site_noise_std(self) -> float:
        """The std of the noise one site adds to each coordinate of its update."""
        std = self.noise_multiplier * self.clip_norm
        return std if self.mode == "local" else std / math.sqrt(self.min_honest)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields, for the round's status and the wire."""
        d = {"clip_norm": float(self.clip_norm), "noise_multiplier": float(self.noise_multiplier),
             "delta": float(self.delta), "mode": str(self.mode), "min_honest": int(self.min_honest)}
        # Only row-level rounds name their unit: site-level settings stay byte-identical to earlier versions.
        return d | ({"unit": self.unit} if self.unit != "site" else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DPConfig:
        """The validated config from :meth:`to_dict`'s output. Missing or unknown keys raise ``KeyError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise KeyError(f"unknown DP setting(s) {sorted(unknown)}")
        config = cls(
            clip_norm=float(d["clip_norm"]),
            noise_multiplier=float(d["noise_multiplier"]),
            delta=float(d["delta"]),
            mode=str(d["mode"]),
            min_honest=_whole(d["min_honest"]),
            unit=str(d.get("unit", "site")),
        )
        return config.validate()


def _whole(value: Any) -> int:
    """An int from JSON, refusing 2.5 or True instead of truncating them."""
    if isinstance(value, bool) or not float(value).is_integer():
        raise PrivacyError(f"--min-honest must be a whole number >= 1, got {value!r}")
    return int(value)


def clip(update: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """A float64 copy of ``update`` scaled by ``min(1, clip_norm / norm)``, and the original L2 norm."""
    out = np.array(update, dtype=np.float64)  # always a copy
    if not np.all(np.isfinite(out)):
        # A NaN norm would compare false with C and skip clipping: refuse rather than leak.
        raise PrivacyError("the update contains NaN or infinite values; fix the model before a DP submission")
    norm = float(np.linalg.norm(out))
    if norm > clip_norm:
        out *= clip_norm / norm
        # Rounding can leave the norm an ulp above C; the sensitivity is a hard bound, so nudge down.
        while np.linalg.norm(out) > clip_norm:
            out *= 1.0 - 2.0**-50
    return out, norm


def privatize(
    theta: np.ndarray,
    config: DPConfig,
    reference: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    *,
    _noise: bool = True,
) -> np.ndarray:
    """A site's DP submission: ``reference + clip(theta - reference) + noise``, same shape as ``theta``.

    Without ``reference`` the whole vector is clipped and noised. The noise is Gaussian with std
    ``config.site_noise_std()`` per coordinate, drawn from ``rng`` (default: a generator seeded from
    the OS's secure randomness). ``_noise=False`` is for the audit test only (it shows the audit
    notices a missing noise); a submission made with it has no privacy at all.
    """
    config.validate()
    theta = np.asarray(theta, dtype=np.float64)
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float64)
        if reference.shape != theta.shape:
            raise ModelFormatError(
                f"the DP reference model has shape {reference.shape}, the update {theta.shape}; "
                "use the round's previous global model of the same architecture"
            )
    update = theta if reference is None else theta - reference
    if config.unit == "row":
        # Clipped row by row when the statistic was built (secagg.privacy.statistics.RowSums, checked by
        # secagg.api.submit); clipping the whole sum to C here would destroy it.
        if reference is not None:
            raise PrivacyError("a row-level DP round takes statistics, not a model update relative to a reference")
        clipped = np.array(update, dtype=np.float64)
        if not np.all(np.isfinite(clipped)):
            raise PrivacyError("the statistics contain NaN or infinite values; fix the model before a DP submission")
    else:
        clipped, _ = clip(update, config.clip_norm)
    if _noise:
        if rng is None:
            rng = np.random.default_rng(secrets.randbits(128))
        clipped += rng.normal(0.0, config.site_noise_std(), size=clipped.shape)
    return clipped if reference is None else reference + clipped
