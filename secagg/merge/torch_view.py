"""The numpy view of a PyTorch model, read from the user's own ``nn.Module`` with ``torch.fx``.

A state dict records neither the forward pass nor the activations, so secagg never infers them
from tensor names. The module's ``forward`` is traced symbolically and read as a chain: each
operation must consume the previous one's output. Understood operations:

* ``nn.LSTM``/``nn.GRU`` (``batch_first=True``, ``bias=True``, any ``num_layers``, bidirectional),
  followed by ``out, _ = rnn(x)`` and ``out[:, -1]`` (or ``out[:, -1, :]``), or by the final state
  ``h_n[-1]`` of a unidirectional one (``_, (h_n, c_n) = lstm(x)``; ``_, h_n = gru(x)``);
* ``nn.Linear``, ``nn.BatchNorm1d`` (on (batch, features)), ``nn.Dropout``, ``nn.Identity``;
* element-wise activations as modules (``nn.ReLU``, ``nn.Tanh``, ``nn.GELU``...) or functions
  (``torch.tanh``, ``F.relu``...), and ``squeeze``/``flatten``/``view``/``reshape`` of the output.

Anything else is refused with the operation's name; whatever is accepted is then checked against
the module's own forward pass on the site's data (:func:`secagg.merge.network.open_model`).
"""

from __future__ import annotations

import functools
import operator
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from secagg.errors import ModelFormatError
from secagg.merge.layers import Activation, BatchNorm, Bidirectional, Dense, LastStep, Recurrent
from secagg.merge.network import Network, source_entries

_HOW = ("secagg reads PyTorch forward passes that are a chain of nn.LSTM/nn.GRU (batch_first), out[:, -1] or "
        "h_n[-1], nn.Linear, nn.BatchNorm1d, nn.Dropout and element-wise activations")


@dataclass
class _T:
    """A tensor of the chain: produced when the chain had ``pos`` layers."""

    pos: int
    sequence: bool
    dim: int | None
    shaped: bool = False  # a final reshape was applied: only the output may follow


@dataclass
class _RNNOut:
    pos: int
    dim: int
    bidirectional: bool
    lstm: bool


@dataclass
class _HState:
    pos: int
    bidirectional: bool
    lstm: bool
    tuple_of_lstm: bool  # (h_n, c_n) of an LSTM, not yet indexed


def _module_activation(torch, mod) -> str | None:
    nn = torch.nn
    simple = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.SELU: "selu",
              nn.Softsign: "softsign", nn.Mish: "mish", nn.ReLU6: "relu6", nn.Hardsigmoid: "hard_sigmoid",
              nn.Hardswish: "hard_silu", nn.LogSigmoid: "log_sigmoid", nn.CELU: "celu"}
    for cls, name in simple.items():
        if type(mod) is cls:
            if cls is nn.CELU and mod.alpha != 1.0:
                return None
            return name
    if type(mod) is nn.GELU:
        return "gelu" if mod.approximate == "none" else "gelu_tanh"
    if type(mod) is nn.ELU and mod.alpha == 1.0:
        return "elu"
    if type(mod) is nn.Softplus and mod.beta == 1.0:
        return "softplus"
    if type(mod) is nn.Hardtanh and (mod.min_val, mod.max_val) == (-1.0, 1.0):
        return "hard_tanh"
    if type(mod) is nn.LeakyReLU and mod.negative_slope in (0.2, 0.01):
        return "leaky_relu" if mod.negative_slope == 0.2 else "leaky_relu_torch"
    if type(mod) is nn.Softmax and mod.dim in (-1, 1):
        return "softmax"
    return None


def _function_activation(torch, fn, kwargs: dict) -> str | None:
    F = torch.nn.functional
    table = {torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
             F.sigmoid: "sigmoid", F.silu: "silu", F.selu: "selu", torch.selu: "selu", F.mish: "mish",
             F.relu6: "relu6", F.hardsigmoid: "hard_sigmoid", F.hardswish: "hard_silu", F.logsigmoid: "log_sigmoid",
             F.softsign: "softsign"}
    if fn in table:
        return table[fn]
    if fn is F.gelu:
        return "gelu" if kwargs.get("approximate", "none") == "none" else "gelu_tanh"
    if fn is F.elu and kwargs.get("alpha", 1.0) == 1.0:
        return "elu"
    if fn is F.softplus and kwargs.get("beta", 1.0) == 1.0:
        return "softplus"
    if fn is F.leaky_relu and kwargs.get("negative_slope", 0.01) in (0.2, 0.01):
        return "leaky_relu" if kwargs.get("negative_slope", 0.01) == 0.2 else "leaky_relu_torch"
    return None


_METHOD_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_SHAPE_METHODS = {"squeeze", "flatten", "view", "reshape", "unsqueeze"}



def torch_network(fm, path: pathlib.Path, x: np.ndarray | None = None) -> tuple[Network, tuple]:
    """(Network, input shape without the batch axis) of a loaded PyTorch model (a FrameworkModel)."""
    import torch
    import torch.fx

    module = fm.model
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as e:
        raise ModelFormatError(f"{path}: torch.fx cannot trace the module's forward pass ({type(e).__name__}: {e}); "
                               f"{_HOW}") from e
    reader = _Reader(torch, module, path, list(fm._named))
    for node in graph.nodes:
        reader.visit(node)
    try:
        net = Network(reader.layers, source_entries("torch", fm.tensors(), reader.roles))
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}") from None
    return net, (None, reader.input_dim)


class _Reader:
    def __init__(self, torch, module, path: pathlib.Path, file_names: list[str]) -> None:
        self.torch = torch
        self.modules = dict(module.named_modules())
        self.path = path
        module_names = list(module.state_dict())
        self.file_of = dict(zip(module_names, file_names))
        self.layers: list = []
        self.roles: dict[str, tuple[int, str]] = {}
        self.values: dict[Any, Any] = {}
        self.input_dim: int | None = None
        self.done = False

    # -- helpers --------------------------------------------------------------------------

    def refuse(self, node, why: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {why} (at {node.format_node() or node.name}); {_HOW}")

    def chain(self, node, value: Any) -> _T:
        """``value`` as the chain's current tensor, refusing anything else."""
        if not isinstance(value, _T):
            raise self.refuse(node, "this operation takes something other than a tensor of the chain")
        if value.pos != len(self.layers):
            raise self.refuse(node, "the forward pass is not a chain (a value is used twice, or skips a layer)")
        if value.shaped:
            raise self.refuse(node, "only the model's output may be reshaped")
        return value

    def claim(self, module_prefix: str, param: str, role: str, index: int | None = None) -> None:
        key = f"{module_prefix}.{param}" if module_prefix else param
        self.roles[self.file_of[key]] = (len(self.layers) if index is None else index, role)

    def append(self, op, sequence: bool) -> _T:
        self.layers.append(op)
        return _T(len(self.layers), sequence, op.output_dim)

    def activate(self, node, t: _T, name: str) -> _T:
        if self.layers and isinstance(self.layers[-1], Dense) and self.layers[-1].activation == "linear":
            self.layers[-1].activation = name
            return _T(len(self.layers), t.sequence, t.dim)
        if t.dim is None:
            raise self.refuse(node, "an activation on the model's input is not supported")
        return self.append(Activation(name, t.dim), t.sequence)

    # -- graph nodes ----------------------------------------------------------------------

    def visit(self, node) -> None:
        torch = self.torch
        if node.op not in ("output", "placeholder") and not node.users:
            return  # dead code, e.g. the unused c_n of `_, (h_n, c_n) = lstm(x)`
        args = [self.values.get(a) if isinstance(a, torch.fx.Node) else a for a in node.args]
        if self.done and node.op != "output":
            raise self.refuse(node, "operations after the model's output")
        if node.op == "placeholder":
            if self.values:
                raise self.refuse(node, "the model takes more than one input")
            self.values[node] = _T(0, True, None)
        elif node.op == "get_attr":
            raise self.refuse(node, "the forward pass reads a parameter directly")
        elif node.op == "call_module":
            self.values[node] = self.call_module(node, self.modules[node.target], args)
        elif node.op == "call_function":
            self.values[node] = self.call_function(node, node.target, args, dict(node.kwargs))
        elif node.op == "call_method":
            self.values[node] = self.call_method(node, node.target, args)
        elif node.op == "output":
            out = args[0]
            if not isinstance(out, _T) or out.pos != len(self.layers):
                raise self.refuse(node, "the model must return the chain's last tensor (one output)")

    def call_module(self, node, mod, args) -> Any:
        nn = self.torch.nn
        target = node.target
        if isinstance(mod, (nn.LSTM, nn.GRU)):
            return self.rnn(node, target, mod, args)
        if isinstance(mod, (nn.Dropout, nn.Identity, nn.AlphaDropout)):
            return args[0]
        t = self.chain(node, args[0])
        if isinstance(mod, nn.Linear):
            if t.dim is None:
                self.input_dim = mod.in_features
            self.claim(target, "weight", "T:kernel")
            bias = None
            if mod.bias is not None:
                self.claim(target, "bias", "bias")
                bias = mod.bias.detach().cpu().numpy()
            return self.append(Dense(mod.weight.detach().cpu().numpy().T, bias), t.sequence)
        if isinstance(mod, nn.BatchNorm1d):
            if t.sequence:
                raise self.refuse(node, "nn.BatchNorm1d on a sequence normalizes dim 1 (time); apply it to "
                                  "(batch, features) vectors")
            if not mod.track_running_stats:
                raise self.refuse(node, "nn.BatchNorm1d without running statistics")
            for param, role in (("running_mean", "mean"), ("running_var", "var")):
                self.claim(target, param, role)
            gamma = beta = None
            if mod.affine:
                self.claim(target, "weight", "gamma")
                self.claim(target, "bias", "beta")
                gamma, beta = mod.weight.detach().cpu().numpy(), mod.bias.detach().cpu().numpy()
            return self.append(BatchNorm(mod.running_mean.cpu().numpy(), mod.running_var.cpu().numpy(), gamma, beta,
                                         float(mod.eps)), t.sequence)
        name = _module_activation(self.torch, mod)
        if name is not None:
            return self.activate(node, t, name)
        raise self.refuse(node, f"module {target!r} ({type(mod).__name__}) is not supported")

    def rnn(self, node, target: str, mod, args) -> _RNNOut:
        if len(args) > 1 and args[1] is not None:
            raise self.refuse(node, "an initial state passed to the RNN is not supported")
        t = self.chain(node, args[0])
        if not t.sequence:
            raise self.refuse(node, "the RNN's input is not a sequence")
        kind = "lstm" if isinstance(mod, self.torch.nn.LSTM) else "gru"
        if not mod.batch_first:
            raise self.refuse(node, f"nn.{kind.upper()} {target!r} has batch_first=False; build it with "
                              "batch_first=True (inputs (batch, timesteps, features))")
        if not mod.bias:
            raise self.refuse(node, f"nn.{kind.upper()} {target!r} has bias=False")
        if getattr(mod, "proj_size", 0):
            raise self.refuse(node, f"nn.LSTM {target!r} has proj_size, which is not supported")
        if t.dim is None:
            self.input_dim = mod.input_size
        state = dict(mod.named_parameters())

        def direction(k: int, suffix: str, prefix: str, index: int) -> Recurrent:
            for param, role in (("weight_ih", "T:kernel"), ("weight_hh", "T:recurrent_kernel"), ("bias_ih", "bias"),
                                ("bias_hh", "recurrent_bias")):
                self.claim(target, f"{param}_l{k}{suffix}", prefix + role, index)
            get = lambda p: state[f"{p}_l{k}{suffix}"].detach().cpu().numpy()  # noqa: E731
            return Recurrent(kind, "ifco" if kind == "lstm" else "rzn", get("weight_ih").T, get("weight_hh").T,
                             get("bias_ih"), get("bias_hh"), return_sequences=True)

        for k in range(mod.num_layers):
            index = len(self.layers)
            if mod.bidirectional:
                op = Bidirectional(direction(k, "", "forward.", index), direction(k, "_reverse", "backward.", index),
                                   "concat", True)
            else:
                op = direction(k, "", "", index)
            self.layers.append(op)
        return _RNNOut(len(self.layers), self.layers[-1].output_dim, mod.bidirectional, kind == "lstm")

    def last_step(self, node, t: _T) -> _T:
        self.chain(node, t)
        if not t.sequence:
            raise self.refuse(node, "[:, -1] of something that is not a sequence")
        last = self.layers[-1] if self.layers else None
        if isinstance(last, Recurrent) and last.return_sequences:
            last.return_sequences = False  # the same thing, and what Keras writes as return_sequences=False
            return _T(len(self.layers), False, t.dim)
        return self.append(LastStep(t.dim), False)

    def call_function(self, node, fn, args, kwargs) -> Any:
        torch = self.torch
        if fn is operator.getitem:
            return self.getitem(node, args[0], args[1])
        if fn is torch.nn.functional.dropout:
            return args[0]
        name = _function_activation(torch, fn, kwargs)
        if name is not None:
            return self.activate(node, self.chain(node, args[0]), name)
        if fn in (torch.flatten, torch.squeeze, torch.reshape, torch.unsqueeze):
            t = self.chain(node, args[0])
            return _T(t.pos, t.sequence, t.dim, shaped=True)
        raise self.refuse(node, f"function {getattr(fn, '__name__', fn)} is not supported")

    def call_method(self, node, method: str, args) -> Any:
        if method == "contiguous":
            return args[0]
        if method in _METHOD_ACTIVATIONS:
            return self.activate(node, self.chain(node, args[0]), _METHOD_ACTIVATIONS[method])
        if method in _SHAPE_METHODS:
            t = self.chain(node, args[0])
            return _T(t.pos, t.sequence, t.dim, shaped=True)
        raise self.refuse(node, f"method .{method}() is not supported")

    def getitem(self, node, value: Any, index: Any) -> Any:
        if isinstance(value, _RNNOut):
            if index == 0:
                return _T(value.pos, True, value.dim)
            if index == 1:
                return _HState(value.pos, value.bidirectional, value.lstm, value.lstm)
        elif isinstance(value, _HState):
            if value.tuple_of_lstm and index == 0:
                return _HState(value.pos, value.bidirectional, value.lstm, False)
            if not value.tuple_of_lstm and index == -1:
                if value.bidirectional:
                    raise self.refuse(node, "h_n[-1] of a bidirectional RNN is its backward direction only; use "
                                      "out[:, -1] of the output sequence")
                if value.pos != len(self.layers):
                    raise self.refuse(node, "the forward pass is not a chain")
                return self.last_step(node, _T(value.pos, True, self.layers[-1].output_dim))
        elif isinstance(value, _T):
            if _is_last_step(index):
                return self.last_step(node, value)
        raise self.refuse(node, f"indexing with {index!r} is not supported")


def _is_last_step(index: Any) -> bool:
    if not isinstance(index, tuple) or len(index) not in (2, 3):
        return False
    whole = slice(None, None, None)
    return index[0] == whole and index[1] == -1 and (len(index) == 2 or index[2] == whole or index[2] is Ellipsis)


# --- the reference PyTorch forecaster ----------------------------------------------------------------


def make_torch_regressor(input_dim: int, units: list[int], dense: list[int], kind: str = "lstm"):
    """A :class:`SequenceRegressor`: ``nn.LSTM``/``nn.GRU`` (batch_first) -> last step -> Linear layers.

    ``units``: hidden size per recurrent layer (all equal: one module with ``num_layers=len(units)``);
    ``dense``: output size per Linear layer, the last one being the model's output; ReLU between
    them. State-dict names: ``rnn.weight_ih_l{k}`` ..., then ``head.{j}.weight``, ``head.{j}.bias``.
    Merging it needs the module too: ``--torch-model secagg.merge.torch_view:make_torch_regressor``
    with ``--torch-kwargs '{"input_dim": 1, "units": [32], "dense": [1]}'``.
    """
    return regressor_class()(input_dim, units, dense, kind)


@functools.cache
def regressor_class():
    try:
        import torch
    except ImportError as e:
        raise ImportError("SequenceRegressor needs PyTorch: pip install 'secagg[torch]'") from e

    class SequenceRegressor(torch.nn.Module):
        """``rnn`` (nn.LSTM/nn.GRU, batch_first) -> last step -> ``head`` Linear layers, ReLU between."""

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
            self.head = torch.nn.ModuleList(torch.nn.Linear(sizes[j], sizes[j + 1]) for j in range(len(dense)))

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
    if name == "SequenceRegressor":
        return regressor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
