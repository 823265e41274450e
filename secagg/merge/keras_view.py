"""The numpy view of a Keras model, built from the loaded layer objects (kinds, options, activations).

Tensor names are those :func:`secagg.models.read_model` gives the same file. Layers are read in
the model's layer order, nested Sequential/functional models flattened; the result is checked
against Keras's own forward pass by :func:`secagg.merge.network.open_model`, so a functional model
that is not a plain chain (branches, shared layers) is refused there.
"""

from __future__ import annotations

import pathlib
from typing import Any

from secagg.errors import ModelFormatError
from secagg.merge.layers import (
    ACTIVATIONS,
    Activation,
    BatchNorm,
    Bidirectional,
    Dense,
    Normalization,
    Recurrent,
)
from secagg.merge.network import SUPPORTED_LAYOUTS, Network, source_entries
from secagg.models.framework import flat_keras_layers

#: Layers that do nothing at inference.
_IDENTITY = ("InputLayer", "Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
             "ActivityRegularization")


def keras_network(fm, path: pathlib.Path) -> tuple[Network, tuple]:
    """(Network, input shape without the batch axis) of a loaded Keras model (a FrameworkModel)."""
    import keras

    model = fm.model
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelFormatError(f"{path}: the model must have one input and one output; supported are "
                               f"{SUPPORTED_LAYOUTS}")
    input_shape = tuple(model.inputs[0].shape[1:])
    if len(input_shape) != 2:
        raise ModelFormatError(f"{path}: the model input must be (timesteps, features) windows, not {input_shape}")
    name_of = {id(v): n for n, v in fm._named.items()}
    builder = _Builder(path, name_of, int(input_shape[-1]))
    for layer in flat_keras_layers(keras, model):
        builder.add(layer)
    try:
        net = Network(builder.layers, source_entries("keras", fm.tensors(), builder.roles))
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}") from None
    return net, input_shape


class _Builder:
    def __init__(self, path: pathlib.Path, name_of: dict[int, str], input_dim: int) -> None:
        self.path = path
        self.name_of = name_of
        self.layers: list = []
        self.roles: dict[str, tuple[int, str]] = {}
        self.dim = input_dim

    def claim(self, variable, role: str, index: int | None = None) -> None:
        name = self.name_of.get(id(variable))
        if name is None:
            raise ModelFormatError(f"{self.path}: variable {variable.path} is not one of the model's weights")
        self.roles[name] = (len(self.layers) if index is None else index, role)

    def refuse(self, layer, why: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: layer {layer.name!r} ({type(layer).__name__}) {why}; supported are "
                                f"{SUPPORTED_LAYOUTS}")

    def push(self, op) -> None:
        self.layers.append(op)
        self.dim = op.output_dim

    def add(self, layer) -> None:
        cls = type(layer).__name__
        if cls in _IDENTITY:
            return
        if cls in ("LSTM", "GRU"):
            self.push(self.recurrent(layer, prefix=""))
        elif cls == "Bidirectional":
            inner = (layer.forward_layer, layer.backward_layer)
            if any(type(r).__name__ not in ("LSTM", "GRU") for r in inner):
                raise self.refuse(layer, f"wraps {type(inner[0]).__name__}, not an LSTM or GRU")
            fwd = self.recurrent(inner[0], "forward.", backward_ok=False)
            bwd = self.recurrent(inner[1], "backward.", backward_ok=True)
            mode = layer.merge_mode
            if mode not in ("concat", "sum", "ave", "mul"):
                raise self.refuse(layer, f"has merge_mode={mode!r} (concat, sum, ave, mul are supported)")
            self.push(Bidirectional(fwd, bwd, mode, bool(inner[0].return_sequences)))
        elif cls == "Dense":
            self.push(self.dense(layer))
        elif cls == "TimeDistributed":
            if type(layer.layer).__name__ != "Dense":
                raise self.refuse(layer, f"wraps {type(layer.layer).__name__}; only TimeDistributed(Dense) is")
            self.push(self.dense(layer.layer))
        elif cls == "BatchNormalization":
            self.push(self.batchnorm(layer))
        elif cls == "Normalization":
            self.push(self.normalization(layer))
        elif cls == "Activation":
            self.push(Activation(_activation(self, layer, layer.get_config().get("activation")), self.dim))
        else:
            raise self.refuse(layer, "is not supported for merging")

    def recurrent(self, layer, prefix: str, backward_ok: bool = False) -> Recurrent:
        cfg = layer.get_config()
        for option in ("stateful", "return_state"):
            if cfg.get(option):
                raise self.refuse(layer, f"has {option}=True, which is not supported")
        if cfg.get("go_backwards") and not backward_ok:
            raise self.refuse(layer, "has go_backwards=True outside a Bidirectional layer, which is not supported")
        if cfg.get("use_bias") is False:
            raise self.refuse(layer, "has no bias (use_bias=False), which is not supported for recurrent layers")
        cell = layer.cell
        kind = type(layer).__name__.lower()
        variables = [cell.kernel, cell.recurrent_kernel, cell.bias]
        if len(layer.weights) != 3 or any(id(v) not in self.name_of for v in variables):
            raise self.refuse(layer, f"has weights {[v.path for v in layer.weights]}; only plain kernel, "
                              "recurrent_kernel and bias are supported")
        index = len(self.layers)
        self.claim(cell.kernel, prefix + "kernel", index)
        self.claim(cell.recurrent_kernel, prefix + "recurrent_kernel", index)
        import keras

        bias = keras.ops.convert_to_numpy(cell.bias)
        reset_after = bool(cfg.get("reset_after", True)) if kind == "gru" else True
        recurrent_bias = None
        if kind == "gru" and reset_after:
            bias, recurrent_bias = bias[0], bias[1]
            self.claim(cell.bias, prefix + "bias_pair", index)
        else:
            self.claim(cell.bias, prefix + "bias", index)
        return Recurrent(
            kind=kind,
            gate_order="ifco" if kind == "lstm" else "zrh",
            kernel=keras.ops.convert_to_numpy(cell.kernel),
            recurrent_kernel=keras.ops.convert_to_numpy(cell.recurrent_kernel),
            bias=bias,
            recurrent_bias=recurrent_bias,
            return_sequences=bool(cfg.get("return_sequences", False)),
            activation=_activation(self, layer, cfg.get("activation", "tanh")),
            recurrent_activation=_activation(self, layer, cfg.get("recurrent_activation", "sigmoid")),
            reset_after=reset_after,
        )

    def dense(self, layer) -> Dense:
        import keras

        cfg = layer.get_config()
        if cfg.get("lora_rank"):
            raise self.refuse(layer, "uses LoRA, which is not supported")
        kernel = layer._kernel if hasattr(layer, "_kernel") else layer.kernel
        wanted = [kernel] + ([layer.bias] if layer.use_bias else [])
        if len(layer.weights) != len(wanted):
            raise self.refuse(layer, f"has weights {[v.path for v in layer.weights]} (quantized?)")
        self.claim(kernel, "kernel")
        if layer.use_bias:
            self.claim(layer.bias, "bias")
        return Dense(keras.ops.convert_to_numpy(kernel),
                     keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None,
                     _activation(self, layer, cfg.get("activation", "linear")))

    def batchnorm(self, layer) -> BatchNorm:
        import keras

        axis = layer.axis if isinstance(layer.axis, int) else -99
        if axis not in (-1, 2):
            raise self.refuse(layer, f"normalizes axis {layer.axis}; only the feature (last) axis is supported")
        values = {}
        for role, variable in (("mean", layer.moving_mean), ("var", layer.moving_variance),
                               ("gamma", layer.gamma if layer.scale else None),
                               ("beta", layer.beta if layer.center else None)):
            if variable is not None:
                self.claim(variable, role)
                values[role] = keras.ops.convert_to_numpy(variable)
            else:
                values[role] = None
        return BatchNorm(values["mean"], values["var"], values["gamma"], values["beta"], float(layer.epsilon))

    def normalization(self, layer) -> Normalization:
        import keras

        cfg = layer.get_config()
        if cfg.get("invert"):
            raise self.refuse(layer, "has invert=True, which is not supported")
        axis = cfg.get("axis")
        if axis not in (-1, (-1,), [-1], 2, (2,), [2]):
            raise self.refuse(layer, f"normalizes axis {axis}; only the feature (last) axis is supported")
        mean = keras.ops.convert_to_numpy(layer.mean)
        var = keras.ops.convert_to_numpy(layer.variance)
        for v in layer.weights:
            if "mean" in v.path.rsplit("/", 1)[-1]:
                self.claim(v, "mean")
            elif "variance" in v.path.rsplit("/", 1)[-1]:
                self.claim(v, "var")
        return Normalization(mean, var, float(keras.backend.epsilon()))


def _activation(builder: _Builder, layer, value: Any) -> str:
    if value is None:
        return "linear"
    if isinstance(value, dict):  # a serialized function object
        value = value.get("config", value.get("class_name"))
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise builder.refuse(layer, f"uses activation {value!r} (supported: {', '.join(ACTIVATIONS)})")
    return value
