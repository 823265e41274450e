"""``secagg diagnose``: the verdicts on models broken in known ways, checked against numpy references.

The good model is a trained site model on its own data. The broken ones are made from it:
hidden units reordered without reordering the next layer's inputs (``permuted``), the output
layer scaled down (``damped``), and a data file whose raw targets were normalized with this
site's own scaler, diagnosed with another site's scaler (``descaling``, and ``scaler_ok`` false
alongside any verdict). Models the numpy merge view does not cover (Normalization,
Bidirectional, BatchNormalization, a TimeDistributed head; PyTorch modules) are run in their
framework and checked against the framework's own predictions.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from secagg.errors import SecAggError
from secagg.merge import load_network, permute_units
from secagg.merge.diagnose import diagnose
from secagg.models import write_model
from secagg.scaler import Scaler

OWN = {"mean": 3.0, "std": 0.5, "log1p": True}  # the site's own scaler: z = (log1p(v) - 3) / 0.5
OTHER = {"mean": 4.2, "std": 1.3, "log1p": True}  # another site's, quite different


@pytest.fixture(scope="module")
def good(keras_sites):
    return keras_sites[0]


def reference(mh, model, site) -> dict:
    """Correlation and slope of predictions on truth, from the independent numpy forward pass."""
    pred = mh.lstm_forward(mh.read_tensors(model), site.x)[:, 0]
    truth = site.y[:, 0]
    slope, intercept = np.polyfit(truth, pred, 1)
    return {"pred": pred, "corr": float(np.corrcoef(pred, truth)[0, 1]), "slope": float(slope),
            "intercept": float(intercept), "nrmse": float(np.sqrt(np.mean((pred - truth) ** 2)) / np.std(truth))}


def check_numbers(d, ref, samples: int) -> None:
    assert d.samples == samples
    for field in ("corr", "slope", "intercept", "nrmse"):
        got = getattr(d, "correlation" if field == "corr" else field)
        assert abs(got - ref[field]) <= 1e-6, field


def with_reordered_units(mh, good, tmp_path, target_corr: float):
    """The good model with its LSTM units reordered but the Dense input rows left as they were.

    Of the 719 non-identity orders, the one whose predictions correlate with the truth closest to
    ``target_corr`` (reordering LSTM(6) units on a sine keeps a high correlation for about half of
    them: all units oscillate, only their phases and weights differ).
    """
    net = load_network(good.model)
    features = mh.lstm_features(mh.read_tensors(good.model), good.x)
    kernel, bias = net.layers[-1].kernel, net.layers[-1].bias
    best = None
    for perm in itertools.permutations(range(mh.UNITS)):
        perm = np.array(perm)
        if np.array_equal(perm, np.arange(mh.UNITS)):
            continue
        # permute_units(net, 0, perm) makes LSTM unit j the old unit perm[j]; keeping the Dense layer
        # as it was feeds old unit perm[j] into Dense row j.
        pred = features[:, perm] @ kernel + bias
        corr = np.corrcoef(pred[:, 0], good.y[:, 0])[0, 1]
        if best is None or abs(corr - target_corr) < abs(best[1] - target_corr):
            best = (perm, corr)
    broken = permute_units(net, 0, best[0]).replace(1, net.layers[1])
    path = write_model(good.model, broken.to_tensors(), tmp_path / f"reordered{target_corr}.keras")
    # The recurrent layer's gates were reordered, the Dense kernel was not.
    original, written = mh.read_tensors(good.model), mh.read_tensors(path)
    np.testing.assert_array_equal(written["out/kernel"], original["out/kernel"])
    assert not np.array_equal(written["lstm/lstm_cell/kernel"], original["lstm/lstm_cell/kernel"])
    return path


def test_ok(mh, good):
    d = diagnose(good.model, good.data)
    ref = reference(mh, good.model, good)
    check_numbers(d, ref, len(good.x))
    assert d.verdict == "ok", d
    assert d.correlation > 0.9 and 0.6 <= d.slope <= 1.2
    assert "own scaler" in d.advice
    assert d.raw_rmse is None and d.raw_rmse_own_scaler is None


def test_permuted(mh, good, tmp_path):
    path = with_reordered_units(mh, good, tmp_path, target_corr=0.0)
    d = diagnose(path, good.data)
    ref = reference(mh, path, good)
    check_numbers(d, ref, len(good.x))
    assert abs(d.correlation) < 0.1
    assert d.verdict == "permuted", d
    assert "--method auto" in d.advice and "--method init" in d.advice and "different orders" in d.advice


def test_permuted_with_anticorrelated_predictions(mh, good, tmp_path):
    path = with_reordered_units(mh, good, tmp_path, target_corr=-1.0)
    d = diagnose(path, good.data)
    assert d.correlation < -0.5
    assert d.verdict == "permuted", d


def test_weak(mh, good, tmp_path):
    path = with_reordered_units(mh, good, tmp_path, target_corr=0.45)
    d = diagnose(path, good.data)
    check_numbers(d, reference(mh, path, good), len(good.x))
    assert 0.3 <= d.correlation < 0.6
    assert d.verdict == "weak", d
    assert "--method auto" in d.advice


def test_damped(mh, good, tmp_path):
    tensors = {k: v * (0.3 if k.startswith("out/") else 1.0) for k, v in mh.read_tensors(good.model).items()}
    path = write_model(good.model, tensors, tmp_path / "damped.keras")
    d = diagnose(path, good.data)
    ok = diagnose(good.model, good.data)
    check_numbers(d, reference(mh, path, good), len(good.x))
    assert d.verdict == "damped", d
    assert d.slope < 0.6 and abs(d.slope - 0.3 * ok.slope) <= 1e-5
    assert d.correlation > 0.9 and abs(d.correlation - ok.correlation) <= 1e-5  # scaling keeps the correlation
    assert "readout" in d.advice and "auto" in d.advice and f"{d.slope:.2f}" in d.advice


# -- de-scaling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_data(mh, good, tmp_path_factory):
    """The good site's data with raw targets: y is log1p(y_raw) normalized with OWN; scaler files."""
    root = tmp_path_factory.mktemp("raw")
    y = good.y.astype(np.float32).astype(np.float64)
    y_raw = np.expm1(y * OWN["std"] + OWN["mean"])
    data = mh.save_data(root / "raw.npz", good.x.astype(np.float32), good.y.astype(np.float32), y_raw=y_raw)
    (root / "own.json").write_text(json.dumps(OWN))
    (root / "other.json").write_text(json.dumps(OTHER))
    return data, root / "own.json", root / "other.json", y_raw


def raw_rmse(pred: np.ndarray, y_raw: np.ndarray, scaler: dict) -> float:
    values = pred * scaler["std"] + scaler["mean"]
    return float(np.sqrt(np.mean((np.expm1(values) - y_raw[:, 0]) ** 2)))


def test_descaling_with_another_sites_scaler(mh, good, raw_data):
    data, _, other, y_raw = raw_data
    d = diagnose(good.model, data, other)
    ref = reference(mh, good.model, good)
    check_numbers(d, ref, len(good.x))
    assert d.verdict == "descaling", d
    assert d.scaler_ok is False
    assert d.raw_rmse == pytest.approx(raw_rmse(ref["pred"], y_raw, OTHER), rel=1e-5)
    assert d.raw_rmse_own_scaler == pytest.approx(raw_rmse(ref["pred"], y_raw, OWN), rel=1e-5)
    assert d.raw_rmse > 1.5 * d.raw_rmse_own_scaler
    # The true targets de-scaled with the other scaler are as far from y_raw as OTHER is from OWN.
    assert d.scaler_error == pytest.approx(raw_rmse(good.y[:, 0], y_raw, OTHER), rel=1e-5)
    assert d.own_scaler["kind"] == "standard" and d.own_scaler["log1p"] is True
    assert d.own_scaler["mean"][0] == pytest.approx(OWN["mean"], abs=1e-4)
    assert d.own_scaler["std"][0] == pytest.approx(OWN["std"], rel=1e-4)
    assert "own statistics" in d.advice and "never another site's scaler" in d.advice


def test_own_scaler_is_ok(mh, good, raw_data):
    data, own, _, y_raw = raw_data
    d = diagnose(good.model, data, own)
    assert d.verdict == "ok", d
    assert d.scaler_ok is True and d.scaler_error < 1e-3
    assert d.raw_rmse == pytest.approx(d.raw_rmse_own_scaler, rel=1e-6)
    assert d.raw_rmse == pytest.approx(raw_rmse(reference(mh, good.model, good)["pred"], y_raw, OWN), rel=1e-5)
    assert "never another site's scaler" not in d.advice


def test_wrong_scaler_is_reported_with_a_damped_model(mh, good, raw_data, tmp_path):
    """The damped verdict used to hide the scaler check: both problems are reported now."""
    data, own, other, _ = raw_data
    tensors = {k: v * (0.3 if k.startswith("out/") else 1.0) for k, v in mh.read_tensors(good.model).items()}
    damped = write_model(good.model, tensors, tmp_path / "damped.keras")
    d = diagnose(damped, data, other)
    assert d.verdict == "damped", d
    assert d.scaler_ok is False and d.raw_rmse > 1.5 * d.raw_rmse_own_scaler
    assert "readout" in d.advice and "never another site's scaler" in d.advice
    d = diagnose(damped, data, own)
    assert d.verdict == "damped" and d.scaler_ok is True, d


def test_minmax_scalers(mh, good, tmp_path):
    """Data normalized with the site's own log1p min-max scaler; another site's min-max scaler is caught."""
    own = Scaler("minmax", True, min=[2.0], max=[6.0], feature_range=(-1.0, 1.0))
    other = Scaler("minmax", True, min=[0.5], max=[4.0], feature_range=(-1.0, 1.0))
    y = good.y.astype(np.float32).astype(np.float64)
    y_raw = own.inverse(y)
    data = mh.save_data(tmp_path / "mm.npz", good.x.astype(np.float32), good.y.astype(np.float32), y_raw=y_raw)
    other.save(tmp_path / "other.json")
    own.save(tmp_path / "own.json")
    pred = reference(mh, good.model, good)["pred"]

    d = diagnose(good.model, data, tmp_path / "other.json")
    assert d.verdict == "descaling" and d.scaler_ok is False, d
    assert d.own_scaler["kind"] == "minmax" and d.own_scaler["feature_range"] == [-1.0, 1.0]
    assert d.own_scaler["min"][0] == pytest.approx(2.0, abs=1e-4)
    assert d.own_scaler["max"][0] == pytest.approx(6.0, abs=1e-4)
    want_own = float(np.sqrt(np.mean((own.inverse(pred) - y_raw[:, 0]) ** 2)))
    assert d.raw_rmse_own_scaler == pytest.approx(want_own, rel=1e-4)
    d = diagnose(good.model, data, tmp_path / "own.json")
    assert d.verdict == "ok" and d.scaler_ok is True, d


def test_scaler_of_several_features(mh, good, raw_data, tmp_path):
    data, _, _, _ = raw_data
    both = Scaler("standard", True, mean=[9.0, OWN["mean"]], std=[2.0, OWN["std"]])
    assert diagnose(good.model, data, both, column=1).scaler_ok is True
    assert diagnose(good.model, data, both, column=0).scaler_ok is False


def test_descaling_without_log1p(mh, good, tmp_path):
    own, other = {"mean": 50.0, "std": 8.0}, {"mean": 20.0, "std": 30.0}
    y_raw = good.y.astype(np.float32).astype(np.float64) * own["std"] + own["mean"]
    data = mh.save_data(tmp_path / "lin.npz", good.x.astype(np.float32), good.y.astype(np.float32), y_raw=y_raw)
    (tmp_path / "other.json").write_text(json.dumps(other))
    d = diagnose(good.model, data, tmp_path / "other.json")
    assert d.verdict == "descaling", d
    pred = reference(mh, good.model, good)["pred"]
    want_own = float(np.sqrt(np.mean((pred * own["std"] + own["mean"] - y_raw[:, 0]) ** 2)))
    assert d.raw_rmse_own_scaler == pytest.approx(want_own, rel=1e-6)


def test_diagnose_errors(good, raw_data, tmp_path):
    _, own, _, _ = raw_data
    with pytest.raises(SecAggError, match="needs the raw targets as array 'y_raw'"):
        diagnose(good.model, good.data, own)
    (tmp_path / "bad.json").write_text(json.dumps({"mean": 1.0}))
    data, _, _, _ = raw_data
    with pytest.raises(SecAggError, match=r"bad.json: a scaler is JSON with 'version' and 'kind'.*missing \['std'\]"):
        diagnose(good.model, data, tmp_path / "bad.json")
    np.savez(tmp_path / "short.npz", x=good.x, y=good.y, y_raw=good.y[:5])
    with pytest.raises(SecAggError, match="'y_raw' has 5 values but 'y' has"):
        diagnose(good.model, tmp_path / "short.npz", own)
    np.savez(tmp_path / "two.npz", x=good.x, y=np.hstack([good.y, good.y]))
    with pytest.raises(SecAggError, match=r"gives \(1,\) per sample but .* has 2 target"):
        diagnose(good.model, tmp_path / "two.npz")
    np.savez(tmp_path / "no_y.npz", x=good.x)
    with pytest.raises(SecAggError, match="arrays 'x' and 'y'"):
        diagnose(good.model, tmp_path / "no_y.npz")


# -- models the numpy merge view does not run ----------------------------------------------------


@pytest.fixture(scope="module")
def layered(mh, good, tmp_path_factory):
    """Normalization -> Bidirectional LSTM (sequences) -> BatchNormalization -> TimeDistributed Dense,
    trained briefly on the good site's next-step targets at every step; output (n, T, 1)."""
    keras = mh.keras_module()
    keras.utils.set_random_seed(5)
    x = good.x.astype(np.float32)
    y_seq = np.concatenate([x[:, 1:, 0], good.y.astype(np.float32)], axis=1)  # the next value after each step
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(x)
    model = keras.Sequential([keras.Input((mh.WINDOW, 1)), norm,
                              keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True), name="bi"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.TimeDistributed(keras.layers.Dense(1), name="td")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y_seq[..., None], epochs=15, batch_size=32, verbose=0)
    root = tmp_path_factory.mktemp("layered")
    model.save(root / "layered.keras")
    last = mh.save_data(root / "last.npz", x, good.y.astype(np.float32))
    every = mh.save_data(root / "every.npz", x, y_seq)
    return root / "layered.keras", last, every, y_seq


def test_keras_model_with_layers_the_merge_view_lacks(mh, good, layered):
    path, last, every, y_seq = layered
    out = mh.keras_predict(path, good.x)  # Keras' own forward pass, independent of diagnose
    assert out.shape == (len(good.x), mh.WINDOW, 1)

    d = diagnose(path, last)  # y is (n, 1): the last step is compared
    pred, truth = out[:, -1, 0], good.y[:, 0]
    assert d.compared == "last step" and d.samples == len(good.x)
    assert d.correlation == pytest.approx(np.corrcoef(pred, truth)[0, 1], abs=1e-6)
    assert d.slope == pytest.approx(np.polyfit(truth, pred, 1)[0], abs=1e-6)
    assert d.correlation > 0.6 and d.verdict in ("ok", "damped"), d

    d = diagnose(path, every)  # y is (n, T): every step is compared
    pred, truth = out[:, :, 0].reshape(-1), y_seq.astype(np.float64).reshape(-1)
    assert d.compared == "all steps"
    assert d.correlation == pytest.approx(np.corrcoef(pred, truth)[0, 1], abs=1e-6)
    assert d.nrmse == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)) / np.std(truth), abs=1e-6)


def test_pytorch_model_runs_with_its_module(mh, torch_sites):
    from secagg.merge import make_torch_regressor

    site = torch_sites[0]
    with pytest.raises(SecAggError, match="--torch-model"):
        diagnose(site.model, site.data)
    d = diagnose(site.model, site.data, torch_module=lambda: make_torch_regressor(1, [mh.UNITS], [1]))
    pred, truth = mh.torch_predict(site.model, site.x)[:, 0], site.y[:, 0]
    assert d.correlation == pytest.approx(np.corrcoef(pred, truth)[0, 1], abs=1e-6)
    assert d.verdict == "ok", d


# -- the command -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_diagnose(cli, good, raw_data, tmp_path):
    data, _, other, _ = raw_data
    proc = cli("diagnose", "--model", str(good.model), "--data", str(good.data))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verdict"] == "ok" and report["samples"] == len(good.x)
    assert report["correlation"] == pytest.approx(diagnose(good.model, good.data).correlation, abs=1e-9)

    proc = cli("diagnose", "--model", str(good.model), "--data", str(data), "--scaler", str(other))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verdict"] == "descaling" and report["raw_rmse"] > 1.5 * report["raw_rmse_own_scaler"]
    assert report["scaler_ok"] is False and report["own_scaler"]["kind"] == "standard"

    proc = cli("diagnose", "--model", str(tmp_path / "missing.keras"), "--data", str(good.data))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secagg: error:") and "missing.keras" in lines[0], proc.stderr
