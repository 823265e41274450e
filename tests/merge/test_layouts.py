"""Every common forecaster layout goes through an encrypted round and through ``auto``, judged by its framework.

For each layout, three sites train their own model in ONE process (Keras numbers the layers
``lstm``, ``lstm_1``, ...: the names differ between sites although the architectures are the same),
then:

* an encrypted round averages them: the fetched model equals the positional weighted average of
  the sites' weights (what ``get_weights()``/``state_dict()`` order gives) to 1e-6;
* ``simulate --method auto`` merges them: the written global model, run by the REAL framework on
  every site's validation data, has the pooled nRMSE that secagg reported for its choice (1e-4).

And the case that used to give a silent wrong model: secagg's numpy forward pass disagreeing with
the framework's (a PyTorch head with tanh that secagg took for ReLU) is refused before anything is
scored or released.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import secagg
from secagg.merge.network import ForwardMismatchError
from secagg.merge.simulate import simulate
from secagg.models import read_model
from secagg.models.framework import FrameworkModel

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

WINDOW = 8
SIZES = (220, 180, 250)
pytestmark = pytest.mark.slow


def series(seed: int, n: int, sequence_target: bool = False):
    """Windows of a standardized noisy sine (each site its own period, phase, amplitude)."""
    rng = np.random.default_rng(300 + seed)
    t = np.arange(n + WINDOW)
    s = (1 + 0.3 * seed) * np.sin(2 * np.pi * t / (12 + 4 * seed) + seed) + 0.1 * rng.standard_normal(len(t))
    s = (s - s.mean()) / s.std()
    x = np.stack([s[i:i + WINDOW] for i in range(n)])[:, :, None].astype(np.float32)
    if sequence_target:  # a head on every step: predict the next value at each step
        y = np.stack([s[i + 1:i + WINDOW + 1] for i in range(n)]).astype(np.float32)
    else:
        y = s[WINDOW:WINDOW + n, None].astype(np.float32)
    return x, y


# -- the layouts ------------------------------------------------------------------------------------


def _keras():
    from secagg.models.keras_files import _quiet_import_keras

    return _quiet_import_keras()


def keras_layout(kind: str):
    """A new, unnamed Keras model of layout ``kind`` (Keras numbers its layers)."""
    keras = _keras()
    L = keras.layers
    inp = keras.Input((WINDOW, 1))
    if kind == "relu_lstm":
        out = L.Dense(1)(L.LSTM(6, activation="relu")(inp))
    elif kind == "bidirectional":
        out = L.Dense(1)(L.Bidirectional(L.LSTM(4))(inp))
    elif kind == "timedistributed":
        out = L.TimeDistributed(L.Dense(1))(L.TimeDistributed(L.Dense(4, activation="relu"))(
            L.LSTM(5, return_sequences=True)(inp)))
    elif kind == "stacked_gru":
        out = L.Dense(1)(L.GRU(4)(L.Dropout(0.1)(L.GRU(5, return_sequences=True)(inp))))
    elif kind == "stacked_lstm":
        out = L.Dense(1)(L.Dense(4, activation="tanh")(L.LSTM(4)(L.LSTM(5, return_sequences=True)(inp))))
    elif kind == "normalization":
        norm = L.Normalization()
        norm.adapt(np.random.default_rng(0).normal(0.5, 2.0, (64, WINDOW, 1)))
        out = L.Dense(1)(L.BatchNormalization()(L.LSTM(5)(norm(inp))))
    else:
        raise AssertionError(kind)
    return keras.Model(inp, out)


def torch_tanh_head():
    """Custom attribute names, the final state h_n[-1], and a tanh between two Linear layers."""
    import torch

    class TanhHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.LSTM(1, 6, batch_first=True)
            self.fc1 = torch.nn.Linear(6, 4)
            self.fc2 = torch.nn.Linear(4, 1)

        def forward(self, x):
            _, (h, _c) = self.encoder(x)
            return self.fc2(torch.tanh(self.fc1(h[-1])))

    return TanhHead()


def torch_bidirectional():
    import torch

    class BiNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.GRU(1, 4, batch_first=True, bidirectional=True)
            self.proj = torch.nn.Linear(8, 4)
            self.norm = torch.nn.BatchNorm1d(4)
            self.out = torch.nn.Linear(4, 1)

        def forward(self, x):
            seq, _ = self.rnn(x)
            return self.out(self.norm(torch.relu(self.proj(seq[:, -1]))))

    return BiNorm()


TORCH_LAYOUTS = {"torch_tanh_head": torch_tanh_head, "torch_bidirectional": torch_bidirectional}
KERAS_LAYOUTS = ["relu_lstm", "bidirectional", "timedistributed", "stacked_gru", "stacked_lstm", "normalization"]
LAYOUTS = KERAS_LAYOUTS + list(TORCH_LAYOUTS)


def train_torch(module, x, y, seed: int, epochs: int = 30):
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    module.train()
    for _ in range(epochs):
        for s in range(0, len(xt), 32):
            opt.zero_grad()
            torch.nn.functional.mse_loss(module(xt[s:s + 32]), yt[s:s + 32]).backward()
            opt.step()
    module.eval()
    return module


@functools.cache
def trained_sites(kind: str, root: str):
    """[(model path, data path, x, y)] for three sites of layout ``kind``, trained in this one process."""
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sites = []
    for i, n in enumerate(SIZES):
        x, y = series(i, n, sequence_target=kind == "timedistributed")
        cut = int(0.8 * n)
        if kind in TORCH_LAYOUTS:
            import torch

            torch.manual_seed(i)
            module = train_torch(TORCH_LAYOUTS[kind](), x[:cut], y[:cut], seed=i)
            path = root / f"{kind}{i}.pt"
            torch.save(module.state_dict(), path)
        else:
            keras = _keras()
            keras.utils.set_random_seed(i)
            model = keras_layout(kind)
            model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
            model.fit(x[:cut], y[:cut, :, None] if kind == "timedistributed" else y[:cut], epochs=6, batch_size=32,
                      verbose=0)
            path = root / f"{kind}{i}.{'h5' if i == 2 else 'keras'}"  # one legacy HDF5 file among them
            model.save(path)
        data = root / f"{kind}{i}.npz"
        np.savez(data, x=x, y=y)
        sites.append((path, data, x, y))
    return sites


@pytest.fixture(scope="module")
def layout_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("layouts"))


def torch_options(kind: str) -> dict:
    return {"torch_module": TORCH_LAYOUTS[kind]} if kind in TORCH_LAYOUTS else {}


# -- the encrypted round ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYOUTS)
def test_round_is_the_positional_weighted_average(kind, layout_root, server, client_key, tmp_path):
    sites = trained_sites(kind, layout_root)
    models = [read_model(path) for path, *_ in sites]
    if kind in KERAS_LAYOUTS:  # the premise: Keras numbered the layers differently at every site
        assert list(models[0]) != list(models[1])
    weights = [float(len(x)) for _, _, x, _ in sites]
    round_id = f"layout-{kind}"
    secagg.create_round(server.address, round_id, template=sites[0][0], clients=3)
    for i, (path, _, x, _) in enumerate(sites):
        secagg.submit(server.address, round_id, client_key, f"site{i}", path, weight=float(len(x)))
    template = sites[1][0]  # fetch with another site's file: written with ITS names
    out = secagg.fetch(server.address, round_id, client_key, template, tmp_path / f"global{template.suffix}", wait=30)
    got = read_model(out)
    assert list(got) == list(models[1])
    w = np.asarray(weights) / sum(weights)
    for k, name in enumerate(got):
        values = [np.asarray(list(m.values())[k], np.float64) for m in models]
        if values[0].dtype.kind == "f" and np.asarray(list(models[0].values())[k]).dtype.kind == "f":
            want = sum(wi * v for wi, v in zip(w, values))
            assert float(np.max(np.abs(np.asarray(got[name], np.float64) - want), initial=0.0)) <= 1e-6, name


# -- auto, judged by the framework ---------------------------------------------------------------------


def framework_predictor(kind: str, model_path):
    """The written global model's predictions by its framework: a hybrid PyTorch file through the documented
    HybridForecaster around the sites' own module, anything else as the sites' models are loaded."""
    if kind in TORCH_LAYOUTS:
        import torch

        state = torch.load(model_path, map_location="cpu", weights_only=True)
        if "skip.weight" in state:
            from secagg.merge.head_files import torch_hybrid_class
            from secagg.models.framework import load_torch_module

            outputs, inputs = state["skip.weight"].shape
            model = torch_hybrid_class()(load_torch_module(TORCH_LAYOUTS[kind]), inputs, outputs)
            model.load_state_dict(state)
            model.eval()
            return lambda x: model(torch.from_numpy(np.asarray(x, np.float32))).detach().numpy().astype(np.float64)
    return FrameworkModel.load(model_path, **torch_options(kind)).predict


def framework_nrmse(kind: str, model_path, sites) -> float:
    """sqrt(pooled MSE / pooled variance) over the sites' validation tails, by the framework's own forward pass."""
    predict = framework_predictor(kind, model_path)
    sq = var = count = 0.0
    for _, _, x, y in sites:
        cut = int(len(x) * 0.8)
        xv, yv = x[cut:], y[cut:].reshape(len(x) - cut, -1).astype(np.float64)
        pred = predict(xv).reshape(len(xv), -1)
        sq += float(np.mean((pred - yv) ** 2)) * len(xv)
        var += float(np.mean((yv - yv.mean(axis=0)) ** 2)) * len(xv)
        count += len(xv)
    return float(np.sqrt((sq / count) / (var / count)))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_auto_score_is_what_the_framework_measures(kind, layout_root, tmp_path):
    sites = trained_sites(kind, layout_root)
    suffix = ".pt" if kind in TORCH_LAYOUTS else ".keras"
    out = tmp_path / f"global{suffix}"
    result = simulate("auto", [(str(p), str(d)) for p, d, *_ in sites], out, workdir=tmp_path / "work",
                      **torch_options(kind))
    chosen = result.chosen["chosen"]
    scores = result.chosen["scores"]
    reported = scores["candidates"][chosen]
    assert chosen == min(scores["candidates"], key=scores["candidates"].get)
    measured = framework_nrmse(kind, out, sites)
    assert abs(measured - reported) <= 1e-4, (kind, chosen, measured, reported)
    # The merged model is a real improvement on the plain average of unaligned networks.
    assert reported < scores["candidates"]["mean"]


# -- no silent wrong model ---------------------------------------------------------------------------


def test_a_forward_pass_secagg_gets_wrong_is_refused_before_any_score(layout_root, tmp_path, monkeypatch):
    """The tanh case: secagg's view with ReLU where the module has tanh must not be scored or released."""
    from secagg.merge import methods, network
    from secagg.merge.protocol import Federation
    from secagg.merge.simulate import load_site

    sites = trained_sites("torch_tanh_head", layout_root)
    states = [load_site(f"site{i}", p, d, i, torch_tanh_head) for i, (p, d, *_) in enumerate(sites)]
    for state in states:  # what the old state-dict convention assumed: ReLU between Linear layers
        hidden = state.network.layers[1]
        assert hidden.activation == "tanh"
        wrong = state.network.replace(1, type(hidden)(hidden.kernel, hidden.bias, "relu"))
        state.network = wrong
        state.rebuild = wrong.with_tensors
    with Federation(tmp_path / "work") as federation:
        with pytest.raises(ForwardMismatchError, match="differs from PyTorch's own"):
            federation.run({s.name: methods.run_method(s, "auto") for s in states})
        steps = [s.name for s in federation.steps]
    assert "score" not in steps and "mean" in steps  # refused after merging, before scoring

    # And at the door: a view that disagrees with the framework on the site's own data is refused
    # before any exchange.
    monkeypatch.setitem(network.ACTIVATIONS, "tanh", network.ACTIVATIONS["relu"])
    with pytest.raises(ForwardMismatchError, match="as read"):
        simulate("auto", [(str(p), str(d)) for p, d, *_ in sites], tmp_path / "g.pt", workdir=tmp_path / "w2",
                 torch_module=torch_tanh_head)


def test_a_keras_layer_that_is_not_what_its_class_name_says_is_refused(tmp_path):
    """A custom layer called Dense whose call() differs: the framework check catches what the layer table cannot."""
    keras = _keras()

    @keras.saving.register_keras_serializable(package="secagg_test")
    class Dense(keras.layers.Dense):  # noqa: N801 - the point is the misleading name
        def call(self, inputs):
            return super().call(inputs) * 1.5

    inp = keras.Input((WINDOW, 1))
    model = keras.Model(inp, Dense(1)(keras.layers.LSTM(3)(inp)))
    path = tmp_path / "tricky.keras"
    model.save(path)
    x, _ = series(0, 40)
    with pytest.raises(ForwardMismatchError, match="differs from Keras's own"):
        network_open(path, x)


def network_open(path, x):
    from secagg.merge.network import open_model

    return open_model(path, x=x)


def test_candidates_that_diverge_are_dropped_by_every_site(layout_root, tmp_path):
    """A ReLU LSTM whose merged weights blow up (as align+repair did on the user's ReLU models) is dropped by all
    sites alike, with the reason, instead of crashing the exchange with an overflow error."""
    import dataclasses

    from secagg.merge import methods
    from secagg.merge.protocol import Federation
    from secagg.merge.simulate import load_site

    sites = trained_sites("relu_lstm", layout_root)
    states = [load_site(f"site{i}", p, d, i) for i, (p, d, *_) in enumerate(sites)]
    good = states[0].network
    lstm = good.layers[0]
    bad = good.replace(0, dataclasses.replace(lstm, kernel=lstm.kernel * 1e4, bias=lstm.bias + 50.0))

    def protocol(site):
        refit, dropped = yield from methods.head_exchange(site, {"good": good, "bad": bad})
        refit = {key.partition("+")[0]: model for key, model in refit.items()}
        scores = yield from methods.score(site, {"good": refit["good"], "bad": bad})
        return refit, dropped, scores

    with Federation(tmp_path / "work") as federation:
        results = federation.run({s.name: protocol(s) for s in states})
    for refit, dropped, scores in results.values():
        assert set(refit) == {"good"} and set(dropped) == {"bad"} and "not finite or beyond" in dropped["bad"]
        assert set(scores.candidates) == {"good"} and set(scores.dropped) == {"bad"}
        assert 0 < scores.candidates["good"] < 1
