"""secagg.merge.network: the numpy view of real Keras and PyTorch models.

The models are small, built once per session with random (non-zero) weights and biases, saved as
real model files, and shared with test_align.py through :func:`saved_models`.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from secagg.errors import ModelFormatError
from secagg.merge import Dense, Network, Recurrent, load_network, make_torch_regressor, network_from_tensors
from secagg.merge.network import ACTIVATIONS
from secagg.models import read_model

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[2]
TIMESTEPS, FEATURES = 6, 3


@dataclass
class Saved:
    """A model file, its framework, and how to run any file of its architecture."""

    path: Path
    framework: str
    run_file: Callable[[Path, np.ndarray], np.ndarray]


def inputs(seed: int = 0, batch: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, TIMESTEPS, FEATURES)).astype(np.float32)


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
    return {
        "keras_lstm": keras.Sequential([keras.Input(shape), L.LSTM(5), L.Dense(2)]),
        "keras_gru": keras.Sequential([keras.Input(shape), L.GRU(5), L.Dense(1)]),
        "keras_gru_v1": keras.Sequential([keras.Input(shape), L.GRU(4, reset_after=False), L.Dense(1)]),
        "keras_stack": functional_stack,  # LSTM(seq) -> LSTM -> Dense(relu) -> Dense
        "keras_gru_stack": keras.Sequential(
            [keras.Input(shape), L.GRU(4, return_sequences=True), L.Dropout(0.2), L.GRU(3),
             L.Dense(4, activation="tanh"), L.Dense(1)]
        ),
    }


def _randomize_keras(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    model.set_weights([(rng.standard_normal(w.shape) * 0.5).astype(w.dtype) for w in model.get_weights()])


def _run_keras_file(path: Path, x: np.ndarray) -> np.ndarray:
    keras = _keras()
    model = keras.models.load_model(path, compile=False)
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


# --- PyTorch ------------------------------------------------------------------------------

TORCH_SPECS = {  # name -> (kind, units, dense)
    "torch_lstm": ("lstm", [8], [1]),
    "torch_lstm2": ("lstm", [6, 6], [1]),  # one nn.LSTM with num_layers=2
    "torch_gru": ("gru", [5], [1]),
    "torch_dense2": ("lstm", [5], [4, 2]),  # two Linear layers
    "torch_gru_stack": ("gru", [4, 4], [3, 1]),
}


def _custom_torch_module():
    """The convention with other names: Linear layers defined before the GRU, prefix 'encoder'."""
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


def _torch_module(name: str):
    if name == "torch_custom":
        return _custom_torch_module()
    kind, units, dense = TORCH_SPECS[name]
    return make_torch_regressor(FEATURES, units, dense, kind)


def _torch_runner(name: str) -> Callable[[Path, np.ndarray], np.ndarray]:
    def run(path: Path, x: np.ndarray) -> np.ndarray:
        import torch

        module = _torch_module(name)
        module.load_state_dict(torch.load(path, weights_only=True))
        module.eval()
        with torch.no_grad():
            return module(torch.from_numpy(np.asarray(x, np.float32))).numpy().astype(np.float64)

    return run


# --- all models, built once -------------------------------------------------------------------

KERAS_NAMES = ["keras_lstm", "keras_gru", "keras_gru_v1", "keras_stack", "keras_gru_stack"]
TORCH_NAMES = [*TORCH_SPECS, "torch_custom"]
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
    for seed, name in enumerate(TORCH_NAMES):
        torch.manual_seed(seed)
        path = directory / f"{name}.pt"
        torch.save(_torch_module(name).state_dict(), path)
        saved[name] = Saved(path, "torch", _torch_runner(name))
    return saved


@functools.cache
def cached_network(path: Path) -> Network:
    return load_network(path)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Saved]:
    return saved_models(tmp_path_factory.getbasetemp() / "merge-models")


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# --- forward pass and round trip ------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES + ["keras_stack_h5"])
def test_forward_matches_framework(models, name):
    saved = models[name]
    x = inputs()
    net = cached_network(saved.path)
    want = saved.run_file(saved.path, x)
    got = net.forward(x)
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL_NAMES + ["keras_stack_h5"])
def test_to_tensors_is_exact_inverse(models, name):
    saved = models[name]
    tensors = read_model(saved.path)
    assert_same_tensors(cached_network(saved.path).to_tensors(), tensors)
    again = network_from_tensors(tensors, saved.framework)
    assert_same_tensors(again.to_tensors(), tensors)


def test_layer_structure(models):
    net = cached_network(models["keras_stack"].path)
    kinds = [(type(l).__name__, getattr(l, "kind", None)) for l in net.layers]
    assert kinds == [("Recurrent", "lstm"), ("Recurrent", "lstm"), ("Dense", None), ("Dense", None)]
    assert [l.return_sequences for l in net.layers[:2]] == [True, False]
    assert [l.activation for l in net.layers[2:]] == ["relu", "linear"]
    assert net.layers[0].gate_order == "ifco" and net.layers[0].recurrent_bias is None
    assert net.framework == "keras"

    gru = cached_network(models["keras_gru"].path).layers[0]
    assert (gru.gate_order, gru.reset_after, gru.recurrent_bias.shape) == ("zrh", True, (15,))
    gru_v1 = cached_network(models["keras_gru_v1"].path).layers[0]
    assert (gru_v1.reset_after, gru_v1.recurrent_bias) == (False, None)

    torch_net = cached_network(models["torch_lstm2"].path)
    assert [type(l).__name__ for l in torch_net.layers] == ["Recurrent", "Recurrent", "Dense"]
    assert [(l.units, l.input_dim) for l in torch_net.layers[:2]] == [(6, FEATURES), (6, 6)]
    assert torch_net.layers[0].gate_order == "ifco" and torch_net.framework == "torch"
    assert cached_network(models["torch_gru"].path).layers[0].gate_order == "rzn"
    custom = cached_network(models["torch_custom"].path)
    assert [l.activation for l in custom.layers[1:]] == ["relu", "linear"]


def test_h5_and_keras_give_the_same_network(models):
    h5, native = (cached_network(models[n].path) for n in ("keras_stack_h5", "keras_stack"))
    assert_same_tensors(h5.to_tensors(), native.to_tensors())
    assert [type(l) for l in h5.layers] == [type(l) for l in native.layers]


def test_keras_config_and_defaults(models):
    keras = _keras()
    path = models["keras_stack"].path
    tensors = read_model(path)
    x = inputs(1)
    config = keras.models.load_model(path, compile=False).get_config()["layers"]
    with_config = network_from_tensors(tensors, "keras", keras_config=config)
    np.testing.assert_allclose(with_config.forward(x), cached_network(path).forward(x), atol=1e-12)
    # Without the config, hidden Dense layers are assumed linear (documented).
    assert network_from_tensors(tensors, "keras").layers[2].activation == "linear"
    with pytest.raises(ModelFormatError, match="keras_config lists 2 layers"):
        network_from_tensors(tensors, "keras", keras_config=config[:3])


def test_features_hidden_states_and_linear_inputs(models):
    x = inputs(2, batch=5)
    for name in ("keras_stack", "torch_lstm2", "torch_gru_stack"):
        net = cached_network(models[name].path)
        last = net.layers[-1]
        np.testing.assert_allclose(net.features(x) @ last.kernel + last.bias, net.forward(x), atol=1e-12)
        states = net.hidden_states(x)
        rows = net.linear_inputs(x)
        for i, layer in enumerate(net.layers):
            if isinstance(layer, Recurrent):
                assert states[i].shape == (5, TIMESTEPS, layer.units)
                r = rows[i].reshape(5, TIMESTEPS, -1)
                assert r.shape[2] == layer.input_dim + layer.units + 1
                inp = x if i == 0 else states[i - 1]
                np.testing.assert_array_equal(r[:, :, : layer.input_dim], inp)
                np.testing.assert_array_equal(r[:, 0, layer.input_dim:-1], 0.0)
                np.testing.assert_array_equal(r[:, 1:, layer.input_dim:-1], states[i][:, :-1])
                np.testing.assert_array_equal(r[:, :, -1], 1.0)
            else:
                assert rows[i].shape == (5, layer.input_dim + 1)
                assert states[i].shape == (5, layer.output_dim)
    # LSTM: the gates are the linear map of the rows, and they reproduce the h sequence.
    net = cached_network(models["torch_lstm"].path)
    layer = net.layers[0]
    weights = np.vstack([layer.kernel, layer.recurrent_kernel, layer.bias + layer.recurrent_bias])
    gates = (net.linear_inputs(x)[0] @ weights).reshape(5, TIMESTEPS, -1)
    sig = ACTIVATIONS["sigmoid"]
    c = np.zeros((5, layer.units))
    for t in range(TIMESTEPS):
        a = gates[:, t]
        c = sig(a[:, layer.gate_slice("f")]) * c + sig(a[:, layer.gate_slice("i")]) * np.tanh(a[:, layer.gate_slice("c")])
        h = sig(a[:, layer.gate_slice("o")]) * np.tanh(c)
        np.testing.assert_allclose(h, net.hidden_states(x)[0][:, t], atol=1e-12)


def test_activations_match_keras():
    keras = _keras()
    x = np.linspace(-8, 8, 161, dtype=np.float32).reshape(7, 23)
    for name, fn in ACTIVATIONS.items():
        want = np.asarray(keras.ops.convert_to_numpy(keras.activations.get(name)(x)), np.float64)
        np.testing.assert_allclose(fn(x.astype(np.float64)), want, atol=1e-6, err_msg=name)


# --- edits and write back -------------------------------------------------------------------


def test_replace_and_to_tensors_checks(models):
    net = cached_network(models["torch_dense2"].path)
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


@pytest.mark.parametrize("name", ["keras_gru_stack", "keras_stack", "torch_gru_stack"])
def test_with_tensors_is_the_inverse_of_to_tensors(models, name):
    net = cached_network(models[name].path)
    tensors = net.to_tensors()
    rebuilt = net.with_tensors(tensors)
    assert_same_tensors(rebuilt.to_tensors(), tensors)
    x = inputs(6, batch=4)
    np.testing.assert_array_equal(rebuilt.forward(x), net.forward(x))
    doubled = net.with_tensors({n: v.astype(np.float64) * 2 for n, v in tensors.items()})
    for a, b in zip(doubled.layers, net.layers):
        np.testing.assert_array_equal(a.kernel, b.kernel * 2)
        assert a.activation == b.activation
    assert all(np.array_equal(v, tensors[n]) for n, v in net.to_tensors().items())  # unchanged
    first = next(iter(tensors))
    with pytest.raises(ModelFormatError, match="is missing"):
        net.with_tensors({n: v for n, v in tensors.items() if n != first})
    with pytest.raises(ModelFormatError, match="has shape"):
        net.with_tensors({**tensors, first: tensors[first][:1]})


def test_hand_built_network_runs():
    rng = np.random.default_rng(0)
    lstm = Recurrent("lstm", "ifco", rng.standard_normal((2, 12)), rng.standard_normal((3, 12)),
                     rng.standard_normal(12), None, return_sequences=False)
    net = Network([lstm, Dense(rng.standard_normal((3, 1)), None)])
    assert net.forward(rng.standard_normal((4, 5, 2))).shape == (4, 1)
    with pytest.raises(ModelFormatError, match="must end with a Dense"):
        Network([lstm])
    with pytest.raises(ValueError, match="gate_order"):
        Recurrent("gru", "ifc", rng.standard_normal((2, 9)), rng.standard_normal((3, 9)),
                  rng.standard_normal(9), None, return_sequences=False)


# --- refused models --------------------------------------------------------------------------


def _save_keras(tmp_path: Path, layers: list, name: str = "m.keras") -> Path:
    keras = _keras()
    model = keras.Sequential([keras.Input((TIMESTEPS, FEATURES)), *layers])
    model.save(tmp_path / name)
    return tmp_path / name


def test_unsupported_keras_layer(tmp_path):
    keras = _keras()
    path = _save_keras(tmp_path, [keras.layers.Conv1D(4, 2, name="conv"), keras.layers.LSTM(3), keras.layers.Dense(1)])
    with pytest.raises(ModelFormatError) as info:
        load_network(path)
    message = str(info.value)
    assert "'conv' (Conv1D) is not supported" in message
    assert "InputLayer, LSTM, GRU, Dense" in message


def test_refused_keras_options(tmp_path):
    keras = _keras()
    L = keras.layers
    cases = {
        "go_backwards=True": [L.LSTM(3, go_backwards=True), L.Dense(1)],
        "return_sequences=True": [L.LSTM(3, return_sequences=True), L.Dense(1)],
        "without bias": [L.GRU(3, use_bias=False), L.Dense(1)],
    }
    for i, (message, layers) in enumerate(cases.items()):
        with pytest.raises(ModelFormatError, match=message):
            load_network(_save_keras(tmp_path, layers, f"m{i}.keras"))
    # A functional model that reuses a layer is not a chain: caught by the check against Keras.
    x = keras.Input((TIMESTEPS, FEATURES))
    shared = L.Dense(3, activation="tanh")
    model = keras.Model(x, L.Dense(1)(shared(shared(L.LSTM(3)(x)))))
    model.save(tmp_path / "shared.keras")
    with pytest.raises(ModelFormatError, match="plain chain"):
        load_network(tmp_path / "shared.keras")


def test_refused_torch_state_dicts(tmp_path):
    import torch

    def check(state: dict, message: str) -> None:
        path = tmp_path / "m.pt"
        torch.save(state, path)
        with pytest.raises(ModelFormatError, match=message):
            load_network(path)

    def state_of(*modules: tuple[str, torch.nn.Module]) -> dict:
        return {f"{p}.{k}": v for p, m in modules for k, v in m.state_dict().items()}

    fc = ("fc", torch.nn.Linear(3, 1))
    check(state_of(("rnn", torch.nn.LSTM(3, 3, batch_first=True, bidirectional=True)), fc), "bidirectional")
    check(state_of(("rnn", torch.nn.LSTM(3, 4, batch_first=True, proj_size=3)), fc), "proj_size")
    check(state_of(("rnn", torch.nn.LSTM(3, 3, batch_first=True, bias=False)), fc), "bias=True")
    check(state_of(("a", torch.nn.GRU(3, 3)), ("b", torch.nn.GRU(3, 3)), fc), "2 LSTM/GRU modules")
    check(state_of(("rnn", torch.nn.GRU(3, 3))), "no nn.Linear")
    check(state_of(("rnn", torch.nn.GRU(3, 3)), ("norm", torch.nn.LayerNorm(3)), fc), "'norm.weight'")
    check(state_of(("rnn", torch.nn.GRU(3, 3)), ("fc", torch.nn.Linear(4, 1))), "takes 4 inputs")
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


def test_import_does_not_load_frameworks():
    code = (
        "import sys, secagg.merge\n"
        "bad = [m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
