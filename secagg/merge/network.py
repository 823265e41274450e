"""A framework-independent numpy view of a forecasting network, checked against its framework.

Merging independently trained models (unit alignment, RegMean, readout refits) needs the network
as plain float64 arrays plus a numpy forward pass. :class:`Network` is that view: a chain of
layers (:mod:`secagg.merge.layers`) that remembers which model tensors it was built from, so
:meth:`Network.to_tensors` gives back exactly the names, order, shapes and dtypes that
:func:`secagg.models.read_model` produced, ready for :func:`secagg.models.write_model`.

The view is never trusted on its own. :func:`open_model` builds it from the framework's own model
(Keras layers from the file; for PyTorch, the user's ``nn.Module`` traced with ``torch.fx``),
then compares its forward pass with the framework's on the site's data and refuses a mismatch.
Merge methods compare every candidate again before scoring or releasing it
(:meth:`SiteModel.check`), so a model secagg does not understand is refused instead of being
merged silently wrong.

Supported layouts, Keras (``keras_view``) and PyTorch (``torch_view``): stacked LSTM/GRU layers
(any activations), ``Bidirectional`` LSTM/GRU (concat, sum, ave, mul), ``Dense`` heads with any
activation in :data:`~secagg.merge.layers.ACTIVATIONS` on the last step or on every step
(``return_sequences=True`` + ``TimeDistributed(Dense)``/``Dense``), ``Dropout``,
``BatchNormalization``, ``Normalization`` and element-wise activations between layers. The last
Dense layer is the model's output (the readout).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secagg.errors import ModelFormatError
from secagg.merge.layers import (
    ACTIVATIONS,
    SEQUENCE_LAYERS,
    UNIT_LAYERS,
    Activation,
    BatchNorm,
    Bidirectional,
    Dense,
    LastStep,
    Layer,
    Normalization,
    Recurrent,
    copy_layer,
    describe,
)

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "BatchNorm",
    "Bidirectional",
    "Dense",
    "LastStep",
    "Network",
    "Normalization",
    "Recurrent",
    "SiteModel",
    "load_network",
    "open_model",
]

SUPPORTED_LAYOUTS = (
    "stacked LSTM/GRU (any activations), Bidirectional(LSTM/GRU), Dense heads on the last step or on every step "
    "(return_sequences=True + TimeDistributed(Dense)), Dropout, BatchNormalization, Normalization and element-wise "
    "activations, ending in a Dense output layer"
)


@dataclass(frozen=True)
class _Entry:
    """One source tensor: its name, shape and dtype, and where its values live.

    ``role`` is a field of layer ``layer`` (``kernel``, ``bias``, ``mean``...), prefixed with
    ``forward.``/``backward.`` inside a Bidirectional layer and with ``T:`` when the file stores the
    field transposed (torch's ``weight``); ``bias_pair`` stacks bias and recurrent bias (Keras GRU);
    ``const`` marks a tensor the view does not model (e.g. a counter): it is written back unchanged.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layer: int
    role: str
    const: np.ndarray | None = None


@dataclass(frozen=True)
class _Source:
    framework: str
    entries: tuple[_Entry, ...]


@dataclass(eq=False)  # numpy fields: compare explicitly, not with ==
class Network:
    """A chain of layers as float64 numpy arrays; inputs are (batch, timesteps, features) arrays.

    Networks built by :func:`open_model` remember their source tensors, so :meth:`to_tensors`
    writes back to them.
    """

    layers: list[Layer]
    _source: _Source | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.layers = list(self.layers)
        _check_chain(self.layers)

    # -- structure -------------------------------------------------------------------------

    @property
    def readout_index(self) -> int:
        """Index of the output layer: the last Dense layer."""
        return max(i for i, layer in enumerate(self.layers) if isinstance(layer, Dense))

    @property
    def readout(self) -> Dense:
        return self.layers[self.readout_index]

    def readout_problem(self) -> str | None:
        """Why the output layer cannot be refit in closed form, or None if it can."""
        last = self.readout
        if last.activation != "linear":
            return f"the output layer has activation {last.activation!r}; a closed-form refit needs a linear output"
        after = [layer for layer in self.layers[self.readout_index + 1:] if not isinstance(layer, LastStep)]
        if after:
            return f"{describe(after[0])} follows the output layer"
        return None

    def unit_layers(self) -> list[int]:
        """Indices of the layers with hidden units of their own, the output layer excluded."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, UNIT_LAYERS) and i != self.readout_index]

    @property
    def framework(self) -> str | None:
        """"keras" or "torch" for networks built from a model, None for hand-built ones."""
        return self._source.framework if self._source else None

    def describe(self) -> str:
        """The layers in one line, e.g. ``LSTM(32) -> Dense(1)``."""
        return " -> ".join(describe(layer) for layer in self.layers)

    # -- evaluation ----------------------------------------------------------------------

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Every layer's output for inputs ``x`` (batch, timesteps, features)."""
        cur = np.asarray(x, dtype=np.float64)
        if cur.ndim != 3:
            raise ValueError(f"inputs must be (batch, timesteps, features), got shape {cur.shape}")
        outs = []
        for layer in self.layers:
            cur = layer.run(cur)
            outs.append(cur)
        return outs

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The model's output for ``x``, one row per sample (a sequence output is flattened: (batch, T*out))."""
        out = self.outputs(x)[-1]
        return out.reshape(len(out), -1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def features(self, x: np.ndarray) -> np.ndarray:
        """The input of the output layer (batch, d), or (batch, T, d) for a head on every time step."""
        k = self.readout_index
        return np.asarray(x, dtype=np.float64) if k == 0 else self.outputs(x)[k - 1]

    def hidden_states(self, x: np.ndarray) -> dict[int, np.ndarray]:
        """Per unit layer (see :meth:`unit_layers`): its activations, a whole sequence for recurrent layers."""
        cur = np.asarray(x, dtype=np.float64)
        wanted = set(self.unit_layers())
        states = {}
        for i, layer in enumerate(self.layers):
            if i in wanted and isinstance(layer, SEQUENCE_LAYERS):
                states[i] = layer.sequence(cur)
            out = layer.run(cur)
            if i in wanted and not isinstance(layer, SEQUENCE_LAYERS):
                states[i] = out
            cur = out
        return states

    def layer_inputs(self, x: np.ndarray) -> list[np.ndarray]:
        """The input of every layer."""
        outs = self.outputs(x)
        return [np.asarray(x, dtype=np.float64), *outs[:-1]]

    # -- editing and writing back --------------------------------------------------------

    def replace(self, index: int, layer: Layer) -> Network:
        """A copy with layer ``index`` replaced by ``layer`` (same source tensors)."""
        layers = list(self.layers)
        layers[index] = layer
        return Network(layers, self._source)

    def copy(self) -> Network:
        """A deep copy (arrays included)."""
        return Network([copy_layer(layer) for layer in self.layers], self._source)

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The source model's tensors (same names, order, shapes, dtypes) holding these weights."""
        if self._source is None:
            raise ValueError(
                "this Network was built by hand, not from a model; it has no tensor names to write back to "
                "(build it with open_model or load_network)"
            )
        out = {}
        for e in self._source.entries:
            if e.const is not None:
                out[e.name] = e.const.copy()
                continue
            if e.layer >= len(self.layers):
                raise ModelFormatError(f"tensor {e.name!r} belongs to layer {e.layer}, which is gone")
            value = _get(self.layers[e.layer], e.role)
            if value is None:
                raise ModelFormatError(f"layer {e.layer} has no value for tensor {e.name!r} ({e.role}); the model "
                                       "file needs it")
            if value.size != int(np.prod(e.shape, dtype=np.int64)):
                raise ModelFormatError(f"tensor {e.name!r} would get shape {value.shape} from layer {e.layer}, but "
                                       f"the model file has shape {e.shape}")
            value = value.reshape(e.shape)
            cast = np.array(value, dtype=e.dtype, order="C")
            if e.dtype.kind == "f" and not np.array_equal(np.isfinite(cast), np.isfinite(value)):
                raise ModelFormatError(f"tensor {e.name!r}: values overflow its dtype {e.dtype}")
            out[e.name] = cast
        return out

    def with_tensors(self, tensors: Mapping[str, np.ndarray]) -> Network:
        """A copy holding the values of ``tensors`` (the inverse of :meth:`to_tensors`).

        ``tensors`` must have exactly the source tensors' names and shapes (any numeric dtype,
        e.g. an average or a retrained model's weights); the layers' kinds and options are kept.
        Tensors the view does not model (counters) are kept as given.
        """
        if self._source is None:
            raise ValueError("this Network was built by hand; it has no tensor names to read")
        entries = {e.name: e for e in self._source.entries}
        missing = [n for n in entries if n not in tensors]
        extra = [n for n in tensors if n not in entries]
        if missing or extra:
            which = f"tensor {missing[0]!r} is missing" if missing else f"tensor {extra[0]!r} is unknown"
            raise ModelFormatError(f"{which}; the tensors must have this network's names ({len(entries)} tensors)")
        layers = list(self.layers)
        consts = []
        for name, e in entries.items():
            arr = np.asarray(tensors[name])
            if arr.shape != e.shape:
                raise ModelFormatError(f"tensor {name!r} has shape {arr.shape}, expected {e.shape}")
            if e.const is not None:
                consts.append(dataclasses.replace(e, const=np.array(arr, dtype=e.dtype)))
                continue
            consts.append(e)
            layers[e.layer] = _set(layers[e.layer], e.role, np.array(arr, dtype=np.float64))
        return Network([copy_layer(layer) if layer is self.layers[i] else layer for i, layer in enumerate(layers)],
                       _Source(self._source.framework, tuple(consts)))


# --- reading and writing layer fields by role ---------------------------------------------------


def _get(layer: Any, role: str) -> np.ndarray | None:
    head, dot, rest = role.partition(".")
    if dot and head in ("forward", "backward"):
        return _get(getattr(layer, head), rest)
    if role == "bias_pair":
        return None if layer.recurrent_bias is None else np.stack([layer.bias, layer.recurrent_bias])
    transpose = role.startswith("T:")
    value = getattr(layer, role[2:] if transpose else role)
    if value is None:
        return None
    return value.T if transpose else value


def _set(layer: Any, role: str, value: np.ndarray) -> Any:
    head, dot, rest = role.partition(".")
    if dot and head in ("forward", "backward"):
        return dataclasses.replace(layer, **{head: _set(getattr(layer, head), rest, value)})
    if role == "bias_pair":
        value = value.reshape(2, -1)
        return dataclasses.replace(layer, bias=value[0], recurrent_bias=value[1])
    transpose = role.startswith("T:")
    name = role[2:] if transpose else role
    current = getattr(layer, name)
    value = value.T if transpose else value
    if current is not None:
        value = value.reshape(current.shape)
    return dataclasses.replace(layer, **{name: value})


def _check_chain(layers: list[Layer]) -> None:
    """Raise ModelFormatError unless ``layers`` is a chain the merge methods understand."""
    if not any(isinstance(layer, Dense) for layer in layers):
        raise ModelFormatError(f"the network must end with a Dense output layer; supported are {SUPPORTED_LAYOUTS}")
    last_unit = max(i for i, layer in enumerate(layers) if isinstance(layer, UNIT_LAYERS))
    if not isinstance(layers[last_unit], Dense):
        raise ModelFormatError(f"the network must end with a Dense output layer, not {describe(layers[last_unit])}; "
                               f"supported are {SUPPORTED_LAYOUTS}")
    sequence = True  # inputs are (batch, timesteps, features)
    for i, layer in enumerate(layers):
        if isinstance(layer, (*SEQUENCE_LAYERS, LastStep)) and not sequence:
            raise ModelFormatError(f"layer {i} ({describe(layer)}) needs a sequence but layer {i - 1} gives one "
                                   "vector per sample (return_sequences=False before it?)")
        if isinstance(layer, SEQUENCE_LAYERS):
            sequence = layer.returns_sequence
        elif isinstance(layer, LastStep):
            sequence = False
        if i and layer.input_dim != layers[i - 1].output_dim:
            raise ModelFormatError(f"layer {i} takes {layer.input_dim} inputs but layer {i - 1} gives "
                                   f"{layers[i - 1].output_dim}")


# --- the model as its framework runs it -------------------------------------------------------

#: How many of a site's windows the framework checks run on (an evenly spaced sample).
CHECK_SAMPLES = 256


class ForwardMismatchError(ModelFormatError):
    """secagg's numpy forward pass of a model differs from the framework's own."""


@dataclass
class SiteModel:
    """A site's model: the numpy view the merge methods work on, and the framework model that judges it."""

    network: Network
    framework: Any  # secagg.models.framework.FrameworkModel
    path: pathlib.Path

    def check(self, net: Network, x: np.ndarray, what: str = "the merged model") -> float:
        """Compare ``net``'s numpy forward pass with the framework's on ``x``; returns the largest difference.

        Raises :class:`ForwardMismatchError` (nothing is scored or released) when they differ by
        more than float32 rounding explains.
        """
        x = _spaced(np.asarray(x), CHECK_SAMPLES)
        want = self.framework.set_tensors(net.to_tensors()).predict(x).reshape(len(x), -1)
        got = net.forward(x)
        if got.shape != want.shape:
            raise ForwardMismatchError(
                f"{what}: secagg's forward pass gives outputs of shape {got.shape[1:]} but "
                f"{_framework_name(self)} gives {want.shape[1:]} ({self.path}); nothing was scored or released")
        finite = np.isfinite(want)
        if not np.array_equal(finite, np.isfinite(got)):
            raise ForwardMismatchError(
                f"{what}: {_framework_name(self)} and secagg's forward pass disagree on which outputs are finite "
                f"({self.path}); nothing was scored or released")
        diff = float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))
        scale = max(1.0, float(np.max(np.abs(want[finite]), initial=0.0)))
        if not diff <= 1e-4 * scale:
            raise ForwardMismatchError(
                f"{what}: secagg's numpy forward pass differs from {_framework_name(self)}'s own by up to {diff:.3g} "
                f"on this site's data (tolerance {1e-4 * scale:.2g}): either secagg does not model this architecture "
                f"({self.network.describe()}) correctly, or these weights make the network numerically unstable "
                "(float32 and float64 arithmetic diverge, as after heavy DP noise on the weights). Nothing was scored "
                "or released. Supported layouts: "
                f"{SUPPORTED_LAYOUTS}; for PyTorch give the exact nn.Module (--torch-model)")
        return diff


def _framework_name(site: SiteModel) -> str:
    return "Keras" if site.framework.framework == "keras" else "PyTorch"


def _spaced(x: np.ndarray, k: int) -> np.ndarray:
    if len(x) <= k:
        return x
    return x[np.unique(np.linspace(0, len(x) - 1, k).astype(int))]


def open_model(path: str | os.PathLike, torch_module: Any = None, torch_kwargs: Any = None,
               x: np.ndarray | None = None) -> SiteModel:
    """Read the model file at ``path`` (.keras/.h5, or .pt/.pth with its ``torch_module``) as a :class:`SiteModel`.

    The numpy view is checked against the framework on ``x`` (the site's inputs; random inputs
    of the model's shape if None) and refused with :class:`ForwardMismatchError` if they differ.
    """
    from secagg.models.framework import FrameworkModel

    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".keras", ".h5", ".pt", ".pth"):
        raise ModelFormatError(
            f"{path}: cannot read a network from a {path.suffix or 'suffix-less'} file; merging needs the "
            "architecture, so give a Keras .keras/.h5 or a PyTorch .pt/.pth file (with its --torch-model)")
    fm = FrameworkModel.load(path, torch_module, torch_kwargs)
    original = fm.tensors()
    if fm.framework == "keras":
        from secagg.merge.keras_view import keras_network

        net, input_shape = keras_network(fm, path)
    else:
        from secagg.merge.torch_view import torch_network

        net, input_shape = torch_network(fm, path, x)
    if x is None:
        shape = [8] + [4 if d is None else int(d) for d in input_shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    site = SiteModel(net, fm, path)
    site.check(net, x, what=f"{path.name} as read")
    fm.set_tensors(original)
    return site


def load_network(path: str | os.PathLike, torch_module: Any = None, torch_kwargs: Any = None,
                 x: np.ndarray | None = None) -> Network:
    """The checked numpy view of the model at ``path`` (see :func:`open_model`)."""
    return open_model(path, torch_module, torch_kwargs, x).network


def source_entries(framework: str, tensors: Mapping[str, np.ndarray], roles: Mapping[str, tuple[int, str]]) -> _Source:
    """A network source from the file's tensors and (layer index, role) per tensor name; others are constants."""
    entries = []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if name in roles:
            index, role = roles[name]
            entries.append(_Entry(name, arr.shape, arr.dtype, index, role))
        elif arr.dtype.kind in "biu":
            entries.append(_Entry(name, arr.shape, arr.dtype, -1, "const", arr.copy()))
        else:
            raise ModelFormatError(f"tensor {name!r} {arr.shape} belongs to no layer secagg models; supported are "
                                   f"{SUPPORTED_LAYOUTS}")
    return _Source(framework, tuple(entries))


def make_torch_regressor(input_dim: int, units: list[int], dense: list[int], kind: str = "lstm"):
    """The reference PyTorch forecaster (see :mod:`secagg.merge.torch_view`). Needs torch."""
    from secagg.merge.torch_view import make_torch_regressor as make

    return make(input_dim, units, dense, kind)


def __getattr__(name: str):
    # SequenceRegressor is created on first use so that importing this module needs no torch.
    if name == "SequenceRegressor":
        from secagg.merge.torch_view import regressor_class

        return regressor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
