"""``secagg diagnose``: say why a merged model gives nonsense on a site's data.

The merged model's predictions are regressed on the truth in the site's normalized space:

* correlation near 0: the hidden units of the merged models were in different orders (plain
  averaging of independently initialized networks destroyed the function);
* high correlation, slope well below 1: partial misalignment damped the output;
* high correlation, slope near 1: the merge is fine; if values look wrong in original units,
  the de-scaling is wrong (another site's scaler, or none).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from secagg.errors import SecAggError

PERMUTED_CORRELATION = 0.3
GOOD_CORRELATION = 0.6
DAMPED_SLOPE = 0.6


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The regression of predictions on truth and what it means."""

    samples: int
    correlation: float
    slope: float
    intercept: float
    nrmse: float
    verdict: str  # "permuted", "damped", "ok", "descaling", "weak"
    advice: str
    raw_rmse: float | None = None
    raw_rmse_own_scaler: float | None = None

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Scaler:
    """How a site maps raw values to the normalized space: z = (f(v) - mean) / std, f = log1p or identity."""

    mean: float
    std: float
    log1p: bool = False

    @classmethod
    def load(cls, path: str | Path) -> "Scaler":
        try:
            d = json.loads(Path(path).read_text())
            return cls(float(d["mean"]), float(d["std"]), bool(d.get("log1p", False)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SecAggError(f"{path}: a scaler is JSON with 'mean', 'std' and optional 'log1p' ({exc})") from exc

    def inverse(self, z: np.ndarray) -> np.ndarray:
        v = z * self.std + self.mean
        return np.expm1(v) if self.log1p else v


def diagnose(model: str | Path, data: str | Path, scaler: str | Path | None = None) -> Diagnosis:
    """Diagnose ``model`` on a site's DATA npz (``x``, ``y`` normalized; optional ``y_raw``)."""
    from secagg.merge.network import load_network
    from secagg.merge.simulate import load_site_data

    x, y = load_site_data(data)
    pred = load_network(model).forward(x).reshape(len(y), -1)[:, 0]
    truth = y[:, 0]
    corr = float(np.corrcoef(pred, truth)[0, 1]) if np.std(pred) > 1e-12 else 0.0
    slope, intercept = (float(v) for v in np.polyfit(truth, pred, 1))
    nrmse = float(np.sqrt(np.mean((pred - truth) ** 2)) / max(np.std(truth), 1e-12))
    raw_rmse = raw_own = None
    if scaler is not None:
        with np.load(data, allow_pickle=False) as d:
            if "y_raw" not in d:
                raise SecAggError(f"{data}: --scaler needs the raw targets as array 'y_raw' in the data file")
            y_raw = np.asarray(d["y_raw"], dtype=np.float64).reshape(len(y), -1)[:, 0]
        raw_rmse = float(np.sqrt(np.mean((Scaler.load(scaler).inverse(pred) - y_raw) ** 2)))
        own = _own_scaler(truth, y_raw)
        if own is not None:
            raw_own = float(np.sqrt(np.mean((own.inverse(pred) - y_raw) ** 2)))
    verdict, advice = _verdict(corr, slope, raw_rmse, raw_own)
    return Diagnosis(len(y), corr, slope, intercept, nrmse, verdict, advice, raw_rmse, raw_own)


def _own_scaler(z: np.ndarray, raw: np.ndarray) -> Scaler | None:
    """The site's own scaler, recovered by regressing normalized on (log1p) raw targets."""
    for log1p in (True, False):
        f = np.log1p(np.maximum(raw, 0)) if log1p else raw
        a, b = np.polyfit(f, z, 1)  # z = a f + b  ->  std = 1/a, mean = -b/a
        if a > 0 and np.max(np.abs(a * f + b - z)) < 1e-3 * max(np.std(z), 1e-12) + 1e-6:
            return Scaler(mean=-b / a, std=1 / a, log1p=log1p)
    return None


def _verdict(corr: float, slope: float, raw_rmse: float | None, raw_own: float | None) -> tuple[str, str]:
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
        if raw_rmse is not None and raw_own is not None and raw_rmse > 1.5 * raw_own:
            return "descaling", (
                f"the merged model is fine in normalized space, but de-scaling with the given scaler gives RMSE "
                f"{raw_rmse:.4g} against {raw_own:.4g} with this site's own scaler: de-normalize each site's "
                "predictions with its own statistics, or share one scaler across sites (a scaling round)."
            )
        return "ok", (
            "the merged model tracks the truth in this site's normalized space. If its values look wrong in original "
            "units, the de-scaling is wrong: de-normalize with this site's own scaler (not another site's)."
        )
    return "weak", (
        f"predictions correlate only weakly with the truth (r = {corr:.2f}); the merged model is poor here. "
        "Try --method auto, fine-tune rounds, or compare with the pooled linear model (--method linear)."
    )
