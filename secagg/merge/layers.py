"""The layers of secagg's numpy view of a forecasting network, each with its numpy forward pass.

Kinds of layers (all arrays float64):

* :class:`Recurrent` — an LSTM or GRU layer (a multi-layer torch ``nn.LSTM`` becomes several);
* :class:`Bidirectional` — two recurrent layers over the sequence in both directions, merged;
* :class:`Dense` — ``activation(x @ kernel + bias)`` on the last axis (so also a
  ``TimeDistributed(Dense)`` or a Dense on a whole sequence);
* :class:`BatchNorm`, :class:`Normalization` — per-feature affine maps from stored statistics;
* :class:`Activation` — an element-wise function; :class:`LastStep` — ``x[:, -1]``.

Hidden units live in Recurrent, Bidirectional and Dense layers; the other kinds act per feature
and pass a permutation of their input features through (see :mod:`secagg.merge.align`).

Array conventions (both frameworks): ``Recurrent.kernel`` is (input_dim, G*units) (torch
``weight_ih`` transposed), ``recurrent_kernel`` (units, G*units), gate blocks of ``units``
columns in ``gate_order``; ``Dense.kernel`` is (in, out) (torch ``weight`` transposed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from secagg.errors import ModelFormatError

# --- activations ---------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form is exact, cannot overflow, and is several times faster than an exp with np.where.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf
    except ImportError:  # scipy is in the merge extra; this is the slow fallback
        return np.vectorize(math.erf, otypes=[np.float64])(x)
    return erf(x)


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805

#: Element-wise functions by the names Keras records (``torch.nn`` modules map onto them).
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.2 * x),  # Keras 3's default slope
    "leaky_relu_torch": lambda x: np.where(x >= 0, x, 0.01 * x),  # torch's default slope
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "hard_sigmoid": lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),  # Keras 3 definition
    "hard_silu": lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "hard_swish": lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "hard_tanh": lambda x: np.clip(x, -1.0, 1.0),
    "softplus": lambda x: np.logaddexp(0.0, x),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "selu": lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0.0))),
    "celu": lambda x: np.maximum(x, 0.0) + np.minimum(0.0, np.expm1(np.minimum(x, 0.0))),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),  # exact (Keras and torch defaults)
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "mish": lambda x: x * np.tanh(np.logaddexp(0.0, x)),
    "exponential": np.exp,
    "log_sigmoid": lambda x: -np.logaddexp(0.0, -x),
    "softmax": _softmax,  # over the last axis
}


def activation_fn(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The numpy function of activation ``name``; ModelFormatError naming the supported ones otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ModelFormatError(
            f"activation {name!r} is not supported for merging; supported are {', '.join(ACTIVATIONS)}"
        ) from None


#: Activations applied to each unit on its own: they commute with permutations of the units.
ELEMENTWISE = frozenset(ACTIVATIONS) - {"softmax"}

# gate letter -> canonical role. LSTM: input, forget, cell candidate (keras c, torch g), output.
# GRU: update z, reset r, candidate h (torch n).
_LSTM_ROLES = {"i": "i", "f": "f", "c": "c", "g": "c", "o": "o"}
_GRU_ROLES = {"z": "z", "r": "r", "h": "h", "n": "h"}


# --- recurrent layers ----------------------------------------------------------------------


@dataclass(eq=False)  # numpy fields: compare explicitly, not with ==
class Recurrent:
    """One recurrent layer over (batch, T, input_dim) inputs from a zero state.

    ``kernel`` (input_dim, G*units) maps the input to the gates, ``recurrent_kernel``
    (units, G*units) the previous state; the G blocks of ``units`` columns are in
    ``gate_order`` (G = 4 for LSTM, 3 for GRU). ``recurrent_bias`` is torch's ``bias_hh`` or the
    second row of a Keras GRU(reset_after=True) bias; None for Keras LSTM and GRU with
    ``reset_after=False``. ``reset_after`` (GRU only): True applies the reset gate after the
    recurrent matmul (torch, Keras default), False before it. ``return_sequences``: the layer's
    output is the whole h sequence, else its last step.
    """

    kind: str
    gate_order: str
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray
    recurrent_bias: np.ndarray | None
    return_sequences: bool
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    reset_after: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("lstm", "gru"):
            raise ValueError(f"Recurrent.kind must be 'lstm' or 'gru', not {self.kind!r}")
        roles = _LSTM_ROLES if self.kind == "lstm" else _GRU_ROLES
        canon = [roles.get(g) for g in self.gate_order]
        if None in canon or sorted(canon) != sorted(set(roles.values())):
            raise ValueError(f"gate_order {self.gate_order!r} is not valid for a {self.kind} layer")
        self.kernel = np.asarray(self.kernel, dtype=np.float64)
        self.recurrent_kernel = np.asarray(self.recurrent_kernel, dtype=np.float64)
        self.bias = np.asarray(self.bias, dtype=np.float64)
        if self.recurrent_bias is not None:
            self.recurrent_bias = np.asarray(self.recurrent_bias, dtype=np.float64)
        u, g = self.units, self.gates
        want = {
            "kernel": (self.kernel.shape[0] if self.kernel.ndim == 2 else -1, g * u),
            "recurrent_kernel": (u, g * u),
            "bias": (g * u,),
        }
        if self.recurrent_bias is not None:
            want["recurrent_bias"] = (g * u,)
        for name, shape in want.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"{self.kind} layer: {name} has shape {getattr(self, name).shape}, expected {shape}"
                )
        if self.kind == "gru" and not self.reset_after and self.recurrent_bias is not None:
            raise ValueError("a GRU with reset_after=False has no recurrent_bias")
        activation_fn(self.activation), activation_fn(self.recurrent_activation)

    @property
    def gates(self) -> int:
        return 4 if self.kind == "lstm" else 3

    @property
    def units(self) -> int:
        return int(self.recurrent_kernel.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.kernel.shape[0])

    @property
    def output_dim(self) -> int:
        return self.units

    @property
    def returns_sequence(self) -> bool:
        return self.return_sequences

    def gate_slice(self, role: str) -> slice:
        """Columns of gate ``role`` (LSTM: i, f, c, o; GRU: z, r, h) in the kernels and biases."""
        roles = _LSTM_ROLES if self.kind == "lstm" else _GRU_ROLES
        k = [roles[g] for g in self.gate_order].index(role)
        return slice(k * self.units, (k + 1) * self.units)

    def sequence(self, x: np.ndarray) -> np.ndarray:
        """The h sequence (batch, T, units) for inputs ``x`` (batch, T, input_dim), zero start state."""
        x = np.asarray(x, dtype=np.float64)
        batch, steps, _ = x.shape
        u = self.units
        act, rec_act = activation_fn(self.activation), activation_fn(self.recurrent_activation)
        xa = x @ self.kernel + self.bias  # (batch, T, G*u): all input contributions at once
        rb = self.recurrent_bias if self.recurrent_bias is not None else 0.0
        h = np.zeros((batch, u))
        out = np.empty((batch, steps, u))
        if self.kind == "lstm":
            si, sf, sc, so = (self.gate_slice(r) for r in "ifco")
            c = np.zeros((batch, u))
            for t in range(steps):
                a = xa[:, t] + h @ self.recurrent_kernel + rb
                c = rec_act(a[:, sf]) * c + rec_act(a[:, si]) * act(a[:, sc])
                h = rec_act(a[:, so]) * act(c)
                out[:, t] = h
        else:
            sz, sr, sh = (self.gate_slice(r) for r in "zrh")
            rk_zr = self.recurrent_kernel[:, np.r_[sz, sr]]
            rk_h = self.recurrent_kernel[:, sh]
            for t in range(steps):
                a = xa[:, t]
                if self.reset_after:
                    ha = h @ self.recurrent_kernel + rb
                    z = rec_act(a[:, sz] + ha[:, sz])
                    r = rec_act(a[:, sr] + ha[:, sr])
                    cand = act(a[:, sh] + r * ha[:, sh])
                else:
                    zr = h @ rk_zr
                    z = rec_act(a[:, sz] + zr[:, :u])
                    r = rec_act(a[:, sr] + zr[:, u:])
                    cand = act(a[:, sh] + (r * h) @ rk_h)
                h = z * h + (1.0 - z) * cand
                out[:, t] = h
        return out

    def run(self, x: np.ndarray) -> np.ndarray:
        seq = self.sequence(x)
        return seq if self.return_sequences else seq[:, -1]

    def linear_rows(self, x: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """Rows ``[x_t, h_{t-1}, 1]`` (h_{-1} = 0), batch-major: the inputs of the gates' linear map."""
        batch, steps, _ = x.shape
        prev = np.concatenate([np.zeros((batch, 1, self.units)), seq[:, :-1]], axis=1)
        rows = np.concatenate([x, prev, np.ones((batch, steps, 1))], axis=2)
        return rows.reshape(batch * steps, -1)


@dataclass(eq=False)
class Bidirectional:
    """``forward`` over the sequence and ``backward`` over it reversed, merged per time step.

    The backward sequence is put back into time order, as Keras and torch do. Without
    ``return_sequences`` the output is Keras's: the forward layer's last state with the backward
    layer's final state (the one it reaches at the first time step). ``merge_mode`` is
    ``concat`` (features [forward, backward]), ``sum``, ``ave`` or ``mul``.
    """

    forward: Recurrent
    backward: Recurrent
    merge_mode: str
    return_sequences: bool

    def __post_init__(self) -> None:
        if self.merge_mode not in ("concat", "sum", "ave", "mul"):
            raise ModelFormatError(f"Bidirectional merge_mode {self.merge_mode!r} is not supported (concat, sum, "
                                   "ave, mul are)")
        if (self.forward.kind, self.forward.units, self.forward.input_dim) != (
                self.backward.kind, self.backward.units, self.backward.input_dim):
            raise ValueError("the two directions of a Bidirectional layer must be alike")

    @property
    def units(self) -> int:
        return self.forward.units

    @property
    def kind(self) -> str:
        return self.forward.kind

    @property
    def input_dim(self) -> int:
        return self.forward.input_dim

    @property
    def output_dim(self) -> int:
        return 2 * self.units if self.merge_mode == "concat" else self.units

    @property
    def returns_sequence(self) -> bool:
        return self.return_sequences

    def directions(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(forward h sequence, backward h sequence in time order)."""
        x = np.asarray(x, dtype=np.float64)
        return self.forward.sequence(x), self.backward.sequence(x[:, ::-1])[:, ::-1]

    def merge(self, f: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.merge_mode == "concat":
            return np.concatenate([f, b], axis=-1)
        if self.merge_mode == "sum":
            return f + b
        if self.merge_mode == "ave":
            return 0.5 * (f + b)
        return f * b

    def sequence(self, x: np.ndarray) -> np.ndarray:
        return self.merge(*self.directions(x))

    def run(self, x: np.ndarray) -> np.ndarray:
        f, b = self.directions(x)
        return self.merge(f, b) if self.return_sequences else self.merge(f[:, -1], b[:, 0])


# --- feed-forward and per-feature layers ------------------------------------------------------


@dataclass(eq=False)
class Dense:
    """A fully connected layer on the last axis: ``activation(input @ kernel + bias)``; kernel (in, out)."""

    kernel: np.ndarray
    bias: np.ndarray | None
    activation: str = "linear"

    def __post_init__(self) -> None:
        self.kernel = np.asarray(self.kernel, dtype=np.float64)
        if self.kernel.ndim != 2:
            raise ValueError(f"Dense kernel must be 2-D (in, out), not {self.kernel.shape}")
        if self.bias is not None:
            self.bias = np.asarray(self.bias, dtype=np.float64)
            if self.bias.shape != (self.kernel.shape[1],):
                raise ValueError(
                    f"Dense bias has shape {self.bias.shape}, expected ({self.kernel.shape[1]},)"
                )
        activation_fn(self.activation)

    @property
    def input_dim(self) -> int:
        return int(self.kernel.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.kernel.shape[1])

    @property
    def units(self) -> int:
        return self.output_dim

    def run(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float64) @ self.kernel
        if self.bias is not None:
            y = y + self.bias
        return activation_fn(self.activation)(y)


@dataclass(eq=False)
class BatchNorm:
    """Inference-time batch normalization on the last axis: ``(x - mean) / sqrt(var + eps) * gamma + beta``.

    ``gamma``/``beta`` are None when the layer has no scale/centre. The moving statistics are
    weights like any other: merging averages them.
    """

    mean: np.ndarray
    var: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    epsilon: float

    def __post_init__(self) -> None:
        for name in ("mean", "var", "gamma", "beta"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.float64).reshape(-1))
        if any(getattr(self, n) is not None and getattr(self, n).shape != self.mean.shape
               for n in ("var", "gamma", "beta")):
            raise ValueError("batch normalization statistics must all have one length")

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    output_dim = input_dim

    def run(self, x: np.ndarray) -> np.ndarray:
        y = (np.asarray(x, dtype=np.float64) - self.mean) / np.sqrt(self.var + self.epsilon)
        if self.gamma is not None:
            y = y * self.gamma
        return y + self.beta if self.beta is not None else y


@dataclass(eq=False)
class Normalization:
    """Keras ``Normalization`` on the last axis: ``(x - mean) / max(sqrt(var), floor)``; statistics are weights."""

    mean: np.ndarray
    var: np.ndarray
    floor: float = 1e-7  # keras.backend.epsilon()

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        self.var = np.asarray(self.var, dtype=np.float64).reshape(-1)
        if self.mean.shape != self.var.shape:
            raise ValueError("Normalization mean and variance must have one length")

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    output_dim = input_dim

    def run(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / np.maximum(np.sqrt(self.var), self.floor)


@dataclass(eq=False)
class Activation:
    """An element-wise activation between layers (keras ``Activation``, ``torch.tanh``, ``nn.ReLU``...)."""

    name: str
    dim: int

    def __post_init__(self) -> None:
        activation_fn(self.name)

    @property
    def input_dim(self) -> int:
        return self.dim

    output_dim = input_dim

    def run(self, x: np.ndarray) -> np.ndarray:
        return activation_fn(self.name)(np.asarray(x, dtype=np.float64))


@dataclass(eq=False)
class LastStep:
    """``x[:, -1]``: the last time step of a sequence (e.g. torch's ``out[:, -1, :]``)."""

    dim: int

    @property
    def input_dim(self) -> int:
        return self.dim

    output_dim = input_dim

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)[:, -1]


Layer = Recurrent | Bidirectional | Dense | BatchNorm | Normalization | Activation | LastStep
#: Layers that hold hidden units of their own (the others act per feature).
UNIT_LAYERS = (Recurrent, Bidirectional, Dense)
SEQUENCE_LAYERS = (Recurrent, Bidirectional)


def copy_layer(layer: Layer) -> Layer:
    """A deep copy (arrays and nested recurrent layers included)."""
    values = {}
    for f in dataclasses.fields(layer):
        v = getattr(layer, f.name)
        if isinstance(v, np.ndarray):
            v = v.copy()
        elif isinstance(v, Recurrent):
            v = copy_layer(v)
        values[f.name] = v
    return type(layer)(**values)


def describe(layer: Layer) -> str:
    """A short human name, e.g. ``LSTM(32)``, ``Bidirectional(GRU(8))``, ``Dense(1, tanh)``."""
    if isinstance(layer, Recurrent):
        return f"{layer.kind.upper()}({layer.units})"
    if isinstance(layer, Bidirectional):
        return f"Bidirectional({layer.kind.upper()}({layer.units}), {layer.merge_mode})"
    if isinstance(layer, Dense):
        return f"Dense({layer.output_dim}{'' if layer.activation == 'linear' else ', ' + layer.activation})"
    if isinstance(layer, Activation):
        return f"Activation({layer.name})"
    return f"{type(layer).__name__}({layer.input_dim})"
