"""A framework-independent numpy view of recurrent regression networks.

Merging independently trained models (unit alignment, RegMean, readout refits) needs the network
as plain float64 arrays plus a numpy forward pass. :class:`Network` is that view: a chain of
:class:`Recurrent` layers (LSTM/GRU) followed by :class:`Dense` layers. It remembers which model
tensors it was built from, so :meth:`Network.to_tensors` gives back exactly the names, order,
shapes and dtypes that :func:`secagg.models.read_model` produced, ready for
:func:`secagg.models.write_model`.

Supported models
----------------
**Keras** (``.keras``/``.h5``): a Sequential or functional chain of ``InputLayer``, ``LSTM``,
``GRU`` (``reset_after`` True or False) and ``Dense`` layers (``Dropout`` layers are accepted
and ignored: they do nothing at inference): any number of stacked recurrent layers, all but the
last with ``return_sequences=True``, then one or more Dense layers. Recurrent layers need
``use_bias=True`` and must not be ``go_backwards``/``stateful``. Nested Sequential/functional
models are flattened. Keras gate orders: LSTM ``"ifco"``, GRU ``"zrh"``.

**PyTorch** (``.pt``/``.pth``) state dicts follow this CONVENTION:

* exactly one ``nn.LSTM`` or ``nn.GRU`` module under any prefix ``<p>`` (possibly empty) with
  ``batch_first=True``, any ``num_layers``, ``bidirectional=False``, ``bias=True`` and no
  ``proj_size``: keys ``<p>.weight_ih_l{k}``, ``<p>.weight_hh_l{k}``, ``<p>.bias_ih_l{k}``,
  ``<p>.bias_hh_l{k}`` for k = 0 .. num_layers-1. LSTM and GRU are told apart by the number of
  gate rows (4*units vs 3*units). Gate orders: LSTM ``"ifco"`` (torch's i, f, g, o), GRU
  ``"rzn"``. Each torch layer k becomes one :class:`Recurrent` (``recurrent_bias`` = ``bias_hh``);
* its output at the LAST time step feeds one or more ``nn.Linear`` layers (keys ``<q>.weight``,
  optional ``<q>.bias``), applied in state-dict order, with ReLU between consecutive Linear
  layers and no activation after the last one;
* no other tensors (no buffers, normalisation layers, embeddings).

:func:`make_torch_regressor` builds a ``torch.nn.Module`` (class :class:`SequenceRegressor`,
importable from here once torch is installed) that implements exactly this convention. Its
state-dict names are ``rnn.weight_ih_l0``, ``rnn.weight_hh_l0``, ``rnn.bias_ih_l0``,
``rnn.bias_hh_l0`` (then ``..._l1`` ... for more recurrent layers), followed by
``head.0.weight``, ``head.0.bias``, ``head.1.weight``, ``head.1.bias``, ... for the Linear layers.

Array conventions (both frameworks): ``Recurrent.kernel`` is (input_dim, G*units) (torch
``weight_ih`` transposed), ``recurrent_kernel`` (units, G*units), gate blocks of ``units``
columns in ``gate_order``; ``Dense.kernel`` is (in, out) (torch ``weight`` transposed).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secagg.errors import ModelFormatError

__all__ = [
    "Dense",
    "Network",
    "Recurrent",
    "load_network",
    "make_torch_regressor",
    "network_from_tensors",
]

SUPPORTED_KERAS_LAYERS = "InputLayer, LSTM, GRU, Dense (and Dropout, ignored)"
_SUPPORTED_ARCH = (
    f"supported are {SUPPORTED_KERAS_LAYERS}: stacked LSTM/GRU layers (return_sequences=True for "
    "all but the last) followed by one or more Dense layers"
)


# --- activations ---------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form is exact, cannot overflow, and is several times faster than an exp with np.where.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "hard_sigmoid": lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),  # Keras 3 definition
    "softplus": lambda x: np.logaddexp(0.0, x),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "softmax": _softmax,  # over the last axis (Dense only)
}


def _activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ModelFormatError(
            f"activation {name!r} is not supported; supported are {', '.join(ACTIVATIONS)}"
        ) from None


# --- layers --------------------------------------------------------------------------------

# gate letter -> canonical role. LSTM: input, forget, cell candidate (keras c, torch g), output.
# GRU: update z, reset r, candidate h (torch n).
_LSTM_ROLES = {"i": "i", "f": "f", "c": "c", "g": "c", "o": "o"}
_GRU_ROLES = {"z": "z", "r": "r", "h": "h", "n": "h"}


@dataclass(eq=False)  # numpy fields: compare explicitly, not with ==
class Recurrent:
    """One recurrent layer (a multi-layer torch ``nn.LSTM`` becomes several).

    ``kernel`` (input_dim, G*units) maps the input to the gates, ``recurrent_kernel``
    (units, G*units) the previous state; the G blocks of ``units`` columns are in
    ``gate_order`` (G = 4 for LSTM, 3 for GRU). ``recurrent_bias`` is torch's ``bias_hh`` or the
    second row of a Keras GRU(reset_after=True) bias; None for Keras LSTM and GRU with
    ``reset_after=False``. ``reset_after`` (GRU only): True applies the reset gate after the
    recurrent matmul (torch, Keras default), False before it (``r * h`` times the kernel).
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
        _activation(self.activation), _activation(self.recurrent_activation)

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

    def gate_slice(self, role: str) -> slice:
        """Columns of gate ``role`` (LSTM: i, f, c, o; GRU: z, r, h) in the kernels and biases."""
        roles = _LSTM_ROLES if self.kind == "lstm" else _GRU_ROLES
        k = [roles[g] for g in self.gate_order].index(role)
        return slice(k * self.units, (k + 1) * self.units)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The h sequence (batch, T, units) for inputs ``x`` (batch, T, input_dim), zero start state."""
        x = np.asarray(x, dtype=np.float64)
        batch, steps, _ = x.shape
        u = self.units
        act, rec_act = _activation(self.activation), _activation(self.recurrent_activation)
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


@dataclass(eq=False)  # numpy fields: compare explicitly, not with ==
class Dense:
    """A fully connected layer: ``activation(input @ kernel + bias)``; kernel (in, out)."""

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
        _activation(self.activation)

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
        return _activation(self.activation)(y)


Layer = Recurrent | Dense


# --- the network ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One source tensor: its name, shape and dtype, and how it is computed from layer `layer`."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layer: int
    role: str


@dataclass(frozen=True)
class _Source:
    framework: str
    entries: tuple[_Entry, ...]


@dataclass(eq=False)  # numpy fields: compare explicitly, not with ==
class Network:
    """A chain of Recurrent layers followed by Dense layers, as float64 numpy arrays.

    Inputs are (batch, timesteps, features) arrays; the recurrent layers start from zero state
    and the last recurrent layer's final state feeds the Dense layers. Networks built by
    :func:`network_from_tensors`/:func:`load_network` remember their source tensors, so
    :meth:`to_tensors` writes back to them.
    """

    layers: list[Layer]
    _source: _Source | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.layers = list(self.layers)
        _check_chain(self.layers)

    # -- evaluation ----------------------------------------------------------------------

    def _outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Per layer: recurrent -> full h sequence; dense -> its output."""
        cur = np.asarray(x, dtype=np.float64)
        outs = []
        for layer in self.layers:
            if isinstance(layer, Recurrent):
                if cur.ndim != 3:
                    raise ValueError(
                        f"recurrent layers need inputs of shape (batch, timesteps, features), got {cur.shape}"
                    )
                seq = layer.run(cur)
                outs.append(seq)
                cur = seq if layer.return_sequences else seq[:, -1]
            else:
                cur = layer.run(cur)
                outs.append(cur)
        return outs

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The model's output (batch, out) for ``x`` (batch, timesteps, features)."""
        return self._outputs(x)[-1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def features(self, x: np.ndarray) -> np.ndarray:
        """The input of the last Dense layer (batch, d), e.g. for refitting the readout."""
        return self._layer_inputs(x, self._outputs(x))[-1]

    def hidden_states(self, x: np.ndarray) -> list[np.ndarray]:
        """Per layer: recurrent -> h sequence (batch, T, units); dense -> its output (batch, out)."""
        return self._outputs(x)

    def linear_inputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Per layer, the rows its linear map is applied to, with a trailing column of ones.

        Recurrent: rows ``[x_t, h_{t-1}, 1]`` (h_{-1} = 0) for every batch item and time step,
        batch-major, shape (batch*T, input_dim + units + 1); the gate pre-activations are
        ``rows @ vstack([kernel, recurrent_kernel, bias (+ recurrent_bias)])`` (for a GRU's
        candidate gate the recurrent part is further multiplied by the reset gate). Dense:
        ``[input, 1]``, shape (batch, in + 1). For RegMean-style Gram matrices.
        """
        outs = self._outputs(x)
        result = []
        for layer, inp, out in zip(self.layers, self._layer_inputs(x, outs), outs):
            if isinstance(layer, Recurrent):
                batch, steps, _ = inp.shape
                prev = np.concatenate([np.zeros((batch, 1, layer.units)), out[:, :-1]], axis=1)
                rows = np.concatenate([inp, prev, np.ones((batch, steps, 1))], axis=2)
                result.append(rows.reshape(batch * steps, -1))
            else:
                result.append(np.concatenate([inp, np.ones((inp.shape[0], 1))], axis=1))
        return result

    def _layer_inputs(self, x: np.ndarray, outs: list[np.ndarray]) -> list[np.ndarray]:
        inputs, cur = [], np.asarray(x, dtype=np.float64)
        for layer, out in zip(self.layers, outs):
            inputs.append(cur)
            cur = out[:, -1] if isinstance(layer, Recurrent) and not layer.return_sequences else out
        return inputs

    # -- editing and writing back --------------------------------------------------------

    def replace(self, index: int, layer: Layer) -> Network:
        """A copy with layer ``index`` replaced by ``layer`` (same source tensors)."""
        layers = list(self.layers)
        layers[index] = layer
        return Network(layers, self._source)

    def copy(self) -> Network:
        """A deep copy (arrays included)."""
        return Network([_copy_layer(layer) for layer in self.layers], self._source)

    @property
    def framework(self) -> str | None:
        """"keras" or "torch" for networks built from tensors, None for hand-built ones."""
        return self._source.framework if self._source else None

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The source model's tensors (same names, order, shapes, dtypes) holding these weights."""
        if self._source is None:
            raise ValueError(
                "this Network was built by hand, not from model tensors; it has no tensor names "
                "to write back to (build it with network_from_tensors or load_network)"
            )
        out = {}
        for e in self._source.entries:
            if e.layer >= len(self.layers):
                raise ModelFormatError(f"tensor {e.name!r} belongs to layer {e.layer}, which is gone")
            value = _tensor_value(self.layers[e.layer], e.role)
            if value is None:
                raise ModelFormatError(
                    f"layer {e.layer} has no value for tensor {e.name!r} ({e.role}); the model "
                    "file needs it"
                )
            if value.shape != e.shape:
                raise ModelFormatError(
                    f"tensor {e.name!r} would get shape {value.shape} from layer {e.layer}, but "
                    f"the model file has shape {e.shape}"
                )
            cast = np.ascontiguousarray(value).astype(e.dtype)
            if e.dtype.kind == "f" and not np.array_equal(np.isfinite(cast), np.isfinite(value)):
                raise ModelFormatError(f"tensor {e.name!r}: values overflow its dtype {e.dtype}")
            out[e.name] = cast
        return out


    def with_tensors(self, tensors: Mapping[str, np.ndarray]) -> Network:
        """A copy holding the values of ``tensors`` (the inverse of :meth:`to_tensors`).

        ``tensors`` must have exactly the source tensors' names and shapes (any float dtype,
        e.g. an average or a retrained model's weights); the layers' kinds and options are kept.
        """
        if self._source is None:
            raise ValueError("this Network was built by hand; it has no tensor names to read")
        entries = {e.name: e for e in self._source.entries}
        missing = [n for n in entries if n not in tensors]
        extra = [n for n in tensors if n not in entries]
        if missing or extra:
            which = f"tensor {missing[0]!r} is missing" if missing else f"tensor {extra[0]!r} is unknown"
            raise ModelFormatError(f"{which}; the tensors must have this network's names ({len(entries)} tensors)")
        updates: list[dict[str, np.ndarray]] = [{} for _ in self.layers]
        for name, e in entries.items():
            arr = np.array(tensors[name], dtype=np.float64)
            if arr.shape != e.shape:
                raise ModelFormatError(f"tensor {name!r} has shape {arr.shape}, expected {e.shape}")
            fields = _ROLE_FIELDS[e.role]
            if e.role == "bias_pair":
                updates[e.layer].update(bias=arr[0], recurrent_bias=arr[1])
            else:
                updates[e.layer][fields] = arr.T if e.role in ("weight_ih", "weight_hh", "weight") else arr
        layers = [dataclasses.replace(layer, **u) if u else _copy_layer(layer) for layer, u in zip(self.layers, updates)]
        return Network(layers, self._source)


# source-tensor role -> layer field it holds (bias_pair: bias and recurrent_bias)
_ROLE_FIELDS = {
    "kernel": "kernel", "recurrent_kernel": "recurrent_kernel", "bias": "bias", "bias_pair": "bias",
    "weight_ih": "kernel", "weight": "kernel", "weight_hh": "recurrent_kernel", "bias_ih": "bias",
    "bias_hh": "recurrent_bias",
}


def _copy_layer(layer: Layer) -> Layer:
    return dataclasses.replace(
        layer,
        **{
            f.name: (getattr(layer, f.name).copy() if isinstance(getattr(layer, f.name), np.ndarray) else getattr(layer, f.name))
            for f in dataclasses.fields(layer)
        },
    )


def _tensor_value(layer: Layer, role: str) -> np.ndarray | None:
    recurrent = isinstance(layer, Recurrent)
    need_recurrent = role in ("recurrent_kernel", "bias_pair", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
    if need_recurrent and not recurrent or role == "weight" and recurrent:
        raise ModelFormatError(
            f"layer is a {type(layer).__name__} but its source tensor is a "
            f"{'recurrent' if need_recurrent else 'dense'} layer's {role}"
        )
    if role in ("kernel", "recurrent_kernel", "bias"):
        return getattr(layer, role)
    if role == "bias_pair":
        if layer.recurrent_bias is None:
            return None
        return np.stack([layer.bias, layer.recurrent_bias])
    if role in ("weight_ih", "weight"):
        return layer.kernel.T
    if role == "weight_hh":
        return layer.recurrent_kernel.T
    if role == "bias_ih":
        return layer.bias
    if role == "bias_hh":
        return layer.recurrent_bias
    raise AssertionError(role)


def _check_chain(layers: list[Layer]) -> None:
    """Raise ModelFormatError unless ``layers`` is recurrent* dense+ with matching sizes."""
    if not layers or not isinstance(layers[-1], Dense):
        raise ModelFormatError(f"the network must end with a Dense layer; {_SUPPORTED_ARCH}")
    recurrent = [i for i, layer in enumerate(layers) if isinstance(layer, Recurrent)]
    if recurrent and recurrent[-1] != len(recurrent) - 1:
        raise ModelFormatError(f"a recurrent layer follows a Dense layer; {_SUPPORTED_ARCH}")
    for i in recurrent:
        want = i != recurrent[-1]
        if layers[i].return_sequences != want:
            raise ModelFormatError(
                f"recurrent layer {i} has return_sequences={layers[i].return_sequences}; "
                f"{_SUPPORTED_ARCH}"
            )
    for i in range(1, len(layers)):
        if layers[i].input_dim != layers[i - 1].output_dim:
            raise ModelFormatError(
                f"layer {i} takes {layers[i].input_dim} inputs but layer {i - 1} gives "
                f"{layers[i - 1].output_dim}"
            )


# --- building from tensors -----------------------------------------------------------------


def network_from_tensors(
    tensors: Mapping[str, np.ndarray],
    framework: str,
    keras_config: list[dict] | None = None,
) -> Network:
    """Build a :class:`Network` from named tensors as :func:`secagg.models.read_model` returns.

    ``framework`` is ``"keras"`` or ``"torch"`` (``"pytorch"`` also accepted). Torch state dicts
    must follow the module docstring's CONVENTION. Keras tensors are grouped by layer from their
    names (``<layer>[/<layer>_cell]/kernel|recurrent_kernel|bias``). ``keras_config`` gives the
    layers' configs: a list of dicts, either ``{"class_name": ..., "config": {...}}`` entries as
    in ``model.get_config()["layers"]`` (nested models are flattened; InputLayer and Dropout
    entries are skipped) or flat ``layer.get_config()`` dicts with a ``"class_name"`` key, in
    model order. Without it Keras defaults are assumed: LSTM vs GRU from the gate count, tanh /
    sigmoid activations, ``return_sequences`` True for all but the last recurrent layer, GRU
    ``reset_after`` from the bias shape, and **linear** Dense activations (pass the config, or
    use :func:`load_network`, when hidden Dense layers have an activation).
    """
    framework = framework.lower()
    if framework in ("torch", "pytorch"):
        return _torch_network(tensors)
    if framework == "keras":
        groups = _keras_groups(tensors)
        configs = _flatten_configs(keras_config) if keras_config is not None else None
        if configs is not None and len(configs) != len(groups):
            raise ModelFormatError(
                f"keras_config lists {len(configs)} layers with weights but the tensors hold "
                f"{len(groups)} layers ({', '.join(g[0] for g in groups)})"
            )
        specs = []
        for k, (layer_name, roles) in enumerate(groups):
            if configs is None:
                specs.append((layer_name, None, {}, roles))
            else:
                cls, cfg = configs[k]
                if cfg.get("name") not in (None, layer_name.rsplit("/", 1)[-1]):
                    raise ModelFormatError(
                        f"keras_config entry {k} is layer {cfg.get('name')!r} but the tensors' "
                        f"layer {k} is {layer_name!r}"
                    )
                specs.append((layer_name, cls, cfg, roles))
        return _keras_network(tensors, specs)
    raise ValueError(f"framework must be 'keras' or 'torch', not {framework!r}")


_KERAS_ROLES = ("kernel", "recurrent_kernel", "bias")


def _keras_groups(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, dict[str, str]]]:
    groups: dict[str, dict[str, str]] = {}
    for name in tensors:
        head, _, role = name.rpartition("/")
        if role not in _KERAS_ROLES or not head:
            raise ModelFormatError(
                f"tensor {name!r} is not a kernel/recurrent_kernel/bias of an LSTM, GRU or Dense "
                f"layer; {_SUPPORTED_ARCH}"
            )
        parent, _, last = head.rpartition("/")
        if parent and last.endswith("_cell"):
            head = parent
        roles = groups.setdefault(head, {})
        if role in roles:
            raise ModelFormatError(f"layer {head!r} has two {role} tensors ({roles[role]!r}, {name!r})")
        roles[role] = name
    return list(groups.items())


def _flatten_configs(configs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for entry in configs:
        cls = entry.get("class_name")
        cfg = entry.get("config", {k: v for k, v in entry.items() if k != "class_name"})
        if cls in ("Sequential", "Functional", "Model"):
            out.extend(_flatten_configs(cfg.get("layers", [])))
        elif cls in ("InputLayer", "Dropout"):
            continue
        else:
            out.append((cls, cfg))
    return out


def _keras_network(
    tensors: Mapping[str, np.ndarray],
    specs: list[tuple[str, str | None, dict, dict[str, str]]],
) -> Network:
    """specs: per weighted layer (layer name, class name or None, config, role -> tensor name)."""
    layers: list[Layer] = []
    entries: dict[str, _Entry] = {}
    recurrent_count = sum(1 for _, cls, _, roles in specs if cls in ("LSTM", "GRU") or "recurrent_kernel" in roles)
    seen_recurrent = 0
    for index, (layer_name, cls, cfg, roles) in enumerate(specs):
        arrays = {role: np.asarray(tensors[name]) for role, name in roles.items()}
        is_recurrent = "recurrent_kernel" in roles
        if cls is not None and cls not in ("LSTM", "GRU", "Dense"):
            raise ModelFormatError(f"layer {layer_name!r} ({cls}) is not supported; {_SUPPORTED_ARCH}")
        if cls is not None and (cls != "Dense") != is_recurrent:
            raise ModelFormatError(f"layer {layer_name!r} ({cls}) has tensors {sorted(roles)}")
        if "kernel" not in roles:
            raise ModelFormatError(f"layer {layer_name!r} has no kernel tensor")

        def entry(role: str, kind: str | None = None) -> None:
            arr = arrays[role]
            entries[roles[role]] = _Entry(roles[role], arr.shape, arr.dtype, index, kind or role)

        if is_recurrent:
            seen_recurrent += 1
            kernel, rkernel = arrays["kernel"], arrays["recurrent_kernel"]
            if kernel.ndim != 2 or rkernel.ndim != 2 or rkernel.shape[0] == 0:
                raise ModelFormatError(f"layer {layer_name!r}: kernels must be 2-D")
            units = rkernel.shape[0]
            gates = rkernel.shape[1] // units
            kind = {4: "lstm", 3: "gru"}.get(gates)
            if cls is not None and kind != cls.lower() or rkernel.shape[1] != gates * units:
                kind = None
            if kind is None:
                raise ModelFormatError(
                    f"layer {layer_name!r}: recurrent kernel {rkernel.shape} is neither an LSTM's "
                    f"(units, 4*units) nor a GRU's (units, 3*units)"
                )
            _refuse_keras_options(layer_name, cls or kind.upper(), cfg)
            if "bias" not in roles:
                raise ModelFormatError(
                    f"layer {layer_name!r}: recurrent layers without bias (use_bias=False) are "
                    "not supported"
                )
            bias = arrays["bias"]
            rbias = None
            reset_after = True
            if kind == "gru":
                reset_after = bool(cfg.get("reset_after", bias.ndim == 2))
                if reset_after:
                    if bias.shape != (2, 3 * units):
                        raise ModelFormatError(
                            f"layer {layer_name!r}: GRU(reset_after=True) bias has shape "
                            f"{bias.shape}, expected (2, {3 * units})"
                        )
                    bias, rbias = bias[0], bias[1]
            entry("kernel")
            entry("recurrent_kernel")
            entry("bias", "bias_pair" if rbias is not None else "bias")
            layers.append(
                Recurrent(
                    kind=kind,
                    gate_order="ifco" if kind == "lstm" else "zrh",
                    kernel=kernel,
                    recurrent_kernel=rkernel,
                    bias=bias,
                    recurrent_bias=rbias,
                    return_sequences=bool(cfg.get("return_sequences", seen_recurrent < recurrent_count)),
                    activation=_config_activation(layer_name, cfg.get("activation", "tanh")),
                    recurrent_activation=_config_activation(
                        layer_name, cfg.get("recurrent_activation", "sigmoid")
                    ),
                    reset_after=reset_after,
                )
            )
        else:
            entry("kernel")
            if "bias" in roles:
                entry("bias")
            if cfg.get("lora_rank"):
                raise ModelFormatError(f"layer {layer_name!r}: Dense layers with LoRA are not supported")
            layers.append(
                Dense(
                    arrays["kernel"],
                    arrays.get("bias"),
                    _config_activation(layer_name, cfg.get("activation", "linear")),
                )
            )
    ordered = tuple(entries[name] for name in tensors)
    return Network(layers, _Source("keras", ordered))


def _refuse_keras_options(layer_name: str, cls: str, cfg: dict) -> None:
    for option in ("go_backwards", "stateful", "return_state"):
        if cfg.get(option):
            raise ModelFormatError(f"layer {layer_name!r} ({cls}) has {option}=True, which is not supported")
    if cfg.get("use_bias") is False:
        raise ModelFormatError(
            f"layer {layer_name!r} ({cls}): recurrent layers without bias (use_bias=False) are not supported"
        )


def _config_activation(layer_name: str, value: Any) -> str:
    if value is None:
        return "linear"
    if isinstance(value, dict):  # a serialized function object
        value = value.get("config", value.get("class_name"))
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise ModelFormatError(
            f"layer {layer_name!r} uses activation {value!r}; supported are {', '.join(ACTIVATIONS)}"
        )
    return value


_RNN_KEY = re.compile(r"^(?:(?P<p>.*)\.)?(?P<what>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(?P<k>\d+)(?P<rev>_reverse)?$")
_LINEAR_KEY = re.compile(r"^(?:(?P<q>.*)\.)?(?P<what>weight|bias)$")
_TORCH_CONVENTION = (
    "the PyTorch convention is one nn.LSTM/nn.GRU (batch_first, unidirectional, bias=True) whose "
    "last time step feeds nn.Linear layers in state-dict order with ReLU between them "
    "(see secagg.merge.network)"
)


def _torch_network(tensors: Mapping[str, np.ndarray]) -> Network:
    rnn: dict[int, dict[str, str]] = {}
    prefixes: list[str] = []
    linears: dict[str, dict[str, str]] = {}
    for name, arr in tensors.items():
        m = _RNN_KEY.match(name)
        if m:
            if m["rev"]:
                raise ModelFormatError(f"tensor {name!r}: bidirectional RNNs are not supported; {_TORCH_CONVENTION}")
            if m["what"] == "weight_hr":
                raise ModelFormatError(f"tensor {name!r}: LSTMs with proj_size are not supported; {_TORCH_CONVENTION}")
            p = m["p"] or ""
            if p not in prefixes:
                prefixes.append(p)
            rnn.setdefault(int(m["k"]), {})[m["what"]] = name
            continue
        m = _LINEAR_KEY.match(name)
        if m and (m["what"] == "bias" or np.ndim(arr) == 2):
            linears.setdefault(m["q"] or "", {})[m["what"]] = name
            continue
        raise ModelFormatError(f"tensor {name!r} {np.shape(arr)} does not fit; {_TORCH_CONVENTION}")
    if len(prefixes) != 1:
        found = f" ({', '.join(map(repr, prefixes))})" if prefixes else ""
        raise ModelFormatError(
            f"the state dict has {len(prefixes) or 'no'} LSTM/GRU modules{found}; {_TORCH_CONVENTION}"
        )
    if sorted(rnn) != list(range(len(rnn))):
        raise ModelFormatError(f"recurrent layers {sorted(rnn)} of {prefixes[0]!r} are not 0..{len(rnn) - 1}")
    if not linears:
        raise ModelFormatError(f"the state dict has no nn.Linear layer; {_TORCH_CONVENTION}")

    layers: list[Layer] = []
    entries: dict[str, _Entry] = {}

    def entry(name: str, index: int, role: str) -> None:
        arr = np.asarray(tensors[name])
        entries[name] = _Entry(name, arr.shape, arr.dtype, index, role)

    kind = None
    for k in range(len(rnn)):
        keys = rnn[k]
        missing = [w for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if w not in keys]
        if missing:
            raise ModelFormatError(
                f"recurrent layer {k} of {prefixes[0]!r} has no {missing[0]}_l{k}; bias=True is "
                f"required; {_TORCH_CONVENTION}"
            )
        w_ih, w_hh = (np.asarray(tensors[keys[w]]) for w in ("weight_ih", "weight_hh"))
        if w_ih.ndim != 2 or w_hh.ndim != 2 or w_hh.shape[1] == 0:
            raise ModelFormatError(f"recurrent layer {k}: weights must be 2-D")
        units = w_hh.shape[1]
        gates = w_hh.shape[0] // units
        this = {4: "lstm", 3: "gru"}.get(gates) if w_hh.shape[0] == gates * units else None
        if this is None:
            raise ModelFormatError(
                f"{keys['weight_hh']!r} has shape {w_hh.shape}: neither an LSTM's (4*units, units) "
                "nor a GRU's (3*units, units)"
            )
        if kind is not None and this != kind:
            raise ModelFormatError(f"recurrent layer {k} is a {this} but layer 0 is a {kind}")
        kind = this
        for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            entry(keys[w], k, w)
        layers.append(
            Recurrent(
                kind=kind,
                gate_order="ifco" if kind == "lstm" else "rzn",
                kernel=w_ih.T,
                recurrent_kernel=w_hh.T,
                bias=tensors[keys["bias_ih"]],
                recurrent_bias=tensors[keys["bias_hh"]],
                return_sequences=k < len(rnn) - 1,
            )
        )
    names = list(linears)
    for j, q in enumerate(names):
        keys = linears[q]
        if "weight" not in keys:
            raise ModelFormatError(f"tensor {keys['bias']!r} has no matching {q}.weight; {_TORCH_CONVENTION}")
        index = len(layers)
        entry(keys["weight"], index, "weight")
        if "bias" in keys:
            entry(keys["bias"], index, "bias")
        layers.append(
            Dense(
                np.asarray(tensors[keys["weight"]]).T,
                tensors[keys["bias"]] if "bias" in keys else None,
                "relu" if j < len(names) - 1 else "linear",
            )
        )
    ordered = tuple(entries[name] for name in tensors)
    return Network(layers, _Source("torch", ordered))


# --- model files ---------------------------------------------------------------------------


def load_network(path: str | os.PathLike) -> Network:
    """Read the model file at ``path`` (.keras/.h5 or .pt/.pth) as a :class:`Network`.

    Keras layer kinds and options come from the loaded layer objects; tensor names are those
    :func:`secagg.models.read_model` gives the same file. The numpy forward pass of a Keras model
    is checked against Keras once on a random input, so a functional model that is not a plain
    chain is refused. PyTorch files must follow the module docstring's CONVENTION.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        from secagg.models import read_model

        return network_from_tensors(read_model(path), "torch")
    if suffix not in (".keras", ".h5"):
        raise ModelFormatError(
            f"{path}: cannot read a network from a {path.suffix or 'suffix-less'} file; merging "
            "needs the architecture, so give a Keras .keras/.h5 or a PyTorch .pt/.pth file"
        )
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such model file")
    from secagg.models import keras_files

    keras = keras_files._import_keras("reading", path)
    model = keras_files._load(keras, path)
    named = keras_files._named_variables(keras, model)
    name_of = {id(v): n for n, v in named.items()}
    tensors = {}
    for name, variable in named.items():
        arr = np.asarray(keras.ops.convert_to_numpy(variable))
        if keras_files._numpy_dtype(arr.dtype) != arr.dtype:
            arr = arr.astype(np.float32)  # as read_model does (e.g. bfloat16)
        tensors[name] = arr

    specs = []
    claimed: set[str] = set()
    for layer in _flat_layers(keras, model):
        cls = type(layer)
        if cls in (keras.layers.InputLayer, keras.layers.Dropout):
            continue
        if cls in (keras.layers.LSTM, keras.layers.GRU):
            owner = layer.cell
            wanted = {"kernel": owner.kernel, "recurrent_kernel": owner.recurrent_kernel}
            if getattr(owner, "use_bias", True) and owner.bias is not None:
                wanted["bias"] = owner.bias
        elif cls is keras.layers.Dense:
            wanted = {"kernel": layer._kernel if hasattr(layer, "_kernel") else layer.kernel}
            if layer.use_bias:
                wanted["bias"] = layer.bias
        else:
            raise ModelFormatError(
                f"{path}: layer {layer.name!r} ({cls.__name__}) is not supported for merging; "
                f"{_SUPPORTED_ARCH}"
            )
        if len(layer.weights) != len(wanted) or any(id(v) not in name_of for v in wanted.values()):
            raise ModelFormatError(
                f"{path}: layer {layer.name!r} ({cls.__name__}) has weights "
                f"{[v.path for v in layer.weights]}; only plain kernel/recurrent_kernel/bias "
                "weights are supported (no LoRA, quantization or use_bias=False recurrent layers)"
            )
        roles = {role: name_of[id(v)] for role, v in wanted.items()}
        claimed.update(roles.values())
        specs.append((layer.name, cls.__name__, layer.get_config(), roles))
    unclaimed = [n for n in tensors if n not in claimed]
    if unclaimed:
        raise ModelFormatError(f"{path}: tensor {unclaimed[0]!r} belongs to no supported layer; {_SUPPORTED_ARCH}")
    try:
        net = _keras_network(tensors, specs)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}") from None
    _verify_against_keras(keras, model, net, path)
    return net


def _flat_layers(keras, model) -> list:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(_flat_layers(keras, layer))
        else:
            out.append(layer)
    return out


def _verify_against_keras(keras, model, net: Network, path: pathlib.Path) -> None:
    """Refuse models whose Keras output differs from the chain's (branches, shared layers)."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelFormatError(f"{path}: the model must have one input and one output; {_SUPPORTED_ARCH}")
    if any(getattr(layer, "dtype_policy", None) is not None and layer.dtype_policy.name != "float32"
           for layer in _flat_layers(keras, model)):
        return  # mixed precision: Keras's own rounding is too coarse for a tight comparison
    shape = list(model.inputs[0].shape)
    if len(shape) != 3 and isinstance(net.layers[0], Recurrent):
        raise ModelFormatError(f"{path}: the model input must be (batch, timesteps, features), not {shape}")
    shape = [2] + [4 if d is None else int(d) for d in shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)
    got = net.forward(x)
    if want.shape != got.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-4):
        raise ModelFormatError(
            f"{path}: the model does not compute a plain chain of its layers (branches, shared "
            f"or reused layers?); {_SUPPORTED_ARCH}"
        )


# --- the PyTorch reference module ------------------------------------------------------------


def make_torch_regressor(input_dim: int, units: list[int], dense: list[int], kind: str = "lstm"):
    """A :class:`SequenceRegressor`: the torch module of the module docstring's CONVENTION.

    ``units``: hidden size per recurrent layer (all equal: one ``nn.LSTM``/``nn.GRU`` with
    ``num_layers=len(units)``); ``dense``: output size per Linear layer, the last one being the
    model's output. Needs torch.
    """
    return _regressor_class()(input_dim, units, dense, kind)


@functools.cache
def _regressor_class():
    try:
        import torch
    except ImportError as e:
        raise ImportError("SequenceRegressor needs PyTorch: pip install 'secagg[torch]'") from e

    class SequenceRegressor(torch.nn.Module):
        """``rnn`` (nn.LSTM/nn.GRU, batch_first) -> last step -> ``head`` Linear layers, ReLU between.

        State-dict names: ``rnn.weight_ih_l{k}``, ``rnn.weight_hh_l{k}``, ``rnn.bias_ih_l{k}``,
        ``rnn.bias_hh_l{k}``, then ``head.{j}.weight``, ``head.{j}.bias``. Input (batch, T,
        input_dim), output (batch, dense[-1]).
        """

        def __init__(self, input_dim: int, units: list[int], dense: list[int], kind: str = "lstm"):
            super().__init__()
            units, dense = [int(u) for u in units], [int(d) for d in dense]
            if not units or len(set(units)) != 1:
                raise ValueError(
                    f"units must be a non-empty list of one repeated size (one nn.{kind.upper()} "
                    f"with num_layers=len(units)), not {units}"
                )
            if not dense:
                raise ValueError("dense must list at least one Linear layer size (the output)")
            rnn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(kind)
            if rnn_cls is None:
                raise ValueError(f"kind must be 'lstm' or 'gru', not {kind!r}")
            self.kind = kind
            self.rnn = rnn_cls(int(input_dim), units[0], num_layers=len(units), batch_first=True)
            sizes = [units[0], *dense]
            self.head = torch.nn.ModuleList(
                torch.nn.Linear(sizes[j], sizes[j + 1]) for j in range(len(dense))
            )

        def forward(self, x):
            out, _ = self.rnn(x)
            h = out[:, -1, :]
            for j, linear in enumerate(self.head):
                h = linear(h)
                if j < len(self.head) - 1:
                    h = torch.relu(h)
            return h

    SequenceRegressor.__module__ = __name__
    SequenceRegressor.__qualname__ = "SequenceRegressor"
    return SequenceRegressor


def __getattr__(name: str):
    # SequenceRegressor is created on first use so that importing this module needs no torch.
    if name == "SequenceRegressor":
        return _regressor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
