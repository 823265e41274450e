"""One scaler format: how a site maps raw values to the normalized space its model works in.

Per feature (column of the raw data), optionally ``log1p`` first, then one of two kinds:

* ``standard``: ``z = (f(v) - mean) / std``
* ``minmax``:   ``z = lo + (f(v) - min) / (max - min) * (hi - lo)``, ``(lo, hi)`` the feature range
  (default ``(0, 1)``)

with ``f = log1p`` if ``log1p`` else the identity. The inverse undoes both steps (``expm1`` for
log1p). A scaler file is JSON::

    {"format": "secagg-scaler", "version": 1, "kind": "minmax", "log1p": true,
     "min": [0.0], "max": [8.31], "feature_range": [0.0, 1.0], "rows": 4320}

    {"format": "secagg-scaler", "version": 1, "kind": "standard", "log1p": true,
     "mean": [5.92], "std": [1.41], "rows": 4320}

``rows`` (optional) is how many rows the statistics came from. Files of the earlier form
``{"mean": ..., "std": ..., "log1p": ...}`` (numbers or lists) are read as ``standard``.

Your own code can use :class:`Scaler` (``secagg.Scaler.load("s.json").inverse(z)``) or do the same
from the JSON in three lines::

    s = json.load(open("s.json")); f = np.log1p(v) if s["log1p"] else v    # v: a numpy array
    if s["kind"] == "standard": z = (f - s["mean"]) / s["std"]
    else: lo, hi = s["feature_range"]; z = lo + (f - s["min"]) / np.subtract(s["max"], s["min"]) * (hi - lo)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from secagg.errors import ScalerError

FORMAT = "secagg-scaler"
VERSION = 1
KINDS = ("standard", "minmax")


def _vector(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ScalerError(f"scaler field {name!r} must be a number or a list of numbers, got {value!r}") from exc
    if arr.ndim != 1 or len(arr) == 0:
        raise ScalerError(f"scaler field {name!r} must be a number or a flat list of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ScalerError(f"scaler field {name!r} holds a NaN or infinite value: {arr.tolist()}")
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class Scaler:
    """Raw values <-> a model's normalized space, per feature (see the module docstring).

    ``standard`` scalers have ``mean`` and ``std``, ``minmax`` scalers ``min``, ``max`` and
    ``feature_range``; each a float64 array with one entry per feature.
    """

    kind: str
    log1p: bool = False
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    feature_range: tuple[float, float] = (0.0, 1.0)
    rows: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScalerError(f"unknown scaler kind {self.kind!r}; use 'standard' (mean/std) or 'minmax' (min/max)")
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        put("log1p", bool(self.log1p))
        if self.kind == "standard":
            if self.mean is None or self.std is None:
                raise ScalerError("a 'standard' scaler needs 'mean' and 'std'")
            put("mean", _vector("mean", self.mean))
            put("std", _vector("std", self.std))
            if len(self.mean) != len(self.std):
                raise ScalerError(f"scaler has {len(self.mean)} means but {len(self.std)} stds: one of each per "
                                  "feature")
            if np.any(self.std <= 0):
                raise ScalerError(f"scaler 'std' must be positive, got {self.std.tolist()}")
        else:
            if self.min is None or self.max is None:
                raise ScalerError("a 'minmax' scaler needs 'min' and 'max'")
            put("min", _vector("min", self.min))
            put("max", _vector("max", self.max))
            if len(self.min) != len(self.max):
                raise ScalerError(f"scaler has {len(self.min)} mins but {len(self.max)} maxes: one of each per feature")
            if np.any(self.max <= self.min):
                raise ScalerError(f"scaler 'max' must exceed 'min' for every feature, got min {self.min.tolist()}, "
                                  f"max {self.max.tolist()}")
            lo_hi = _vector("feature_range", self.feature_range)
            if len(lo_hi) != 2 or lo_hi[1] <= lo_hi[0]:
                raise ScalerError(f"scaler 'feature_range' must be [lo, hi] with lo < hi, got {lo_hi.tolist()}")
            put("feature_range", (float(lo_hi[0]), float(lo_hi[1])))
        if self.rows is not None:
            put("rows", int(self.rows))

    # -- the map -------------------------------------------------------------------------------

    @property
    def features(self) -> int:
        """Number of features (columns) this scaler maps."""
        return len(self.mean if self.kind == "standard" else self.min)

    def _affine(self, feature: int | None) -> tuple[np.ndarray, np.ndarray]:
        """``(offset, slope)`` with z = offset + slope * f(v), per feature or for one feature."""
        if self.kind == "standard":
            slope, offset = 1.0 / self.std, -self.mean / self.std
        else:
            lo, hi = self.feature_range
            slope = (hi - lo) / (self.max - self.min)
            offset = lo - self.min * slope
        if feature is None:
            return offset, slope
        if not -self.features <= feature < self.features:
            raise ScalerError(f"feature {feature} does not exist: the scaler has {self.features} feature(s); "
                              "give the target's column index (--column)")
        return offset[feature], slope[feature]

    def transform(self, values: np.ndarray, feature: int | None = None) -> np.ndarray:
        """Raw values -> normalized. ``values`` is (rows, features) or (rows,) for one feature;
        with ``feature`` every value is mapped with that feature's parameters."""
        v = np.asarray(values, dtype=np.float64)
        if self.log1p:
            if np.any(v[np.isfinite(v)] <= -1):
                raise ScalerError("this scaler applies log1p, which needs values > -1; the data holds values <= -1 "
                                  "(use a scaler fitted without --log1p for signed data)")
            v = np.log1p(v)
        offset, slope = self._affine(feature)
        return offset + slope * self._shaped(v, feature)

    def inverse(self, z: np.ndarray, feature: int | None = None) -> np.ndarray:
        """Normalized -> raw values (the inverse of :meth:`transform`)."""
        z = np.asarray(z, dtype=np.float64)
        offset, slope = self._affine(feature)
        f = (self._shaped(z, feature) - offset) / slope
        return np.expm1(f) if self.log1p else f

    def _shaped(self, a: np.ndarray, feature: int | None) -> np.ndarray:
        if feature is not None or a.ndim == 0:
            return a
        if a.ndim == 1 and self.features == 1:
            return a
        if a.shape[-1] != self.features:
            raise ScalerError(f"data has {a.shape[-1]} feature(s) in its last axis but the scaler maps "
                              f"{self.features}; scale one column with feature=INDEX (--column)")
        return a

    def feature(self, index: int) -> "Scaler":
        """The scaler of one feature alone."""
        self._affine(index)
        pick = lambda a: None if a is None else a[index : index + 1 or None]  # noqa: E731
        return dataclasses.replace(self, mean=pick(self.mean), std=pick(self.std), min=pick(self.min),
                                   max=pick(self.max))

    # -- fitting -------------------------------------------------------------------------------

    @classmethod
    def fit(cls, values: np.ndarray, kind: str = "standard", log1p: bool = False,
            feature_range: tuple[float, float] = (0.0, 1.0)) -> "Scaler":
        """Fit on raw ``values`` (rows, features) or (rows,); rows with a NaN or inf are skipped.

        A constant feature gets std 1 (standard) or max = min + 1 (minmax), so it maps to a
        constant instead of dividing by zero.
        """
        if kind not in KINDS:
            raise ScalerError(f"unknown scaler kind {kind!r}; use 'standard' (mean/std) or 'minmax' (min/max)")
        f = finite_rows(values)
        if log1p:
            if np.any(f <= -1):
                raise ScalerError("log1p scaling needs values > -1 (counts, amounts); drop --log1p for signed data")
            f = np.log1p(f)
        if kind == "standard":
            std = f.std(axis=0)
            return cls("standard", log1p, mean=f.mean(axis=0), std=np.where(std > 1e-12, std, 1.0), rows=len(f))
        lo, hi = f.min(axis=0), f.max(axis=0)
        return cls("minmax", log1p, min=lo, max=np.where(hi - lo > 1e-12, hi, lo + 1.0),
                   feature_range=feature_range, rows=len(f))

    # -- files ---------------------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON form (see the module docstring)."""
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": self.kind, "log1p": self.log1p}
        if self.kind == "standard":
            d.update(mean=self.mean.tolist(), std=self.std.tolist())
        else:
            d.update(min=self.min.tolist(), max=self.max.tolist(), feature_range=list(self.feature_range))
        if self.rows is not None:
            d["rows"] = self.rows
        return d

    @classmethod
    def from_json_dict(cls, d: Any) -> "Scaler":
        """A scaler from its JSON form, or from the earlier ``{mean, std, log1p}`` form."""
        if not isinstance(d, dict):
            raise ScalerError(f"a scaler is a JSON object, got {type(d).__name__}")
        if "version" not in d and "kind" not in d:  # the earlier form: standard, mean and std only
            missing = [k for k in ("mean", "std") if k not in d]
            if missing:
                raise ScalerError(f"a scaler is JSON with 'version' and 'kind' (or the earlier form with 'mean', 'std' "
                                  f"and optional 'log1p'); this one has neither: missing {missing}")
            return cls("standard", _flag(d.get("log1p", False)), mean=d["mean"], std=d["std"])
        if d.get("version") != VERSION:
            raise ScalerError(f"unsupported scaler version {d.get('version')!r}: this secagg reads version {VERSION}; "
                              "upgrade secagg or write the file again with `secagg scaler`")
        kind = d.get("kind")
        need = {"standard": ("mean", "std"), "minmax": ("min", "max")}.get(kind)
        if need is None:
            raise ScalerError(f"scaler 'kind' must be 'standard' or 'minmax', got {kind!r}")
        missing = [k for k in need if k not in d]
        if missing:
            raise ScalerError(f"a {kind!r} scaler needs {list(need)}; missing {missing}")
        rows = d.get("rows")
        if rows is not None and (not isinstance(rows, (int, float)) or rows < 0 or not math.isfinite(rows)):
            raise ScalerError(f"scaler 'rows' must be a non-negative count, got {rows!r}")
        fields = {k: d[k] for k in need}
        if kind == "minmax":
            fields["feature_range"] = d.get("feature_range", (0.0, 1.0))
        return cls(kind, _flag(d.get("log1p", False)), rows=None if rows is None else int(rows), **fields)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scaler":
        """Read a scaler file; a :class:`ScalerError` names the file and what is wrong with it."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ScalerError(f"cannot read the scaler file {path}: {exc.strerror or exc}") from exc
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise ScalerError(f"{path}: a scaler file must be JSON ({exc}); write one with `secagg scaler`") from exc
        try:
            return cls.from_json_dict(d)
        except ScalerError as exc:
            raise ScalerError(f"{path}: {exc}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON form to ``path``; returns it."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json_dict(), indent=1) + "\n")
        return path


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ScalerError(f"scaler 'log1p' must be true or false, got {value!r}")
    return value


def finite_rows(values: np.ndarray) -> np.ndarray:
    """``values`` as float64 (rows, features) without the rows that hold a NaN or inf; refuses none left."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2:
        raise ScalerError(f"raw values must be (rows, features), got shape {v.shape}")
    v = v[np.all(np.isfinite(v), axis=1)]
    if len(v) == 0:
        raise ScalerError("no finite rows to compute scaling statistics from")
    return v


def load_values(path: str | os.PathLike) -> np.ndarray:
    """The array ``values`` (rows, features) of raw values, in time order, from an ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as d:
            names = list(d.files)
            values = np.asarray(d["values"], dtype=np.float64) if "values" in names else None
    except (OSError, ValueError) as exc:
        raise ScalerError(f"{path}: cannot read raw data: an .npz with an array 'values' (rows, features) is "
                          f"needed ({exc})") from exc
    if values is None:
        raise ScalerError(f"{path}: needs an array 'values' (rows, features) of raw values in time order; "
                          f"it has {sorted(names)}")
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or len(values) == 0:
        raise ScalerError(f"{path}: 'values' must be (rows, features) with at least one row, got shape {values.shape}")
    return values
