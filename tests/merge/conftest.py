"""Fixtures of the merge-method, simulate and diagnose tests: small trained sites, built once.

Every site has its own synthetic series (a sine of its own period, phase and amplitude plus
noise, standardized), cut into windows of ``WINDOW`` steps that predict the next value, and its
own independently trained model: ``LSTM(6) -> Dense(1)`` in Keras, or a
:func:`~secagg.merge.network.make_torch_regressor` of the same shape in PyTorch (a state dict: merging
it needs the module, :data:`TORCH_MODULE` with :func:`torch_kwargs`). Site sizes are
chosen so that weighting by the number of TRAINING samples (the first 80%, see
``secagg.merge.methods.Site``) differs measurably from weighting by all samples.

The references in the tests are plain numpy, computed from the files written here; the helpers
below never call the merge code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

WINDOW = 8
UNITS = 6
SITE_SIZES = (301, 257, 349)  # 80% cuts: 240, 205, 279 -- not proportional to the totals
VAL_FRACTION = 0.2
RIDGE = 1e-3  # secagg.merge.methods.RIDGE, restated: the references must not import it
HEAD_RIDGE = 1e-4  # secagg.merge.heads.DEFAULT_RIDGE (readout and hybrid heads), restated
#: The torch sites' nn.Module, in the string form the command line takes (--torch-model).
TORCH_MODULE = "secagg.merge.torch_view:make_torch_regressor"


def torch_kwargs(units: int = UNITS, kind: str = "lstm") -> dict:
    """The constructor arguments of :data:`TORCH_MODULE` for the torch sites' models (--torch-kwargs)."""
    return {"input_dim": 1, "units": [units], "dense": [1], "kind": kind}


def torch_options(model: Path | str) -> dict:
    """``torch_module``/``torch_kwargs`` for a site's model file: the sites' module for a .pt file, none for Keras."""
    return {"torch_module": TORCH_MODULE, "torch_kwargs": torch_kwargs()} if Path(model).suffix == ".pt" else {}


@dataclass(frozen=True)
class SiteFiles:
    """One site on disk: its model file, its data npz, and the data itself (float64)."""

    model: Path
    data: Path
    x: np.ndarray
    y: np.ndarray

    @property
    def cut(self) -> int:
        return int(len(self.x) * (1 - VAL_FRACTION))

    @property
    def x_train(self) -> np.ndarray:
        return self.x[: self.cut]

    @property
    def y_train(self) -> np.ndarray:
        return self.y[: self.cut]

    @property
    def x_val(self) -> np.ndarray:
        return self.x[self.cut :]

    @property
    def y_val(self) -> np.ndarray:
        return self.y[self.cut :]

    def pair(self) -> tuple[str, str]:
        return str(self.model), str(self.data)


def site_series(seed: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """x (samples, WINDOW, 1) and y (samples, 1): windows of a standardized noisy sine, float32."""
    rng = np.random.default_rng(100 + seed)
    t = np.arange(samples + WINDOW)
    period = 14.0 + 5.0 * seed
    s = (1.0 + 0.3 * seed) * np.sin(2 * np.pi * t / period + 0.7 * seed) + 0.15 * rng.standard_normal(len(t))
    s = (s - s.mean()) / s.std()
    x = np.stack([s[i : i + WINDOW] for i in range(samples)])[:, :, None]
    y = s[WINDOW : WINDOW + samples, None]
    return x.astype(np.float32), y.astype(np.float32)


def save_data(path: Path, x: np.ndarray, y: np.ndarray, **extra: np.ndarray) -> Path:
    np.savez(path, x=x, y=y, **extra)
    return path


def keras_module():
    from secagg.models.keras_files import _quiet_import_keras

    return _quiet_import_keras()


def keras_model(units: int = UNITS):
    """The sites' Keras architecture, with fixed layer names (the same at every site)."""
    keras = keras_module()
    return keras.Sequential([keras.Input((WINDOW, 1)), keras.layers.LSTM(units, name="lstm"),
                             keras.layers.Dense(1, name="out")])


def train_keras(seed: int, x: np.ndarray, y: np.ndarray, units: int = UNITS, epochs: int = 8):
    keras = keras_module()
    keras.utils.set_random_seed(seed)
    model = keras_model(units)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def train_torch(seed: int, x: np.ndarray, y: np.ndarray, units: int = UNITS, epochs: int = 40):
    import torch

    from secagg.merge import make_torch_regressor

    torch.manual_seed(seed)
    module = make_torch_regressor(1, [units], [1])
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only contend (much slower on 2 busy cores)
    try:
        for _ in range(epochs):
            for s in range(0, len(xt), 32):
                opt.zero_grad()
                torch.nn.functional.mse_loss(module(xt[s : s + 32]), yt[s : s + 32]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return module


def keras_predict(path: Path, x: np.ndarray) -> np.ndarray:
    keras = keras_module()
    model = keras.models.load_model(path, compile=False)
    return np.asarray(keras.ops.convert_to_numpy(model(np.asarray(x, np.float32), training=False)), np.float64)


def torch_predict(path: Path, x: np.ndarray, units: int = UNITS) -> np.ndarray:
    import torch

    from secagg.merge import make_torch_regressor

    module = make_torch_regressor(1, [units], [1])
    state = torch.load(path, weights_only=True)
    if "skip.weight" in state:  # a hybrid global model: the documented module around the sites' own
        from secagg.merge.head_files import torch_hybrid_class

        outputs, inputs = state["skip.weight"].shape
        module = torch_hybrid_class()(module, inputs, outputs)
    module.load_state_dict(state)
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(np.asarray(x, np.float32))).numpy().astype(np.float64)


def with_ones(a: np.ndarray) -> np.ndarray:
    return np.hstack([a, np.ones((len(a), 1))])


def pooled_ridge(features: list[np.ndarray], targets: list[np.ndarray], ridge: float = RIDGE) -> np.ndarray:
    """Ridge on the concatenated rows [features, 1]: (X^T X/N + lambda I') W = X^T y/N, bias row unpenalized.

    lambda = ridge * trace(X^T X/N without the bias row and column) / (d - 1).
    """
    x = with_ones(np.concatenate(features).astype(np.float64))
    y = np.concatenate(targets).astype(np.float64)
    n, d = x.shape
    gram, cross = x.T @ x / n, x.T @ y / n
    penalty = np.eye(d) * ridge * np.trace(gram[:-1, :-1]) / (d - 1)
    penalty[-1, -1] = 0.0
    return np.linalg.solve(gram + penalty, cross)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    from secagg.models import read_model

    return {k: np.asarray(v, np.float64) for k, v in read_model(path).items()}


class MergeHelpers:
    WINDOW = WINDOW
    UNITS = UNITS
    site_series = staticmethod(site_series)
    save_data = staticmethod(save_data)
    keras_module = staticmethod(keras_module)
    keras_model = staticmethod(keras_model)
    train_keras = staticmethod(train_keras)
    train_torch = staticmethod(train_torch)
    keras_predict = staticmethod(keras_predict)
    torch_predict = staticmethod(torch_predict)
    with_ones = staticmethod(with_ones)
    pooled_ridge = staticmethod(pooled_ridge)
    read_tensors = staticmethod(read_tensors)
    RIDGE = RIDGE
    HEAD_RIDGE = HEAD_RIDGE
    TORCH_MODULE = TORCH_MODULE
    torch_kwargs = staticmethod(torch_kwargs)
    torch_options = staticmethod(torch_options)


@pytest.fixture(scope="session")
def mh() -> type[MergeHelpers]:
    return MergeHelpers


@pytest.fixture(scope="session")
def keras_sites(tmp_path_factory) -> list[SiteFiles]:
    """Three sites, each with its own data and its own independently trained Keras LSTM(6) -> Dense(1)."""
    root = tmp_path_factory.mktemp("keras-sites")
    sites = []
    for i, samples in enumerate(SITE_SIZES):
        x, y = site_series(i, samples)
        model = train_keras(i, x[: int(samples * (1 - VAL_FRACTION))], y[: int(samples * (1 - VAL_FRACTION))])
        model.save(root / f"site{i}.keras")
        data = save_data(root / f"site{i}.npz", x, y)
        sites.append(SiteFiles(root / f"site{i}.keras", data, x.astype(np.float64), y.astype(np.float64)))
    return sites


@pytest.fixture(scope="session")
def torch_sites(tmp_path_factory) -> list[SiteFiles]:
    """The same three sites' data with independently trained PyTorch SequenceRegressors (.pt state dicts)."""
    import torch

    root = tmp_path_factory.mktemp("torch-sites")
    sites = []
    for i, samples in enumerate(SITE_SIZES):
        x, y = site_series(i, samples)
        cut = int(samples * (1 - VAL_FRACTION))
        module = train_torch(i, x[:cut], y[:cut])
        torch.save(module.state_dict(), root / f"site{i}.pt")
        data = save_data(root / f"site{i}.npz", x, y)
        sites.append(SiteFiles(root / f"site{i}.pt", data, x.astype(np.float64), y.astype(np.float64)))
    return sites


class SimulationCache:
    """Runs ``simulate`` once per (sites, method, options) and keeps the result and the written file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results: dict = {}

    def __call__(self, sites: list[SiteFiles], method: str, finetune_rounds: int = 0, suffix: str = ".keras"):
        from secagg.merge.simulate import simulate

        key = (tuple(s.model for s in sites), method, finetune_rounds)
        if key not in self.results:
            out = self.root / f"global{len(self.results)}{suffix}"
            self.results[key] = simulate(method, [s.pair() for s in sites], out, finetune_rounds=finetune_rounds,
                                         workdir=self.root / f"work{len(self.results)}",
                                         **torch_options(sites[0].model))
        return self.results[key]


@pytest.fixture(scope="session")
def simulated(tmp_path_factory) -> SimulationCache:
    """``simulated(sites, method, finetune_rounds=0, suffix='.keras')``: a cached SimulationResult."""
    return SimulationCache(tmp_path_factory.mktemp("simulated"))


# -- an independent numpy reference of LSTM(units) -> Dense(1) --------------------------------------


def lstm_params(tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """(kernel (in, 4u), recurrent (u, 4u), bias (4u,), out kernel (u, 1), out bias (1,)) in float64.

    From the tensors of the Keras model (``lstm/lstm_cell/*``, ``out/*``) or of the PyTorch
    SequenceRegressor (``rnn.*_l0``, ``head.0.*``); both order the gates i, f, c(g), o.
    """
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    if "rnn.weight_ih_l0" in t:
        return (t["rnn.weight_ih_l0"].T, t["rnn.weight_hh_l0"].T, t["rnn.bias_ih_l0"] + t["rnn.bias_hh_l0"],
                t["head.0.weight"].T, t["head.0.bias"])
    return (t["lstm/lstm_cell/kernel"], t["lstm/lstm_cell/recurrent_kernel"], t["lstm/lstm_cell/bias"],
            t["out/kernel"], t["out/bias"])


def lstm_features(tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The last hidden state h_T (batch, units) of the LSTM, zero initial state."""
    kernel, recurrent, bias, _, _ = lstm_params(tensors)
    u = recurrent.shape[0]
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    h = np.zeros((len(x), u))
    c = np.zeros((len(x), u))
    for t in range(x.shape[1]):
        z = np.asarray(x[:, t], np.float64) @ kernel + h @ recurrent + bias
        i, f, g, o = sig(z[:, :u]), sig(z[:, u : 2 * u]), np.tanh(z[:, 2 * u : 3 * u]), sig(z[:, 3 * u :])
        c = f * c + i * g
        h = o * np.tanh(c)
    return h


def lstm_forward(tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    _, _, _, out_kernel, out_bias = lstm_params(tensors)
    return lstm_features(tensors, x) @ out_kernel + out_bias


MergeHelpers.lstm_params = staticmethod(lstm_params)
MergeHelpers.lstm_features = staticmethod(lstm_features)
MergeHelpers.lstm_forward = staticmethod(lstm_forward)
