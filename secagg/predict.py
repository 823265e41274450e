"""``secagg predict``: apply a (global) forecasting model at a site, including one that trained none.

The site's raw history is an ``.npz`` with ``values``: (rows, features) raw values in time order,
one row per time step (a 1-D array is one feature). ``column`` is the feature to forecast. Steps:

1. scale ``values`` with the site's scaler (:class:`secagg.Scaler`; a new site fits its own on its
   own history: ``secagg scaler --local``), every feature the model takes;
2. cut windows of the model's input length (a Keras file records it; a PyTorch model needs
   ``window``): the window ending at row ``r`` forecasts row ``r + horizon``, so the last window
   forecasts past the end of the history;
3. run the model with its framework's own forward pass (:class:`FrameworkModel`);
4. de-scale the forecasts with the scaler's ``column`` feature.

A model takes one feature (``column``) or every column of ``values``. Windows with a missing
(NaN) value are skipped. Where the history holds the truth for a forecast row, the forecasts are
scored (MAE, RMSE in raw units) against persistence, the last observed value.

``adapt`` refits the model's readout (its last Dense/Linear layer, a linear map of
:meth:`FrameworkModel.features`) on the site's own windows in closed form: ridge regression
shrunk towards the global readout, its strength chosen on the last 20% of the fitting windows
(the largest strength keeps the global readout). It is fitted on the first ``adapt_fit`` of the
windows with a known target and scored on the rest only, so the reported gain is out of sample.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from secagg.errors import ModelFormatError, ScalerError, SecAggError
from secagg.scaler import Scaler, load_values

#: Ridge strengths tried by ``adapt``, relative to the mean diagonal of the features' Gram matrix;
#: ``None`` keeps the global readout.
ADAPT_RIDGES: tuple[float | None, ...] = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, None)
ADAPT_VALIDATION = 0.2
MIN_ADAPT_WINDOWS = 20


@dataclasses.dataclass(frozen=True)
class Scores:
    """Errors in raw units on ``rows`` forecast rows whose truth is known."""

    rows: int
    mae: float
    rmse: float
    persistence_mae: float
    persistence_rmse: float


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """What ``adapt`` did: fitted on ``fit_rows`` forecast rows, scored on the later ``scored``."""

    fit_rows: int
    first_scored_row: int | None
    ridge: float | None  # the chosen relative strength; None: the global readout was kept
    scored: Scores | None  # the adapted model (None when every window was used for fitting)
    scored_global: Scores | None  # the global model on the same rows
    adapted_out: str | None


@dataclasses.dataclass(frozen=True)
class Forecast:
    """Forecasts in raw units, by the row (time step) of the history each one is for."""

    row: np.ndarray  # int64; rows >= the history's length are the future
    forecast: np.ndarray  # raw units (the adapted model's with adapt)
    truth: np.ndarray  # raw values of those rows, NaN where unknown
    persistence: np.ndarray  # the last observed value at forecast time
    forecast_global: np.ndarray | None  # with adapt: the global model's forecasts
    window: int
    horizon: int
    column: int
    input_features: int
    history_rows: int
    skipped_windows: int
    scores: Scores | None
    adaptation: Adaptation | None

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``row``, ``forecast``, ``truth``, ``persistence`` (and ``forecast_global``) to an npz."""
        arrays = {"row": self.row, "forecast": self.forecast, "truth": self.truth, "persistence": self.persistence}
        if self.forecast_global is not None:
            arrays["forecast_global"] = self.forecast_global
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:  # a file object: np.savez would append ".npz" to other names
            np.savez(f, **arrays)
        return path

    def summary(self) -> dict[str, Any]:
        """The JSON summary ``secagg predict`` prints."""
        return {
            "forecasts": int(len(self.row)), "first_row": int(self.row[0]) if len(self.row) else None,
            "last_row": int(self.row[-1]) if len(self.row) else None,
            "future": int(np.sum(self.row >= self.history_rows)), "window": self.window, "horizon": self.horizon,
            "column": self.column, "input_features": self.input_features, "skipped_windows": self.skipped_windows,
            "scores": dataclasses.asdict(self.scores) if self.scores else None,
            "adapt": dataclasses.asdict(self.adaptation) if self.adaptation else None,
        }


def forecast(model: str | os.PathLike, values: np.ndarray | str | os.PathLike, scaler: Scaler | str | os.PathLike,
             *, column: int = 0, horizon: int = 1, window: int | None = None, torch_module: Any = None,
             torch_kwargs: Any = None, adapt: bool = False, adapt_fit: float = 0.5,
             adapted_out: str | os.PathLike | None = None) -> Forecast:
    """Forecast ``column`` of the raw history ``values`` (an array or a RAW.npz) with ``model``.

    See the module docstring. ``horizon`` is the model's: how many rows after a window's last row
    its forecast is for. ``adapted_out``: where to write the adapted model (with ``adapt``).
    """
    from secagg.models.framework import FrameworkModel

    raw = load_values(values) if isinstance(values, (str, os.PathLike)) else _as_rows(values)
    scaler = scaler if isinstance(scaler, Scaler) else Scaler.load(scaler)
    if not -raw.shape[1] <= column < raw.shape[1]:
        raise SecAggError(f"--column {column} does not exist: the data has {raw.shape[1]} feature(s) (0-based)")
    column %= raw.shape[1]
    if horizon < 1:
        raise SecAggError(f"--horizon must be at least 1 (rows ahead of a window's last row), got {horizon}")
    if not adapt and adapted_out is not None:
        raise SecAggError("--adapted-out is written by --adapt; add --adapt or drop --adapted-out")
    if adapt and not 0 < adapt_fit <= 1:
        raise SecAggError(f"--adapt-fit is the fraction of the history to fit on, in (0, 1]; got {adapt_fit}")

    fm = FrameworkModel.load(model, torch_module, torch_kwargs)
    window, features, flat = _input_shape(fm, window, raw.shape[1])
    inputs = [column] if features == 1 else list(range(raw.shape[1]))
    if features not in (1, raw.shape[1]):
        raise ModelFormatError(f"{model} takes {features} features per step but the data has {raw.shape[1]} "
                               "columns; give 'values' the model's input features (or one column and --column)")
    target_scaler = scaler.feature(column) if scaler.features > 1 else scaler
    z = _scale(raw, inputs, scaler)
    if len(raw) < window:
        raise SecAggError(f"the history has {len(raw)} rows but the model's windows are {window} rows long")

    last = np.arange(window - 1, len(raw))  # the last row of each window
    x = np.lib.stride_tricks.sliding_window_view(z, window, axis=0).transpose(0, 2, 1)  # (m, window, features)
    ok = np.all(np.isfinite(x), axis=(1, 2))
    x, last = x[ok], last[ok]
    if len(x) == 0:
        raise SecAggError(f"no window of {window} rows without a missing value; fill the gaps in 'values'")
    if flat:
        x = x[..., 0]
    rows = last + horizon
    truth = np.full(len(rows), np.nan)
    known = rows < len(raw)
    truth[known] = raw[rows[known], column]
    persistence = raw[last, column]

    z_global = _first_output(fm.predict(x))
    forecast_global = _descale(target_scaler, z_global)
    scored = np.isfinite(truth)
    scores = _scores(forecast_global[scored], truth[scored], persistence[scored])
    if not adapt:
        return Forecast(rows, forecast_global, truth, persistence, None, window, horizon, column, features, len(raw),
                        int(np.sum(~ok)), scores, None)

    order = np.flatnonzero(scored)  # time order: windows are in row order
    n_fit = int(len(order) * adapt_fit)
    if n_fit < MIN_ADAPT_WINDOWS:
        raise SecAggError(f"--adapt needs at least {MIN_ADAPT_WINDOWS} windows with a known target to fit on, has "
                          f"{n_fit}; give a longer history (or a larger --adapt-fit)")
    fit, held = order[:n_fit], order[n_fit:]
    ridge = _adapt_readout(fm, x[fit], target_scaler.transform(truth[fit]), z_global[fit], model)
    z_adapted = _first_output(fm.predict(x))
    forecast_adapted = _descale(target_scaler, z_adapted)
    written = None
    if adapted_out is not None:
        from secagg.models import write_model

        written = str(write_model(model, fm.tensors(), adapted_out))
    adaptation = Adaptation(
        fit_rows=n_fit, first_scored_row=int(rows[held[0]]) if len(held) else None,
        ridge=ridge, scored=_scores(forecast_adapted[held], truth[held], persistence[held]),
        scored_global=_scores(forecast_global[held], truth[held], persistence[held]), adapted_out=written)
    return Forecast(rows, forecast_adapted, truth, persistence, forecast_global, window, horizon, column, features,
                    len(raw), int(np.sum(~ok)), scores, adaptation)


def _as_rows(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    if v.ndim != 2 or len(v) == 0:
        raise ScalerError(f"raw values must be (rows, features) with at least one row, got shape {v.shape}")
    return v


def _input_shape(fm, window: int | None, columns: int) -> tuple[int, int, bool]:
    """``(window, features per step, flat)`` of the model's input; flat: (batch, window) inputs."""
    if fm.framework == "keras":
        inputs = getattr(fm.model, "inputs", None)
        if not inputs:  # a subclassed model records no input shape
            if window is None:
                raise SecAggError(f"{fm.path} records no input shape: give --window ROWS (its training length)")
            return int(window), columns, False
        shape = tuple(inputs[0].shape)
        if len(shape) not in (2, 3):
            raise ModelFormatError(f"{fm.path}: its input is {shape}; predict needs (batch, window, features) "
                                   "or (batch, window)")
        recorded = shape[1]
        if recorded is not None and window is not None and window != recorded:
            raise SecAggError(f"--window {window} but {fm.path} takes windows of {recorded} rows; drop --window")
        window = recorded if recorded is not None else window
        if window is None:
            raise SecAggError(f"{fm.path} takes windows of any length: give --window ROWS (its training length)")
        features = 1 if len(shape) == 2 else shape[2]
        if features is None:
            features = columns
        return int(window), int(features), len(shape) == 2
    if window is None:
        raise SecAggError("a PyTorch state dict does not record its input length: give --window ROWS (the window "
                          "length the model was trained on)")
    import torch

    recurrent = [m for m in fm.model.modules() if isinstance(m, torch.nn.RNNBase)]
    return int(window), int(recurrent[0].input_size) if recurrent else columns, False


def _scale(raw: np.ndarray, inputs: list[int], scaler: Scaler) -> np.ndarray:
    """The model's input columns of ``raw``, normalized (NaN stays NaN)."""
    if scaler.features == raw.shape[1]:
        return np.stack([scaler.transform(raw[:, i], feature=i) for i in inputs], axis=1)
    if scaler.features == 1 and len(inputs) == 1:
        return scaler.transform(raw[:, inputs[0]])[:, None]
    raise ScalerError(f"the scaler maps {scaler.features} feature(s) but the data has {raw.shape[1]} columns and the "
                      f"model takes {len(inputs)}; fit the scaler on the same columns (secagg scaler --local)")


def _first_output(out: np.ndarray) -> np.ndarray:
    """The forecast of each window: the model's first output (of its last step, for a sequence output)."""
    out = np.asarray(out, dtype=np.float64)
    if out.ndim == 3:
        out = out[:, -1, :]
    return out.reshape(len(out), -1)[:, 0]


def _descale(scaler: Scaler, z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return scaler.inverse(z)


def _scores(pred: np.ndarray, truth: np.ndarray, persistence: np.ndarray) -> Scores | None:
    if len(truth) == 0:
        return None
    return Scores(int(len(truth)), float(np.mean(np.abs(pred - truth))), float(np.sqrt(np.mean((pred - truth) ** 2))),
                  float(np.mean(np.abs(persistence - truth))), float(np.sqrt(np.mean((persistence - truth) ** 2))))


def _adapt_readout(fm, x: np.ndarray, y: np.ndarray, z_before: np.ndarray, model) -> float | None:
    """Refit the readout's first output on (x, y) in place; returns the chosen relative ridge."""
    kernel, bias = fm.readout()
    h = fm.features(x)
    if h.ndim == 3:  # a TimeDistributed readout: the forecast is its last step
        h = h[:, -1, :]
    a = np.hstack([h.reshape(len(h), -1), np.ones((len(h), 1))])
    prior = np.concatenate([kernel[:, 0], bias[:1]])
    if a.shape[1] != len(prior) or not np.allclose(a @ prior, z_before, atol=1e-3 * max(np.std(z_before), 1e-6)):
        raise ModelFormatError(f"{model}: its forecast is not its last Dense/Linear layer applied to that layer's "
                               "input, so --adapt cannot refit it in closed form")
    cut = int(len(a) * (1 - ADAPT_VALIDATION))
    best, best_err = None, np.inf
    for r in ADAPT_RIDGES:
        err = float(np.mean((a[cut:] @ _ridge(a[:cut], y[:cut], prior, r) - y[cut:]) ** 2))
        if err < best_err - 1e-12:
            best, best_err = r, err
    theta = _ridge(a, y, prior, best)
    kernel[:, 0], bias[0] = theta[:-1], theta[-1]
    fm.set_readout(kernel, bias)
    return best


def _ridge(a: np.ndarray, y: np.ndarray, prior: np.ndarray, r: float | None) -> np.ndarray:
    """argmin |a theta - y|^2 / n + lam |theta - prior|^2 over the weights (bias free); r None: the prior."""
    if r is None:
        return prior
    gram, cross = a.T @ a / len(a), a.T @ y / len(a)
    d = len(prior) - 1
    penalty = np.eye(d + 1) * r * max(np.trace(gram[:-1, :-1]) / d, 1e-12)
    penalty[-1, -1] = 0.0
    return np.linalg.solve(gram + penalty, cross + penalty @ prior)
