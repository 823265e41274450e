"""Shared pieces of the merge-quality benchmark: config, sensors, cached site models, scoring.

Data, scaling, windowing and the Keras/PyTorch models come from ``clients/forecast.py`` (added to
``sys.path`` here); this module only arranges them into a benchmark: which sensors are sites and
which are held out, the per-seed site models (trained once, then cached on disk), the DATA files
the merge methods read, the plaintext references (central oracle, pooled ridge, seasonal naive),
and the two error measures.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "clients") not in sys.path:
    sys.path.insert(0, str(ROOT / "clients"))

import forecast  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: Bump when the cached files' meaning changes (training code, file layout).
CACHE_VERSION = 1

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run."""

    n_train: int = 13
    n_heldout: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10  # per Keras site
    torch_epochs: int = 10  # per PyTorch site
    central_epochs: int = 3  # central oracle, over the pooled windows
    max_train: int | None = 5000  # training windows per site (random, kept in time order)
    max_val: int | None = 1000  # validation windows per sensor (choosing the best donor)
    max_test: int | None = None  # test windows per sensor (None: all 182 days)
    window: int = forecast.WINDOW
    horizon: int = forecast.HORIZON
    finetune: tuple[int, ...] = (1, 3)  # fine-tune rounds after auto, one row each
    finetune_epochs: int = 2  # local epochs per fine-tune round
    ridge: float = 1e-3  # pooled ridge penalty, relative to the mean diagonal of X^T X
    split_seed: int = 0  # which sensors are sites and which are held out
    torch: bool = True

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


QUICK = BenchConfig(n_train=3, n_heldout=2, seeds=(0,), epochs=1, torch_epochs=1,
                    central_epochs=1, max_train=600, max_val=200, max_test=300, finetune=(1,))


# ── sensors ─────────────────────────────────────────────────────────────────────────────────


@dataclass
class Sensor:
    """One sensor's scaled series with its windows: a training site or a held-out sensor."""

    index: int
    group: str  # "train" or "heldout"
    data: forecast.SiteData
    max_val: int | None = None
    max_test: int | None = None

    @property
    def name(self) -> str:
        """The sensor's column name."""
        return self.data.sensor

    @cached_property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """Training windows (the site's own data)."""
        return self.data.train_xy()

    @cached_property
    def val(self) -> tuple[np.ndarray, np.ndarray]:
        """Validation windows (:data:`forecast.VAL_ROWS`, after training, before the test)."""
        return forecast.rows_xy(self.data, forecast.VAL_ROWS, self.max_val, seed=self.index)

    @cached_property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """Test windows."""
        return self.data.test_xy()

    @cached_property
    def test_counts(self) -> np.ndarray:
        """The test targets in people/hour."""
        return self.data.scaler.inverse(self.test[1])


def load_sensors(cfg: BenchConfig) -> tuple[list[Sensor], list[Sensor]]:
    """Training sites and held-out sensors: a deterministic choice among the clean sensors."""
    counts = forecast.load_counts()
    names_train, names_held = forecast.pick_sensors(
        forecast.clean_sensors(counts), cfg.n_train, cfg.n_heldout, cfg.split_seed)

    def make(i: int, name: str, group: str) -> Sensor:
        data = forecast.prepare_site(counts, name, window=cfg.window, horizon=cfg.horizon,
                                     max_train=cfg.max_train, max_test=cfg.max_test, seed=i)
        return Sensor(i, group, data, cfg.max_val, cfg.max_test)

    train = [make(i, n, "train") for i, n in enumerate(names_train)]
    held = [make(len(train) + i, n, "heldout") for i, n in enumerate(names_held)]
    return train, held


# ── scoring ─────────────────────────────────────────────────────────────────────────────────


def score(sensor: Sensor, pred: np.ndarray) -> dict[str, float]:
    """nRMSE in the sensor's normalized space and MAE in people/hour (its own scaler).

    Predictions are clipped to +-50 standard deviations before de-normalizing, only so that a
    broken model gives a huge but finite MAE instead of an overflow.
    """
    x, y = sensor.test
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"{sensor.name}: {pred.shape} predictions for {y.shape} targets")
    counts = sensor.data.scaler.inverse(np.clip(pred, -50.0, 50.0))
    return {"nrmse": forecast.rmse(pred, y),
            "mae": float(np.mean(np.abs(counts - sensor.test_counts)))}


def score_all(sensors: Sequence[Sensor], predict: Predictor) -> dict[str, dict[str, float]]:
    """:func:`score` of one predictor on every sensor's test windows, by sensor name."""
    return {s.name: score(s, predict(s.test[0])) for s in sensors}


# ── predictors from model files ─────────────────────────────────────────────────────────────


def keras_predictor(path: Path) -> Predictor:
    """Load a Keras model file with Keras and predict with it."""
    import keras

    model = keras.models.load_model(path, compile=False)
    return lambda x: forecast.predict(model, x)


def torch_predictor(path: Path) -> Predictor:
    """Load a PyTorch state dict of :func:`forecast.build_torch_lstm` (or a hybrid around one) and predict with torch."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if "skip.weight" in state:  # a hybrid global model: secagg's documented module around the sites' own
        from secagg.merge.head_files import torch_hybrid_class

        units, features = state["base.lstm.weight_ih_l0"].shape
        outputs, inputs = state["skip.weight"].shape
        model = torch_hybrid_class()(forecast.build_torch_lstm(0, units=units // 4, features=features), inputs, outputs)
        model.load_state_dict(state)
        model.eval()
    else:
        model = forecast.load_torch_lstm(path)
    return lambda x: forecast.predict_torch(model, x)


def file_predictor(path: Path) -> Predictor:
    """A predictor for a model file, in the file's own framework (by suffix)."""
    return torch_predictor(path) if Path(path).suffix in (".pt", ".pth") else keras_predictor(path)


# ── plaintext references ───────────────────────────────────────────────────────────────────


def fit_ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
    """Ridge regression on flattened windows, unpenalized intercept; returns ``(w, b)``.

    The penalty is ``ridge`` times the mean diagonal of X^T X / n (scale-free).
    """
    a = np.concatenate([x.reshape(len(x), -1), np.ones((len(x), 1))], axis=1).astype(np.float64)
    gram = a.T @ a / len(a)
    penalty = np.eye(len(gram)) * ridge * np.trace(gram[:-1, :-1]) / (len(gram) - 1)
    penalty[-1, -1] = 0.0
    coef = np.linalg.solve(gram + penalty, a.T @ np.asarray(y, np.float64).reshape(-1) / len(a))
    return coef[:-1], float(coef[-1])


def ridge_predictor(w: np.ndarray, b: float) -> Predictor:
    """Predictions of a :func:`fit_ridge` model."""
    return lambda x: x.reshape(len(x), -1).astype(np.float64) @ w + b


def pooled_train(sites: Sequence[Sensor]) -> tuple[np.ndarray, np.ndarray]:
    """All sites' training windows stacked (what a central server would hold)."""
    return (np.concatenate([s.train[0] for s in sites]),
            np.concatenate([s.train[1] for s in sites]))


# ── the cache of trained models ─────────────────────────────────────────────────────────────


def site_seed(seed: int, i: int) -> int:
    """Site ``i``'s own initialization seed in benchmark seed ``seed`` (distinct per site)."""
    return 1000 * seed + 101 * (i + 1)


@dataclass
class Cache:
    """Trained models and DATA files on disk, keyed by what determines them.

    Layout: ``<root>/<key>/data/site-<i>.npz`` and
    ``<root>/<key>/seed-<s>/{keras,torch}/site-<i>.{keras,pt}``, ``.../central.keras``, where
    ``key`` hashes the sensors, the data sizes, the training settings and :data:`CACHE_VERSION`.
    ``retrain`` ignores (and overwrites) existing models.
    """

    cfg: BenchConfig
    sites: Sequence[Sensor]
    root: Path = RESULTS / "cache"
    retrain: bool = False

    @cached_property
    def key(self) -> str:
        """Hash of everything the cached files depend on."""
        c = self.cfg
        what = {"v": CACHE_VERSION, "sensors": [s.name for s in self.sites],
                "max_train": c.max_train, "window": c.window, "horizon": c.horizon,
                "train_rows": forecast.TRAIN_ROWS, "epochs": c.epochs,
                "torch_epochs": c.torch_epochs, "central_epochs": c.central_epochs}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def dir(self) -> Path:
        """This configuration's cache directory."""
        return self.root / self.key

    def seed_dir(self, seed: int) -> Path:
        """Per-seed directory (site models, central oracle, global models)."""
        return self.dir / f"seed-{seed}"

    def site_paths(self, seed: int, family: str) -> list[Path]:
        """Where the sites' ``family`` ("keras" or "torch") models of ``seed`` are kept."""
        suffix = {"keras": ".keras", "torch": ".pt"}[family]
        return [self.seed_dir(seed) / family / f"site-{s.index}{suffix}" for s in self.sites]

    def data_files(self) -> list[Path]:
        """Each site's DATA npz (its training windows); written once, never retrained."""
        paths = []
        for s in self.sites:
            path = self.dir / "data" / f"site-{s.index}.npz"
            if not path.exists():
                forecast.save_xy(path.with_name(f".tmp-{path.name}"), *s.train).replace(path)
            paths.append(path)
        return paths

    def keras_sites(self, seed: int) -> list[Path]:
        """Each site's Keras model for ``seed``, trained from its own initialization."""
        def train(s: Sensor, path: Path) -> None:
            forecast.train_windows(*s.train, seed=site_seed(seed, s.index),
                                   epochs=self.cfg.epochs).save(path)

        return [self._ensure(path, lambda p, s=s: train(s, p))
                for s, path in zip(self.sites, self.site_paths(seed, "keras"))]

    def torch_sites(self, seed: int) -> list[Path]:
        """Each site's PyTorch state dict for ``seed``, trained from its own initialization."""
        import torch

        def train(s: Sensor, path: Path) -> None:
            sd = site_seed(seed, s.index)
            model = forecast.train_torch(forecast.build_torch_lstm(sd), *s.train, seed=sd,
                                         epochs=self.cfg.torch_epochs)
            torch.save(model.state_dict(), path)

        return [self._ensure(path, lambda p, s=s: train(s, p))
                for s, path in zip(self.sites, self.site_paths(seed, "torch"))]

    def central(self, seed: int) -> Path:
        """The central oracle: one Keras LSTM trained on all sites' pooled training windows."""
        def train(path: Path) -> None:
            forecast.train_windows(*pooled_train(self.sites), seed=1000 * seed + 7,
                                   epochs=self.cfg.central_epochs).save(path)

        return self._ensure(self.seed_dir(seed) / "central.keras", train)

    def _ensure(self, path: Path, make: Callable[[Path], None]) -> Path:
        """``path`` if cached, else made by ``make`` (written to a temporary name, then renamed)."""
        if path.exists() and not self.retrain:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        make(tmp)
        tmp.replace(path)
        return path
