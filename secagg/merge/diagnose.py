"""``secagg diagnose``: say why a merged model gives nonsense on a site's data.

The merged model is run in its own framework (Keras, or PyTorch with the user's ``nn.Module``:
:class:`secagg.models.framework.FrameworkModel`), so any model the framework can run is diagnosed,
BatchNormalization, Normalization, Bidirectional and TimeDistributed layers included. Its
predictions are regressed on the truth in the site's normalized space:

* correlation near 0: the hidden units of the merged models were in different orders (plain
  averaging of independently initialized networks destroyed the function);
* high correlation, slope well below 1: partial misalignment damped the output;
* high correlation, slope near 1: the merge is fine; if values look wrong in original units,
  the de-scaling is wrong (another site's scaler, or none).

Which outputs are compared: a model with one output per sample against ``y`` (samples, 1); a
model with several outputs against ``y`` of the same size, all of them; a sequence output
(samples, steps, outputs), e.g. a TimeDistributed head, against all steps if ``y`` holds every
step, else its last step against ``y`` (samples, outputs).

The scaler is checked separately, whatever the verdict above: with ``--scaler`` and the raw
targets ``y_raw`` in the data file, the true normalized targets de-scaled with the given scaler
must give ``y_raw`` back (``scaler_ok``). The site's own scaler is recovered from ``(y, y_raw)``
(the affine map between them, after log1p or not) in the given scaler's kind, and the model's
raw-unit error is reported with both scalers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from secagg.errors import ModelFormatError, ScalerError
from secagg.scaler import Scaler

PERMUTED_CORRELATION = 0.3
GOOD_CORRELATION = 0.6
DAMPED_SLOPE = 0.6
#: The given scaler is right if it maps the true normalized targets back to y_raw within this
#: fraction of y_raw's standard deviation (RMSE); float32 rounding of y is far below it.
SCALER_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The regression of predictions on truth, the scaler check, and what they mean.

    ``verdict`` is about the model in the site's normalized space ("permuted", "damped", "weak",
    "ok"), or "descaling" when the model is fine there and the given scaler is wrong.
    ``scaler_ok`` (None without ``--scaler``) is reported with every verdict.
    """

    samples: int
    correlation: float
    slope: float
    intercept: float
    nrmse: float
    verdict: str  # "permuted", "damped", "weak", "ok", "descaling"
    advice: str
    raw_rmse: float | None = None
    raw_rmse_own_scaler: float | None = None
    scaler_ok: bool | None = None
    scaler_error: float | None = None  # RMSE of y_raw against the true y de-scaled with the given scaler
    own_scaler: dict[str, Any] | None = None  # this site's scaler, recovered from (y, y_raw)
    compared: str = "output"  # "output", "outputs", "last step" or "all steps"

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)


def diagnose(model: str | Path, data: str | Path, scaler: str | Path | Scaler | None = None, *, column: int = 0,
             torch_module: Any = None, torch_kwargs: Any = None) -> Diagnosis:
    """Diagnose ``model`` on a site's DATA npz (``x``, ``y`` normalized; optional ``y_raw``).

    ``scaler``: the scaler used to de-normalize (a file or a :class:`Scaler`); ``column``: which
    of its features is the target, if it has several. A PyTorch state dict needs
    ``torch_module`` (and ``torch_kwargs``), see :mod:`secagg.models.framework`.
    """
    from secagg.merge.simulate import load_site_data
    from secagg.models.framework import FrameworkModel

    x, y = load_site_data(data)
    output = FrameworkModel.load(model, torch_module, torch_kwargs).predict(x)
    pick, compared = _comparison(output, y, model, data)
    pred, truth = pick(output), y.reshape(-1)
    if len(truth) < 2 or np.std(truth) < 1e-12:
        raise ModelFormatError(f"{data}: diagnosing needs at least two samples with different targets 'y'")
    corr = float(np.corrcoef(pred, truth)[0, 1]) if np.std(pred) > 1e-12 else 0.0
    slope, intercept = (float(v) for v in np.polyfit(truth, pred, 1))
    nrmse = float(np.sqrt(np.mean((pred - truth) ** 2)) / np.std(truth))
    verdict, advice = _verdict(corr, slope)
    if scaler is None:
        return Diagnosis(len(y), corr, slope, intercept, nrmse, verdict, advice, compared=compared)

    given = scaler if isinstance(scaler, Scaler) else Scaler.load(scaler)
    given = given.feature(column) if given.features > 1 else given
    with np.load(data, allow_pickle=False) as d:
        if "y_raw" not in d:
            raise ScalerError(f"{data}: --scaler needs the raw targets as array 'y_raw' in the data file")
        y_raw = np.asarray(d["y_raw"], dtype=np.float64)
    if y_raw.size != y.size:
        raise ScalerError(f"{data}: 'y_raw' has {y_raw.size} values but 'y' has {y.size}; y_raw must be y in raw units")
    y_raw = y_raw.reshape(-1)
    # Wild predictions are clipped near the truth's range, only so that their raw values stay finite.
    span = np.ptp(truth)
    shown = np.clip(pred, truth.min() - 10 * span, truth.max() + 10 * span)
    with np.errstate(over="ignore", invalid="ignore"):
        scaler_error = _rmse(given.inverse(truth), y_raw)
        raw_rmse = _rmse(given.inverse(shown), y_raw)
    own = own_scaler(truth, y_raw, given)
    raw_own = _rmse(own.inverse(shown), y_raw) if own is not None else None
    scaler_ok = bool(scaler_error <= SCALER_TOLERANCE * max(np.std(y_raw), 1e-12))
    if not scaler_ok:
        if verdict == "ok":
            verdict = "descaling"
        advice = f"{advice} {_scaler_advice(scaler_error, raw_rmse, raw_own)}"
    return Diagnosis(len(y), corr, slope, intercept, nrmse, verdict, advice, raw_rmse, raw_own, scaler_ok,
                     scaler_error, own.to_json_dict() if own is not None else None, compared)


def _comparison(output: np.ndarray, y: np.ndarray, model, data):
    """Which model outputs are compared with ``y`` (samples, k): a function of the output, and its name."""
    n, k = y.shape
    per_sample = output.reshape(n, -1).shape[1] if n else 0
    if per_sample == k:
        return (lambda o: o.reshape(-1)), ("output" if k == 1 else "outputs" if output.ndim == 2 else "all steps")
    if output.ndim == 3 and output.shape[2] == k:
        return (lambda o: o[:, -1, :].reshape(-1)), "last step"
    raise ModelFormatError(f"{model} gives {output.shape[1:]} per sample but {data} has {k} target(s) per sample "
                           "in 'y'; give y as the model's output (or, for a sequence output, its last step)")


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def own_scaler(z: np.ndarray, raw: np.ndarray, like: Scaler) -> Scaler | None:
    """The site's own scaler, recovered from its normalized targets ``z`` and raw targets ``raw``.

    Every scaler is an affine map of f(raw), f = log1p or the identity: z = a f + b is fitted
    (log1p as in ``like`` first), and written in ``like``'s kind (mean/std or min/max with its
    feature range). None if neither f makes z an affine function of the raw values.
    """
    z, raw = np.asarray(z, np.float64).reshape(-1), np.asarray(raw, np.float64).reshape(-1)
    for log1p in (like.log1p, not like.log1p):
        if log1p and np.any(raw <= -1):
            continue
        f = np.log1p(raw) if log1p else raw
        if np.ptp(f) < 1e-12:
            return None
        a, b = np.polyfit(f, z, 1)
        if a > 0 and np.max(np.abs(a * f + b - z)) < 1e-3 * max(np.std(z), 1e-12) + 1e-6:
            if like.kind == "standard":
                return Scaler("standard", log1p, mean=[-b / a], std=[1 / a])
            lo, hi = like.feature_range
            low = (lo - b) / a
            return Scaler("minmax", log1p, min=[low], max=[low + (hi - lo) / a], feature_range=(lo, hi))
    return None


def _scaler_advice(scaler_error: float, raw_rmse: float, raw_own: float | None) -> str:
    versus = f" against {raw_own:.4g} with this site's own scaler (own_scaler)" if raw_own is not None else ""
    return (f"The given scaler is not this site's: it de-scales the true targets with RMSE {scaler_error:.4g} and the "
            f"model's predictions with RMSE {raw_rmse:.4g}{versus}. De-normalize each site's predictions with its own "
            "statistics (a new site fits its own scaler on its own history: secagg scaler --local), never another "
            "site's scaler, or share one scaler across sites (secagg scaler, a scaling round).")


def _verdict(corr: float, slope: float) -> tuple[str, str]:
    if corr < PERMUTED_CORRELATION:
        return "permuted", (
            "predictions are unrelated to the truth: the hidden units of the merged models were in different "
            "orders, so averaging destroyed the function. Merge with --method auto (or align+readout), or start "
            "all sites from a common initialization (--method init) and average after training."
        )
    if corr >= GOOD_CORRELATION and slope < DAMPED_SLOPE:
        return "damped", (
            f"predictions follow the truth but are shrunk (slope {slope:.2f}): partial misalignment of hidden units. "
            "Refit the output layer from encrypted sums (--method align+readout or auto), or add fine-tune rounds."
        )
    if corr >= GOOD_CORRELATION:
        return "ok", (
            "the merged model tracks the truth in this site's normalized space. If its values look wrong in original "
            "units, the de-scaling is wrong: de-normalize with this site's own scaler (not another site's)."
        )
    return "weak", (
        f"predictions correlate only weakly with the truth (r = {corr:.2f}); the merged model is poor here. "
        "Try --method auto, fine-tune rounds, or compare with the pooled linear model (--method linear)."
    )
