"""secagg.merge.network: the numpy view of real Keras and PyTorch models, checked against the frameworks.

The models are small, built once per session with random (non-zero) weights, biases and
normalization statistics, saved as real model files, and shared with test_align.py through
:func:`saved_models`. Every PyTorch model carries the ``nn.Module`` factory it was saved from:
secagg reads a PyTorch forward pass from the user's module, never from the state dict alone.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from secagg.errors import ModelFormatError
from secagg.merge import (
    Activation,
    BatchNorm,
    Bidirectional,
    Dense,
    LastStep,
    Network,
    Normalization,
    Recurrent,
    SiteModel,
    load_network,
    make_torch_regressor,
    open_model,
)
from secagg.merge.network import ACTIVATIONS, SUPPORTED_LAYOUTS, ForwardMismatchError
from secagg.models import read_model

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[2]
TIMESTEPS, FEATURES = 6, 3
#: Names in ACTIVATIONS that only PyTorch defines (Keras has no such activation).
TORCH_ONLY_ACTIVATIONS = {"gelu_tanh", "leaky_relu_torch"}


@dataclass(frozen=True)
class Saved:
    """A model file, its framework, how to run any file of its architecture, and (PyTorch) its module factory."""

    path: Path
    framework: str
    run_file: Callable[[Path, np.ndarray], np.ndarray]
    module: Callable[[], Any] | None = None  # zero-argument nn.Module factory, for PyTorch files


def inputs(seed: int = 0, batch: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, TIMESTEPS, FEATURES)).astype(np.float32)


def rows(a: np.ndarray) -> np.ndarray:
    """One row per sample, as Network.forward gives (a head on every step is flattened)."""
    return np.asarray(a).reshape(len(a), -1)


# --- Keras --------------------------------------------------------------------------------


def _keras():
    from secagg.models.keras_files import _quiet_import_keras

    return _quiet_import_keras()


def _keras_models() -> dict:
    keras = _keras()
    L = keras.layers
    shape = (TIMESTEPS, FEATURES)
    x = keras.Input(shape)
    h = L.LSTM(4, return_sequences=True)(x)
    h = L.LSTM(5)(h)
    h = L.Dense(3, activation="relu")(h)
    functional_stack = keras.Model(x, L.Dense(1)(h))
    norm = L.Normalization()
    # Statistics far from (0, 1), so that a view ignoring them would be caught.
    norm.adapt(np.random.default_rng(5).standard_normal((64, TIMESTEPS, FEATURES)) * [1.0, 2.0, 0.5] + [0.5, -1.0, 2.0])
    return {
        "keras_lstm": keras.Sequential([keras.Input(shape), L.LSTM(5), L.Dense(2)]),
        "keras_gru": keras.Sequential([keras.Input(shape), L.GRU(5), L.Dense(1)]),
        "keras_gru_v1": keras.Sequential([keras.Input(shape), L.GRU(4, reset_after=False), L.Dense(1)]),
        "keras_stack": functional_stack,  # LSTM(seq) -> LSTM -> Dense(relu) -> Dense
        "keras_gru_stack": keras.Sequential(
            [keras.Input(shape), L.GRU(4, return_sequences=True), L.Dropout(0.2), L.GRU(3),
             L.Dense(4, activation="tanh"), L.Dense(1)]
        ),
        "keras_relu": keras.Sequential([keras.Input(shape), L.LSTM(5, activation="relu"), L.Dense(1)]),
        "keras_bi": keras.Sequential(
            [keras.Input(shape), L.Bidirectional(L.LSTM(4, return_sequences=True)),
             L.Bidirectional(L.GRU(3), merge_mode="sum"), L.Dense(1)]
        ),
        "keras_td": keras.Sequential(
            [keras.Input(shape), L.LSTM(4, return_sequences=True), L.TimeDistributed(L.Dense(3, activation="gelu")),
             L.TimeDistributed(L.Dense(1))]
        ),
        "keras_norm": keras.Sequential(
            [keras.Input(shape), norm, L.LSTM(4), L.BatchNormalization(), L.Activation("swish"), L.Dense(1)]
        ),
    }


def _randomize_keras(model, seed: int) -> None:
    """Random weights; BatchNormalization gets random moving statistics (positive variances); an
    adapted Normalization keeps the statistics it learnt."""
    keras = _keras()
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            if layer.beta is not None:
                layer.beta.assign(rng.standard_normal(n) * 0.5)
            layer.moving_mean.assign(rng.standard_normal(n) * 0.3)
            layer.moving_variance.assign(rng.uniform(0.2, 2.0, n))
            continue
        layer.set_weights([(rng.standard_normal(w.shape) * 0.5).astype(w.dtype) for w in layer.get_weights()])


def _run_keras_file(path: Path, x: np.ndarray) -> np.ndarray:
    keras = _keras()
    model = keras.models.load_model(path, compile=False)
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


# --- PyTorch ------------------------------------------------------------------------------

TORCH_SPECS = {  # name -> (kind, units, dense) of make_torch_regressor
    "torch_lstm": ("lstm", [8], [1]),
    "torch_lstm2": ("lstm", [6, 6], [1]),  # one nn.LSTM with num_layers=2
    "torch_gru": ("gru", [5], [1]),
    "torch_dense2": ("lstm", [5], [4, 2]),  # two Linear layers
    "torch_gru_stack": ("gru", [4, 4], [3, 1]),
}


def custom_torch_module():
    """Other names: Linear layers defined before the GRU, prefix 'encoder'; ``encoder(x)[0][:, -1]``."""
    import torch

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 3)
            self.out = torch.nn.Linear(3, 2)
            self.encoder = torch.nn.GRU(FEATURES, 4, batch_first=True)

        def forward(self, x):
            h = self.encoder(x)[0][:, -1]
            return self.out(torch.relu(self.fc1(h)))

    return Custom()


def tanh_torch_module():
    """An LSTM read through its final state ``h[-1]``, a tanh between two Linear layers, custom names."""
    import torch

    class TanhHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.LSTM(FEATURES, 5, batch_first=True)
            self.fc1 = torch.nn.Linear(5, 4)
            self.fc2 = torch.nn.Linear(4, 1)

        def forward(self, x):
            _, (h, c) = self.encoder(x)
            return self.fc2(torch.tanh(self.fc1(h[-1])))

    return TanhHead()


def bi_torch_module():
    """A two-layer bidirectional LSTM, ``out[:, -1]``, Linear -> BatchNorm1d -> GELU -> Linear."""
    import torch

    class BiNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(FEATURES, 3, num_layers=2, bidirectional=True, batch_first=True)
            self.proj = torch.nn.Linear(6, 4)
            self.norm = torch.nn.BatchNorm1d(4)
            self.act = torch.nn.GELU()
            self.out = torch.nn.Linear(4, 2)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.out(self.act(self.norm(self.proj(out[:, -1]))))

    return BiNorm()


def _regressor_factory(name: str) -> Callable[[], Any]:
    kind, units, dense = TORCH_SPECS[name]
    return functools.partial(make_torch_regressor, FEATURES, units, dense, kind)


TORCH_FACTORIES: dict[str, Callable[[], Any]] = {
    **{name: _regressor_factory(name) for name in TORCH_SPECS},
    "torch_custom": custom_torch_module,
    "torch_tanh": tanh_torch_module,
    "torch_bi": bi_torch_module,
}


def _randomize_torch(module, seed: int) -> None:
    """Random weights and biases (as the Keras models get), random running statistics (positive variances)
    and affine maps of BatchNorm1d."""
    import torch

    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                if isinstance(m, torch.nn.Linear) and name == "bias":
                    p.abs_()  # ReLU units that are alive on the test inputs: activation matching has a signal
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.8 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
                m.num_batches_tracked.fill_(7)


def run_torch_file(factory: Callable[[], Any], path: Path, x: np.ndarray) -> np.ndarray:
    """PyTorch's own output of the module from ``factory`` holding the state dict at ``path``."""
    import torch

    module = factory()
    module.load_state_dict(torch.load(path, weights_only=True))
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(np.asarray(x, np.float32))).numpy().astype(np.float64)


# --- all models, built once -------------------------------------------------------------------

KERAS_NAMES = ["keras_lstm", "keras_gru", "keras_gru_v1", "keras_stack", "keras_gru_stack", "keras_relu", "keras_bi",
               "keras_td", "keras_norm"]
TORCH_NAMES = list(TORCH_FACTORIES)
ALL_NAMES = KERAS_NAMES + TORCH_NAMES


@functools.cache
def saved_models(directory: Path) -> dict[str, Saved]:
    """Every test model saved under ``directory`` (built on the first call only)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    saved = {}
    for seed, (name, model) in enumerate(_keras_models().items()):
        _randomize_keras(model, seed)
        path = directory / f"{name}.keras"
        model.save(path)
        saved[name] = Saved(path, "keras", _run_keras_file)
        if name == "keras_stack":  # the same model as a legacy HDF5 file
            model.save(directory / "keras_stack.h5")
            saved["keras_stack_h5"] = Saved(directory / "keras_stack.h5", "keras", _run_keras_file)
    for seed, (name, factory) in enumerate(TORCH_FACTORIES.items()):
        torch.manual_seed(seed)
        module = factory()
        _randomize_torch(module, seed)
        path = directory / f"{name}.pt"
        torch.save(module.state_dict(), path)
        saved[name] = Saved(path, "torch", functools.partial(run_torch_file, factory), factory)
    return saved


@functools.cache
def cached_network(saved: Saved) -> Network:
    return load_network(saved.path, saved.module)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Saved]:
    return saved_models(tmp_path_factory.getbasetemp() / "merge-models")


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def layer_arrays(layer, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array of a layer by field name (``forward.kernel`` ... inside a Bidirectional layer)."""
    out = {}
    for name, value in vars(layer).items():
        if isinstance(value, np.ndarray):
            out[prefix + name] = value
        elif isinstance(value, Recurrent):
            out.update(layer_arrays(value, f"{prefix}{name}."))
    return out


# --- forward pass and round trip ------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES + ["keras_stack_h5"])
def test_forward_matches_framework(models, name):
    saved = models[name]
    x = inputs()
    net = cached_network(saved)
    want = saved.run_file(saved.path, x)
    got = net.forward(x)
    assert got.dtype == np.float64 and got.shape == rows(want).shape
    np.testing.assert_allclose(got, rows(want), atol=1e-5, rtol=0)
    assert net.framework == saved.framework


def test_sequence_head_output_is_flattened(models):
    """A head on every time step: the framework gives (batch, T, 1); forward gives one row per sample."""
    saved = models["keras_td"]
    x = inputs(1, batch=5)
    want = saved.run_file(saved.path, x)
    assert want.shape == (5, TIMESTEPS, 1)
    got = cached_network(saved).forward(x)
    assert got.shape == (5, TIMESTEPS)
    np.testing.assert_allclose(got, want[:, :, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL_NAMES + ["keras_stack_h5"])
def test_to_tensors_is_exact_inverse(models, name):
    saved = models[name]
    tensors = read_model(saved.path)
    net = cached_network(saved)
    assert_same_tensors(net.to_tensors(), tensors)
    again = net.with_tensors(tensors)
    assert_same_tensors(again.to_tensors(), tensors)


def test_open_model_gives_the_view_and_its_judge(models):
    for name in ("keras_norm", "torch_bi"):
        saved = models[name]
        site = open_model(saved.path, saved.module, x=inputs(2))
        assert isinstance(site, SiteModel) and site.path == saved.path
        assert site.framework.framework == saved.framework
        x = inputs(3)
        np.testing.assert_allclose(rows(site.framework.predict(x)), rows(saved.run_file(saved.path, x)), atol=1e-6)
        assert site.check(site.network, x) <= 1e-5


def test_layer_structure(models):
    def kinds(net: Network) -> list[tuple[str, Any]]:
        return [(type(l).__name__, getattr(l, "kind", None)) for l in net.layers]

    net = cached_network(models["keras_stack"])
    assert kinds(net) == [("Recurrent", "lstm"), ("Recurrent", "lstm"), ("Dense", None), ("Dense", None)]
    assert [l.return_sequences for l in net.layers[:2]] == [True, False]
    assert [l.activation for l in net.layers[2:]] == ["relu", "linear"]
    assert net.layers[0].gate_order == "ifco" and net.layers[0].recurrent_bias is None
    assert net.framework == "keras"
    assert net.unit_layers() == [0, 1, 2] and net.readout_index == 3 and net.readout_problem() is None

    gru = cached_network(models["keras_gru"]).layers[0]
    assert (gru.gate_order, gru.reset_after, gru.recurrent_bias.shape) == ("zrh", True, (15,))
    gru_v1 = cached_network(models["keras_gru_v1"]).layers[0]
    assert (gru_v1.reset_after, gru_v1.recurrent_bias) == (False, None)

    relu = cached_network(models["keras_relu"]).layers[0]
    assert (relu.activation, relu.recurrent_activation) == ("relu", "sigmoid")

    bi = cached_network(models["keras_bi"])
    assert kinds(bi) == [("Bidirectional", "lstm"), ("Bidirectional", "gru"), ("Dense", None)]
    assert [(l.merge_mode, l.return_sequences, l.units, l.output_dim) for l in bi.layers[:2]] == [
        ("concat", True, 4, 8), ("sum", False, 3, 3)]
    assert bi.layers[1].input_dim == 8 and bi.unit_layers() == [0, 1]

    td = cached_network(models["keras_td"])
    assert kinds(td) == [("Recurrent", "lstm"), ("Dense", None), ("Dense", None)]
    assert td.layers[0].return_sequences and [l.activation for l in td.layers[1:]] == ["gelu", "linear"]
    assert td.unit_layers() == [0, 1] and td.readout_index == 2

    norm = cached_network(models["keras_norm"])
    assert [type(l) for l in norm.layers] == [Normalization, Recurrent, BatchNorm, Activation, Dense]
    assert norm.layers[3].name in ("swish", "silu") and norm.unit_layers() == [1] and norm.readout_index == 4
    np.testing.assert_allclose(norm.layers[0].mean, read_model(models["keras_norm"].path)["normalization/mean"])
    assert np.all(norm.layers[2].var > 0.1) and not np.allclose(norm.layers[2].var, 1.0)

    torch_net = cached_network(models["torch_lstm2"])
    assert [type(l).__name__ for l in torch_net.layers] == ["Recurrent", "Recurrent", "Dense"]
    assert [(l.units, l.input_dim) for l in torch_net.layers[:2]] == [(6, FEATURES), (6, 6)]
    assert [l.return_sequences for l in torch_net.layers[:2]] == [True, False]  # out[:, -1] of the last layer
    assert torch_net.layers[0].gate_order == "ifco" and torch_net.framework == "torch"
    assert cached_network(models["torch_gru"]).layers[0].gate_order == "rzn"
    custom = cached_network(models["torch_custom"])
    assert [l.activation for l in custom.layers[1:]] == ["relu", "linear"]

    tanh = cached_network(models["torch_tanh"])
    assert kinds(tanh) == [("Recurrent", "lstm"), ("Dense", None), ("Dense", None)]
    assert not tanh.layers[0].return_sequences  # h[-1]: the final state
    assert [l.activation for l in tanh.layers[1:]] == ["tanh", "linear"]

    bi_torch = cached_network(models["torch_bi"])
    assert [type(l) for l in bi_torch.layers] == [Bidirectional, Bidirectional, LastStep, Dense, BatchNorm,
                                                  Activation, Dense]
    assert [(l.merge_mode, l.return_sequences, l.output_dim) for l in bi_torch.layers[:2]] == [
        ("concat", True, 6), ("concat", True, 6)]
    assert bi_torch.layers[1].input_dim == 6 and bi_torch.layers[5].name == "gelu"
    assert bi_torch.layers[0].forward.gate_order == "ifco"
    assert bi_torch.unit_layers() == [0, 1, 3] and bi_torch.readout_index == 6
    assert not np.allclose(bi_torch.layers[4].var, 1.0) and np.all(bi_torch.layers[4].var > 0.1)


def test_h5_and_keras_give_the_same_network(models):
    h5, native = (cached_network(models[n]) for n in ("keras_stack_h5", "keras_stack"))
    assert_same_tensors(h5.to_tensors(), native.to_tensors())
    assert [type(l) for l in h5.layers] == [type(l) for l in native.layers]
    activations = [[getattr(l, "activation", None) for l in n.layers] for n in (h5, native)]
    assert activations[0] == activations[1]


FEATURE_NAMES = ["keras_stack", "torch_lstm2", "torch_gru_stack", "keras_bi", "keras_td", "keras_norm", "torch_bi",
                 "torch_tanh"]


@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_features_hidden_states_and_linear_rows(models, name):
    x = inputs(2, batch=5).astype(np.float64)
    net = cached_network(models[name])
    outs = net.outputs(x)
    layer_in = net.layer_inputs(x)
    np.testing.assert_array_equal(layer_in[0], x)
    for i in range(1, len(net.layers)):
        np.testing.assert_array_equal(layer_in[i], outs[i - 1])
    # features: the input of the output layer, which maps them to the output.
    last = net.readout
    feats = net.features(x)
    np.testing.assert_array_equal(feats, layer_in[net.readout_index])
    np.testing.assert_allclose(rows(feats @ last.kernel + last.bias), net.forward(x), atol=1e-12)
    # hidden_states: per unit layer, the whole h sequence of recurrent layers and the output of Dense ones.
    states = net.hidden_states(x)
    assert sorted(states) == net.unit_layers()
    for i, h in states.items():
        layer = net.layers[i]
        if isinstance(layer, Dense):
            np.testing.assert_array_equal(h, outs[i])
            continue
        assert h.shape == (5, TIMESTEPS, layer.output_dim)
        if layer.return_sequences:
            np.testing.assert_array_equal(h, outs[i])
        elif isinstance(layer, Recurrent):
            np.testing.assert_array_equal(h[:, -1], outs[i])
        else:  # Bidirectional: the merged sequences; its output merges forward's last and backward's final state
            f, b = layer.directions(layer_in[i])
            np.testing.assert_array_equal(h, layer.merge(f, b))
            np.testing.assert_array_equal(outs[i], layer.merge(f[:, -1], b[:, 0]))
            if layer.merge_mode == "concat":
                np.testing.assert_array_equal(h[:, -1, : layer.units], outs[i][:, : layer.units])
    # linear_rows: [x_t, h_{t-1}, 1] per time step, batch-major, h_{-1} = 0 (per direction).
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Recurrent):
            directions = [(layer, layer_in[i])]
        elif isinstance(layer, Bidirectional):
            directions = [(layer.forward, layer_in[i]), (layer.backward, layer_in[i][:, ::-1])]
        else:
            continue
        for part, inp in directions:
            seq = part.sequence(inp)
            r = part.linear_rows(inp, seq).reshape(5, TIMESTEPS, -1)
            assert r.shape[2] == part.input_dim + part.units + 1
            np.testing.assert_array_equal(r[:, :, : part.input_dim], inp)
            np.testing.assert_array_equal(r[:, 0, part.input_dim:-1], 0.0)
            np.testing.assert_array_equal(r[:, 1:, part.input_dim:-1], seq[:, :-1])
            np.testing.assert_array_equal(r[:, :, -1], 1.0)


def test_lstm_gates_are_the_linear_map_of_the_rows(models):
    """The gates are the linear map of [x_t, h_{t-1}, 1], and they reproduce the h sequence (plain numpy)."""
    x = inputs(2, batch=5).astype(np.float64)
    net = cached_network(models["torch_lstm"])
    layer = net.layers[0]
    seq = net.hidden_states(x)[0]
    weights = np.vstack([layer.kernel, layer.recurrent_kernel, layer.bias + layer.recurrent_bias])
    gates = (layer.linear_rows(x, seq) @ weights).reshape(5, TIMESTEPS, -1)
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    u = layer.units
    c = np.zeros((5, u))
    for t in range(TIMESTEPS):
        a = gates[:, t]  # torch's gate order: i, f, g, o
        c = sig(a[:, u:2 * u]) * c + sig(a[:, :u]) * np.tanh(a[:, 2 * u:3 * u])
        h = sig(a[:, 3 * u:]) * np.tanh(c)
        np.testing.assert_allclose(h, seq[:, t], atol=1e-12)


def test_activations_match_keras():
    keras = _keras()
    x = np.linspace(-8, 8, 161, dtype=np.float32).reshape(7, 23)
    assert TORCH_ONLY_ACTIVATIONS < set(ACTIVATIONS)
    for name, fn in ACTIVATIONS.items():
        if name in TORCH_ONLY_ACTIVATIONS:
            continue
        want = np.asarray(keras.ops.convert_to_numpy(keras.activations.get(name)(x)), np.float64)
        np.testing.assert_allclose(fn(x.astype(np.float64)), want, atol=1e-6, err_msg=name)


def _torch_activation_functions() -> dict[str, Callable]:
    import torch

    F = torch.nn.functional
    return {
        "linear": lambda t: t, "relu": F.relu, "relu6": F.relu6, "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
        "leaky_relu_torch": F.leaky_relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "hard_sigmoid": F.hardsigmoid,
        "hard_silu": F.hardswish, "hard_swish": F.hardswish, "hard_tanh": F.hardtanh, "softplus": F.softplus,
        "softsign": F.softsign, "elu": F.elu, "selu": F.selu, "celu": F.celu, "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu, "swish": F.silu, "mish": F.mish,
        "exponential": torch.exp, "log_sigmoid": F.logsigmoid, "softmax": lambda t: F.softmax(t, dim=-1),
    }


def test_activations_match_torch():
    import torch

    x = np.linspace(-8, 8, 161).reshape(7, 23)
    functions = _torch_activation_functions()
    assert set(functions) == set(ACTIVATIONS)  # every name, including the torch-only ones
    for name, fn in ACTIVATIONS.items():
        want = functions[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(fn(x), want, atol=1e-12, rtol=1e-12, err_msg=name)


def _activation_chain_module(kind: str):
    """LSTM -> last step -> Linear+activation per entry of a list -> Linear, the activations as modules or functions."""
    import torch

    nn, F = torch.nn, torch.nn.functional
    if kind == "modules":
        acts = [(nn.ReLU(), "relu"), (nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid"), (nn.SiLU(), "silu"),
                (nn.SELU(), "selu"), (nn.Softsign(), "softsign"), (nn.Mish(), "mish"), (nn.ReLU6(), "relu6"),
                (nn.Hardsigmoid(), "hard_sigmoid"), (nn.Hardswish(), "hard_silu"), (nn.LogSigmoid(), "log_sigmoid"),
                (nn.CELU(), "celu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                (nn.ELU(), "elu"), (nn.Softplus(), "softplus"), (nn.Hardtanh(), "hard_tanh"),
                (nn.LeakyReLU(), "leaky_relu_torch"), (nn.LeakyReLU(0.2), "leaky_relu"),
                (nn.Softmax(dim=-1), "softmax")]
    else:
        acts = [(torch.relu, "relu"), (F.relu, "relu"), (torch.tanh, "tanh"), (torch.sigmoid, "sigmoid"),
                (F.silu, "silu"), (F.selu, "selu"), (F.mish, "mish"), (F.relu6, "relu6"),
                (F.hardsigmoid, "hard_sigmoid"), (F.hardswish, "hard_silu"), (F.logsigmoid, "log_sigmoid"),
                (F.softsign, "softsign"), (F.gelu, "gelu"), (lambda t: F.gelu(t, approximate="tanh"), "gelu_tanh"),
                (F.elu, "elu"), (F.softplus, "softplus"), (F.leaky_relu, "leaky_relu_torch"),
                (lambda t: F.leaky_relu(t, 0.2), "leaky_relu"), (lambda t: t.relu(), "relu"),
                (lambda t: t.tanh(), "tanh"), (lambda t: t.sigmoid(), "sigmoid")]

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(FEATURES, 4, batch_first=True)
            self.fcs = nn.ModuleList(nn.Linear(4, 4) for _ in acts)
            if kind == "modules":
                self.acts = nn.ModuleList(a for a, _ in acts)
            else:
                self.fns = [a for a, _ in acts]
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            h = out[:, -1]
            for fc, act in zip(self.fcs, self.acts if kind == "modules" else self.fns):
                h = act(fc(h))
            return self.out(h)

    return Chain(), [name for _, name in acts]


@pytest.mark.parametrize("kind", ["modules", "functions"])
def test_torch_activations_are_read_from_the_module(tmp_path, kind):
    """Every activation torch_view knows, as a module or a function, is read under the name whose numpy
    function computes what torch computes."""
    import torch

    torch.manual_seed(3)
    module, names = _activation_chain_module(kind)
    path = tmp_path / "acts.pt"
    torch.save(module.state_dict(), path)
    net = load_network(path, module)
    assert [l.activation for l in net.layers[1:]] == [*names, "linear"]
    x = inputs(4)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy().astype(np.float64)
    np.testing.assert_allclose(net.forward(x), want, atol=1e-5, rtol=0)


# --- the framework check ----------------------------------------------------------------------


def test_check_refuses_a_view_that_computes_something_else(models):
    x = inputs(5)
    for name, index, wrong in (("keras_stack", 2, "tanh"), ("torch_bi", 5, "relu")):
        saved = models[name]
        site = open_model(saved.path, saved.module, x=x)
        net = site.network
        layer = net.layers[index]
        if isinstance(layer, Dense):
            bad = net.replace(index, Dense(layer.kernel, layer.bias, wrong))
        else:
            bad = net.replace(index, Activation(wrong, layer.dim))
        assert not np.allclose(bad.forward(x), net.forward(x), atol=1e-3)
        framework = "Keras" if saved.framework == "keras" else "PyTorch"
        with pytest.raises(ForwardMismatchError, match=f"differs from {framework}'s own") as info:
            site.check(bad, x, what="the candidate")
        assert "the candidate" in str(info.value) and "Nothing was scored or released" in str(info.value)
        assert site.check(net, x) <= 1e-5


# --- edits and write back -------------------------------------------------------------------


def test_replace_and_to_tensors_checks(models):
    net = cached_network(models["torch_dense2"])
    head = net.layers[-1]
    doubled = net.replace(len(net.layers) - 1, Dense(head.kernel * 2, head.bias, head.activation))
    assert np.array_equal(doubled.to_tensors()["head.1.weight"], (head.kernel * 2).T.astype(np.float32))
    assert net.layers[-1] is head  # the original is unchanged
    wider = Dense(np.zeros((4, 3)), np.zeros(3))
    with pytest.raises(ModelFormatError, match="head.1.weight"):
        net.replace(len(net.layers) - 1, wider).to_tensors()
    with pytest.raises(ModelFormatError, match="layer 2 takes 4 inputs but layer 1 gives 3"):
        net.replace(1, Dense(np.zeros((5, 3)), np.zeros(3)))
    with pytest.raises(ValueError, match="built by hand"):
        Network(list(net.layers)).to_tensors()
    with pytest.raises(ValueError, match="built by hand"):
        Network(list(net.layers)).with_tensors(net.to_tensors())


@pytest.mark.parametrize("name", ["keras_gru_stack", "keras_stack", "torch_gru_stack", "keras_bi", "keras_norm",
                                  "torch_bi", "keras_td"])
def test_with_tensors_is_the_inverse_of_to_tensors(models, name):
    net = cached_network(models[name])
    tensors = net.to_tensors()
    rebuilt = net.with_tensors(tensors)
    assert_same_tensors(rebuilt.to_tensors(), tensors)
    x = inputs(6, batch=4)
    np.testing.assert_array_equal(rebuilt.forward(x), net.forward(x))
    doubled = net.with_tensors({n: v.astype(np.float64) * 2 for n, v in tensors.items()})
    for a, b in zip(doubled.layers, net.layers):
        assert type(a) is type(b)
        arrays_a, arrays_b = layer_arrays(a), layer_arrays(b)
        assert arrays_a.keys() == arrays_b.keys()
        for field, value in arrays_b.items():
            np.testing.assert_array_equal(arrays_a[field], value * 2, err_msg=field)
        for option in ("activation", "merge_mode", "return_sequences", "name", "epsilon"):
            assert getattr(a, option, None) == getattr(b, option, None)
    assert all(np.array_equal(v, tensors[n]) for n, v in net.to_tensors().items())  # unchanged
    first = next(iter(tensors))
    with pytest.raises(ModelFormatError, match="is missing"):
        net.with_tensors({n: v for n, v in tensors.items() if n != first})
    with pytest.raises(ModelFormatError, match="is unknown"):
        net.with_tensors({**tensors, "no/such/tensor": tensors[first]})
    with pytest.raises(ModelFormatError, match="has shape"):
        net.with_tensors({**tensors, first: tensors[first][:1]})


def test_hand_built_network_runs():
    rng = np.random.default_rng(0)
    lstm = Recurrent("lstm", "ifco", rng.standard_normal((2, 12)), rng.standard_normal((3, 12)),
                     rng.standard_normal(12), None, return_sequences=False)
    net = Network([lstm, Dense(rng.standard_normal((3, 1)), None)])
    assert net.forward(rng.standard_normal((4, 5, 2))).shape == (4, 1)
    assert net.framework is None
    with pytest.raises(ModelFormatError, match="must end with a Dense"):
        Network([lstm])
    with pytest.raises(ValueError, match="gate_order"):
        Recurrent("gru", "ifc", rng.standard_normal((2, 9)), rng.standard_normal((3, 9)),
                  rng.standard_normal(9), None, return_sequences=False)
    # A hand-built Bidirectional layer: concat gives [forward, backward-in-time-order] features.
    fwd = Recurrent("gru", "zrh", rng.standard_normal((2, 9)), rng.standard_normal((3, 9)), rng.standard_normal(9),
                    rng.standard_normal(9), return_sequences=True)
    bwd = Recurrent("gru", "zrh", rng.standard_normal((2, 9)), rng.standard_normal((3, 9)), rng.standard_normal(9),
                    rng.standard_normal(9), return_sequences=True)
    bi = Bidirectional(fwd, bwd, "concat", return_sequences=False)
    x = rng.standard_normal((4, 5, 2))
    out = Network([bi, Dense(rng.standard_normal((6, 1)), None)]).outputs(x)[0]
    np.testing.assert_allclose(out[:, :3], fwd.sequence(x)[:, -1], atol=1e-12)
    np.testing.assert_allclose(out[:, 3:], bwd.sequence(x[:, ::-1])[:, -1], atol=1e-12)
    with pytest.raises(ModelFormatError, match="takes 3 inputs but layer 0 gives 6"):
        Network([bi, Dense(rng.standard_normal((3, 1)), None)])
    with pytest.raises(ModelFormatError, match="merge_mode"):
        Bidirectional(fwd, bwd, "max", return_sequences=False)


# --- models with a head on every time step ------------------------------------------------------


def _save_keras(tmp_path: Path, layers: list, name: str = "m.keras", batch_size: int | None = None) -> Path:
    keras = _keras()
    model = keras.Sequential([keras.Input((TIMESTEPS, FEATURES), batch_size=batch_size), *layers])
    model.save(tmp_path / name)
    return tmp_path / name


def test_dense_on_a_whole_sequence_is_a_head_on_every_step(tmp_path):
    """return_sequences=True straight into a Dense layer: the Dense acts on every time step."""
    keras = _keras()
    L = keras.layers
    path = _save_keras(tmp_path, [L.LSTM(3, return_sequences=True), L.Dense(2)])
    net = load_network(path)
    assert net.layers[0].return_sequences and isinstance(net.layers[1], Dense)
    x = inputs(7, batch=4)
    want = _run_keras_file(path, x)
    assert want.shape == (4, TIMESTEPS, 2)
    np.testing.assert_allclose(net.forward(x), rows(want), atol=1e-5, rtol=0)
    assert net.features(x).shape == (4, TIMESTEPS, 3)


# --- refused models --------------------------------------------------------------------------


def test_unsupported_keras_layer(tmp_path):
    keras = _keras()
    path = _save_keras(tmp_path, [keras.layers.Conv1D(4, 2, name="conv"), keras.layers.LSTM(3), keras.layers.Dense(1)])
    with pytest.raises(ModelFormatError) as info:
        load_network(path)
    message = str(info.value)
    assert "'conv' (Conv1D) is not supported" in message
    assert SUPPORTED_LAYOUTS in message


def test_refused_keras_options(tmp_path):
    keras = _keras()
    L = keras.layers
    cases = {
        "go_backwards=True outside a Bidirectional": ([L.LSTM(3, go_backwards=True), L.Dense(1)], None),
        "stateful=True": ([L.LSTM(3, stateful=True), L.Dense(1)], 4),
        r"no bias \(use_bias=False\)": ([L.GRU(3, use_bias=False), L.Dense(1)], None),
    }
    for i, (message, (layers, batch_size)) in enumerate(cases.items()):
        with pytest.raises(ModelFormatError, match=message):
            load_network(_save_keras(tmp_path, layers, f"m{i}.keras", batch_size))


def test_functional_model_reusing_a_layer_is_refused_by_the_framework_check(tmp_path):
    """A functional model that applies one layer twice is not a chain: the view reads it once, and the
    check against Keras's own forward pass refuses it."""
    keras = _keras()
    L = keras.layers
    x = keras.Input((TIMESTEPS, FEATURES))
    shared = L.Dense(3, activation="tanh")
    model = keras.Model(x, L.Dense(1)(shared(shared(L.LSTM(3)(x)))))
    model.save(tmp_path / "shared.keras")
    with pytest.raises(ModelFormatError) as info:
        load_network(tmp_path / "shared.keras")
    assert isinstance(info.value, ForwardMismatchError)
    assert "forward pass differs from Keras's own" in str(info.value)


def _torch_refusals():
    import torch

    nn = torch.nn

    class MeanPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(FEATURES, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out.mean(dim=1))

    class Rnn(nn.Module):
        def __init__(self, rnn, width):
            super().__init__()
            self.rnn, self.fc = rnn, nn.Linear(width, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.GRU(FEATURES, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x, extra):
            out, _ = self.rnn(x + extra)
            return self.fc(out[:, -1])

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(FEATURES, 4, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            h = out[:, -1]
            return self.fc2(torch.relu(self.fc1(h)) + h)

    class LayerNormed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.norm, self.fc = nn.GRU(FEATURES, 4, batch_first=True), nn.LayerNorm(4), nn.Linear(4, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(self.norm(out[:, -1]))

    class BiFinalState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.GRU(FEATURES, 4, batch_first=True, bidirectional=True), nn.Linear(4, 1)

        def forward(self, x):
            _, h = self.rnn(x)
            return self.fc(h[-1])

    return {
        r"method \.mean\(\) is not supported": MeanPool(),
        "batch_first=False": Rnn(nn.LSTM(FEATURES, 4), 4),
        "proj_size": Rnn(nn.LSTM(FEATURES, 4, batch_first=True, proj_size=3), 3),
        "bias=False": Rnn(nn.LSTM(FEATURES, 4, batch_first=True, bias=False), 4),
        "more than one input": TwoInputs(),
        "function add is not supported": Skip(),
        r"'norm' \(LayerNorm\) is not supported": LayerNormed(),
        "backward direction only": BiFinalState(),
    }


def test_refused_torch_modules(tmp_path):
    import torch

    for i, (message, module) in enumerate(_torch_refusals().items()):
        path = tmp_path / f"m{i}.pt"
        torch.save(module.state_dict(), path)
        with pytest.raises(ModelFormatError, match=message) as info:
            load_network(path, module)
        assert str(path) in str(info.value), message


def test_torch_file_needs_its_module(models, tmp_path):
    saved = models["torch_lstm"]
    with pytest.raises(ModelFormatError, match="--torch-model") as info:
        load_network(saved.path)
    assert "will not guess" in str(info.value)
    # A module that is not the one the file was saved from is refused by shape, naming the tensor.
    with pytest.raises(ModelFormatError, match="give the module the file was saved from"):
        load_network(saved.path, TORCH_FACTORIES["torch_gru"])
    # The string form of the module, with its constructor arguments.
    kind, units, dense = TORCH_SPECS["torch_lstm"]
    by_name = load_network(saved.path, "secagg.merge.torch_view:make_torch_regressor",
                           {"input_dim": FEATURES, "units": units, "dense": dense, "kind": kind})
    assert_same_tensors(by_name.to_tensors(), read_model(saved.path))
    x = inputs(8)
    np.testing.assert_allclose(by_name.forward(x), cached_network(saved).forward(x), atol=0)
    with pytest.raises(ModelFormatError, match="needs the architecture"):
        load_network(tmp_path / "m.npz")


def test_sequence_regressor():
    import torch

    from secagg.merge import SequenceRegressor

    model = make_torch_regressor(FEATURES, [4, 4], [3, 1], kind="gru")
    assert isinstance(model, SequenceRegressor) and isinstance(model.rnn, torch.nn.GRU)
    assert model.rnn.num_layers == 2 and model.rnn.batch_first
    assert list(model.state_dict()) == [
        f"rnn.{w}_l{k}" for k in range(2) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ] + ["head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"]
    assert model(torch.zeros(2, TIMESTEPS, FEATURES)).shape == (2, 1)
    with pytest.raises(ValueError, match="one repeated size"):
        make_torch_regressor(FEATURES, [4, 5], [1])
    with pytest.raises(ValueError, match="kind must be"):
        make_torch_regressor(FEATURES, [4], [1], kind="rnn")
    from secagg.merge.torch_view import SequenceRegressor as same

    assert same is SequenceRegressor


def test_import_does_not_load_frameworks():
    code = (
        "import sys, secagg.merge, secagg.merge.network, secagg.merge.align\n"
        "bad = [m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
