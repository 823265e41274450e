"""``secagg predict``: a (global) model applied to a site's raw history, with its own scaler.

Small models on synthetic daily-cycle counts check the mechanics against references computed
here with the framework itself (windows, rows, de-scaling, persistence, columns, PyTorch, the
readout refit and its fit/score split). The last test is the whole way to a new site on real
data: sites with their own (standard and min-max) scalings, an ``auto`` merge, and a held-out
sensor that fits its own scaler on its own history.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from secagg import Scaler
from secagg.errors import ModelFormatError, ScalerError, SecAggError
from secagg.models import read_model
from secagg.predict import forecast

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

WINDOW = 8
REPO = Path(__file__).resolve().parents[1]


def keras():
    from secagg.models.keras_files import _quiet_import_keras

    return _quiet_import_keras()


def counts(seed: int, rows: int, level: float = 200.0, period: int = 12) -> np.ndarray:
    """Positive counts with a cycle of ``period`` rows and noise, like hourly pedestrian counts."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    return np.round(level * np.exp(np.sin(2 * np.pi * t / period + seed) + 0.1 * rng.standard_normal(rows)))


def windows(z: np.ndarray, window: int = WINDOW, horizon: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Windows of a 1-D normalized series and their targets ``horizon`` rows after each window's end."""
    n = len(z) - window - horizon + 1
    x = np.stack([z[i : i + window] for i in range(n)])[:, :, None]
    return x.astype(np.float32), z[window + horizon - 1 :].astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Keras LSTM(6) -> Dense(1) trained on one site's log1p-standardized counts; its scaler."""
    k = keras()
    raw = counts(0, 600)
    scaler = Scaler.fit(raw, "standard", log1p=True)
    x, y = windows(scaler.transform(raw))
    k.utils.set_random_seed(0)
    model = k.Sequential([k.Input((WINDOW, 1)), k.layers.LSTM(6, name="lstm"), k.layers.Dense(1, name="out")])
    model.compile(optimizer=k.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "site.keras"
    model.save(path)
    return path, scaler


def keras_predict(path: Path, x: np.ndarray) -> np.ndarray:
    model = keras().models.load_model(path, compile=False)
    return np.asarray(model(np.asarray(x, np.float32), training=False), np.float64)


def test_windows_rows_descaling_and_scores(trained):
    path, _ = trained
    raw = counts(3, 200, level=40.0)  # a new site, much quieter than the training site
    own = Scaler.fit(raw, "minmax", log1p=True)
    f = forecast(path, raw, own)

    x, _ = windows(own.transform(raw), horizon=0)  # every window, the last one included
    want = own.inverse(keras_predict(path, x)[:, 0])
    np.testing.assert_array_equal(f.row, np.arange(WINDOW, len(raw) + 1))
    np.testing.assert_allclose(f.forecast, want, rtol=1e-5)
    assert f.row[-1] == len(raw) and np.isnan(f.truth[-1])  # the last window forecasts the future
    np.testing.assert_array_equal(f.truth[:-1], raw[WINDOW:])
    np.testing.assert_array_equal(f.persistence, raw[WINDOW - 1 :])
    known = slice(0, -1)
    assert f.scores.rows == len(raw) - WINDOW
    assert f.scores.mae == pytest.approx(np.mean(np.abs(want[known] - raw[WINDOW:])), rel=1e-5)
    assert f.scores.rmse == pytest.approx(np.sqrt(np.mean((want[known] - raw[WINDOW:]) ** 2)), rel=1e-5)
    assert f.scores.persistence_mae == pytest.approx(np.mean(np.abs(raw[WINDOW - 1 : -1] - raw[WINDOW:])))
    assert f.summary()["future"] == 1 and f.summary()["window"] == WINDOW


def test_horizon_and_missing_values(trained):
    path, scaler = trained
    raw = counts(4, 120)
    raw[50] = np.nan
    f = forecast(path, raw, scaler, horizon=3)
    last = np.array([r for r in range(WINDOW - 1, len(raw)) if 50 not in range(r - WINDOW + 1, r + 1)])
    np.testing.assert_array_equal(f.row, last + 3)
    assert f.skipped_windows == WINDOW
    np.testing.assert_array_equal(f.persistence, raw[last])
    assert np.sum(f.row >= len(raw)) == 3 and f.summary()["future"] == 3
    assert f.scores.rows == np.sum(np.isfinite(f.truth))


def test_the_target_column_and_its_scaler_feature(trained):
    path, _ = trained
    raw = np.stack([counts(5, 150, level=900.0), counts(6, 150, level=30.0)], axis=1)
    scaler = Scaler.fit(raw, "standard", log1p=True)
    f = forecast(path, raw, scaler, column=1)
    x, _ = windows(scaler.feature(1).transform(raw[:, 1]), horizon=0)
    np.testing.assert_allclose(f.forecast, scaler.feature(1).inverse(keras_predict(path, x)[:, 0]), rtol=1e-5)
    np.testing.assert_array_equal(f.truth[:-1], raw[WINDOW:, 1])
    single = forecast(path, raw, scaler.feature(1), column=1)  # a one-feature scaler of that column: the same
    np.testing.assert_allclose(single.forecast, f.forecast)


def test_model_taking_every_column(tmp_path):
    k = keras()
    model = k.Sequential([k.Input((WINDOW, 2)), k.layers.LSTM(3), k.layers.Dense(1)])
    model.save(tmp_path / "two.keras")
    raw = np.stack([counts(7, 60), counts(8, 60, level=5.0)], axis=1)
    scaler = Scaler.fit(raw, "minmax")
    f = forecast(tmp_path / "two.keras", raw, scaler, column=1)
    z = scaler.transform(raw)
    x = np.stack([z[i : i + WINDOW] for i in range(len(raw) - WINDOW + 1)])
    want = scaler.inverse(keras_predict(tmp_path / "two.keras", x)[:, 0], feature=1)
    np.testing.assert_allclose(f.forecast, want, rtol=1e-5)
    assert f.input_features == 2
    with pytest.raises(ScalerError, match="the scaler maps 1 feature"):
        forecast(tmp_path / "two.keras", raw, scaler.feature(0))


def test_errors_name_the_fix(trained, tmp_path):
    path, scaler = trained
    raw = counts(1, 100)
    with pytest.raises(SecAggError, match="--window 12 but .* takes windows of 8 rows"):
        forecast(path, raw, scaler, window=12)
    with pytest.raises(SecAggError, match="history has 5 rows"):
        forecast(path, raw[:5], scaler)
    with pytest.raises(SecAggError, match="--column 2 does not exist"):
        forecast(path, raw, scaler, column=2)
    with pytest.raises(SecAggError, match="--adapted-out is written by --adapt"):
        forecast(path, raw, scaler, adapted_out=tmp_path / "a.keras")
    with pytest.raises(SecAggError, match="--adapt needs at least 20 windows"):
        forecast(path, raw[:40], scaler, adapt=True)
    with pytest.raises(ScalerError, match="needs values > -1"):
        forecast(path, raw - 1000, scaler)
    np.savez(tmp_path / "raw.npz", series=raw)
    with pytest.raises(ScalerError, match="needs an array 'values'"):
        forecast(path, tmp_path / "raw.npz", scaler)


# -- PyTorch -------------------------------------------------------------------------------------

TORCH_MODULE = '''
import torch


class Forecaster(torch.nn.Module):
    def __init__(self, units: int = 4):
        super().__init__()
        self.rnn = torch.nn.GRU(1, units, batch_first=True)
        self.norm = torch.nn.LayerNorm(units)
        self.head = torch.nn.Linear(units, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(self.norm(out[:, -1]))
'''


def test_pytorch_model_with_its_module(cli, tmp_path):
    import torch

    (tmp_path / "forecaster.py").write_text(TORCH_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import forecaster
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    module = forecaster.Forecaster(units=5).eval()
    torch.save(module.state_dict(), tmp_path / "global.pt")
    raw = counts(2, 100)
    scaler = Scaler.fit(raw, "standard", log1p=True)
    spec = f"{tmp_path / 'forecaster.py'}:Forecaster"
    with pytest.raises(SecAggError, match="give --window ROWS"):
        forecast(tmp_path / "global.pt", raw, scaler, torch_module=spec, torch_kwargs={"units": 5})
    with pytest.raises(ModelFormatError, match="--torch-model"):
        forecast(tmp_path / "global.pt", raw, scaler, window=6)
    f = forecast(tmp_path / "global.pt", raw, scaler, window=6, torch_module=spec, torch_kwargs={"units": 5})
    x = np.stack([scaler.transform(raw)[i : i + 6] for i in range(len(raw) - 5)])[:, :, None]
    with torch.no_grad():
        want = scaler.inverse(module(torch.from_numpy(x.astype(np.float32))).numpy()[:, 0].astype(np.float64))
    np.testing.assert_allclose(f.forecast, want, rtol=1e-5)

    np.savez(tmp_path / "raw.npz", values=raw)
    scaler.save(tmp_path / "own.json")
    proc = cli("predict", "--model", str(tmp_path / "global.pt"), "--data", str(tmp_path / "raw.npz"), "--scaler",
               str(tmp_path / "own.json"), "--window", "6", "--torch-model", spec, "--torch-kwargs", '{"units": 5}',
               "--adapt", "--adapted-out", str(tmp_path / "adapted.pt"), "--out", str(tmp_path / "f.npz"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["forecasts"] == len(raw) - 5 and report["adapt"]["adapted_out"] == str(tmp_path / "adapted.pt")
    with np.load(tmp_path / "f.npz") as out:
        np.testing.assert_allclose(out["forecast_global"], want, rtol=1e-5)
    adapted = read_model(tmp_path / "adapted.pt")
    original = module.state_dict()
    changed = [k for k in adapted if not np.array_equal(adapted[k], original[k].numpy())]
    assert set(changed) <= {"head.weight", "head.bias"}  # only the readout is refit


# -- --adapt -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def damped(trained, tmp_path_factory):
    """The trained model with its readout shrunk and shifted: right features, wrong readout."""
    path, scaler = trained
    tensors = read_model(path)
    tensors["out/kernel"] = tensors["out/kernel"] * 0.3
    tensors["out/bias"] = tensors["out/bias"] + 0.5
    from secagg.models import write_model

    return write_model(path, tensors, tmp_path_factory.mktemp("damped") / "damped.keras"), scaler


def test_adapt_refits_the_readout_out_of_sample(damped, tmp_path):
    path, scaler = damped
    raw = counts(9, 400)
    f = forecast(path, raw, scaler, adapt=True, adapted_out=tmp_path / "adapted.keras")
    a = f.adaptation
    known = np.flatnonzero(np.isfinite(f.truth))
    assert a.fit_rows == len(known) // 2 and a.first_scored_row == f.row[known[a.fit_rows]]
    assert a.scored.rows == len(known) - a.fit_rows
    assert a.ridge is not None
    assert a.scored.mae < 0.5 * a.scored_global.mae  # the refit readout undoes the damage
    held = known[a.fit_rows :]
    assert a.scored_global.mae == pytest.approx(np.mean(np.abs(f.forecast_global[held] - f.truth[held])))
    # The written model is the adapted one, and only its readout differs.
    x, _ = windows(scaler.transform(raw), horizon=0)
    np.testing.assert_allclose(scaler.inverse(keras_predict(tmp_path / "adapted.keras", x)[:, 0]), f.forecast,
                               rtol=1e-4)
    before, after = read_model(path), read_model(tmp_path / "adapted.keras")
    assert [k for k in after if not np.array_equal(after[k], before[k])] == ["out/kernel", "out/bias"]


def test_adapt_never_sees_the_scored_part(damped, tmp_path):
    """Changing the history after the fitting windows changes no adapted weight."""
    path, scaler = damped
    raw = counts(9, 400)
    f = forecast(path, raw, scaler, adapt=True, adapted_out=tmp_path / "a.keras")
    later = raw.copy()
    later[f.adaptation.first_scored_row :] *= 3.0
    g = forecast(path, later, scaler, adapt=True, adapted_out=tmp_path / "b.keras")
    assert g.adaptation.first_scored_row == f.adaptation.first_scored_row
    a, b = read_model(tmp_path / "a.keras"), read_model(tmp_path / "b.keras")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert g.adaptation.scored.mae != f.adaptation.scored.mae


def test_adapt_keeps_a_readout_that_is_already_right(trained):
    path, scaler = trained
    f = forecast(path, counts(0, 600), scaler, adapt=True)  # the training site's own series
    a = f.adaptation
    assert a.scored.mae <= 1.05 * a.scored_global.mae


def test_adapt_refuses_a_nonlinear_readout(tmp_path):
    k = keras()
    model = k.Sequential([k.Input((WINDOW, 1)), k.layers.LSTM(3), k.layers.Dense(1, activation="softplus")])
    model.save(tmp_path / "soft.keras")
    raw = counts(1, 100)
    with pytest.raises(ModelFormatError, match="softplus activation; only a linear readout"):
        forecast(tmp_path / "soft.keras", raw, Scaler.fit(raw), adapt=True)


def test_cli_predict(cli, trained, tmp_path):
    path, scaler = trained
    raw = counts(11, 150, level=60.0)
    np.savez(tmp_path / "raw.npz", values=raw[:, None])
    own = tmp_path / "own.json"
    proc = cli("scaler", "--local", "--data", str(tmp_path / "raw.npz"), "--kind", "standard", "--log1p",
               "--out", str(own))
    assert proc.returncode == 0, proc.stderr
    proc = cli("predict", "--model", str(path), "--data", str(tmp_path / "raw.npz"), "--scaler", str(own),
               "--out", str(tmp_path / "f.npz"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    f = forecast(path, raw, Scaler.load(own))
    assert report["forecasts"] == len(f.row) and report["last_row"] == len(raw) and report["adapt"] is None
    assert report["scores"]["mae"] == pytest.approx(f.scores.mae, rel=1e-6)
    with np.load(tmp_path / "f.npz") as out:
        assert set(out.files) == {"row", "forecast", "truth", "persistence"}
        np.testing.assert_allclose(out["forecast"], f.forecast, rtol=1e-6)

    proc = cli("predict", "--model", str(path), "--data", str(tmp_path / "raw.npz"), "--scaler",
               str(tmp_path / "missing.json"), "--out", str(tmp_path / "g.npz"))
    assert proc.returncode == 1 and proc.stdout == "" and not (tmp_path / "g.npz").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.json" in lines[0] and lines[0].startswith("secagg: error:")


# -- the way to a new site, on real data ------------------------------------------------------------

#: Training sites and their scalings (log1p, then standard or min-max), from quiet to busy.
SITES = (("1 Courthouse Lane", "standard"), ("183 K Road", "minmax"), ("19 Shortland Street", "standard"),
         ("45 Queen Street", "minmax"))
NEW_SITE = "30 Queen Street"  # held out: no site trained on it (a held-out sensor of benchmarks/merge_common)
#: The new site's raw data: 8 weeks before the benchmark's test period; the first 4 are its history.
NEW_ROWS = (35040, 35040 + 8 * 168)
HISTORY = 4 * 168
#: How much worse than persistence the global model may be at the new site (MAE).
PERSISTENCE_MARGIN = 1.15


@pytest.mark.slow
def test_global_model_at_a_new_site_on_real_data(tmp_path):
    sys.path.insert(0, str(REPO / "clients"))
    try:
        import forecast as fc
    finally:
        sys.path.remove(str(REPO / "clients"))
    from secagg.merge.simulate import simulate

    counts_df = fc.load_counts()
    sites, scalers = [], {}
    for i, (name, kind) in enumerate(SITES):
        raw = fc.sensor_series(counts_df, name)[slice(*fc.TRAIN_ROWS)]
        scalers[name] = Scaler.fit(raw, kind, log1p=True)
        z = scalers[name].transform(raw)
        targets = fc.subsample(fc.target_indices((0, len(raw))), 2000, seed=i)
        x, y = fc.make_windows(z, targets)
        fc.train_windows(x, y, seed=100 + i, epochs=4).save(tmp_path / f"site{i}.keras")
        fc.save_xy(tmp_path / f"site{i}.npz", x, y)
        sites.append((tmp_path / f"site{i}.keras", tmp_path / f"site{i}.npz"))
    # The sites' architecture: the assertions below are about how much an LSTM forecaster depends on its
    # scaler. A hybrid global model (auto's usual choice since issue 13) is less sensitive to a foreign
    # scaler used in and out (measured 1.18x instead of more than 1.3x here), thanks to its linear skip.
    simulate("auto", sites, tmp_path / "global.keras", workdir=tmp_path / "work", same_architecture=True)

    raw = fc.sensor_series(counts_df, NEW_SITE)[slice(*NEW_ROWS)]
    history = raw[:HISTORY]
    # A federation that mixed scalings: the new site fits each kind on its own history and keeps the
    # one the global model forecasts its history best with (README, "A global model at a new site").
    own = {kind: Scaler.fit(history, kind, log1p=True) for kind in ("standard", "minmax")}
    on_history = {kind: forecast(tmp_path / "global.keras", history, s).scores.mae for kind, s in own.items()}
    kind = min(on_history, key=on_history.get)

    result = forecast(tmp_path / "global.keras", raw, own[kind], adapt=True, adapt_fit=0.5,
                      adapted_out=tmp_path / "adapted.keras")
    a = result.adaptation
    later = a.scored_global  # the global model on the later half, never used for choosing or fitting
    known = np.isfinite(result.truth)
    z = own[kind].transform(result.forecast_global[known])  # its forecasts in its own normalized space
    foreign = {}
    for name, s in scalers.items():  # another site's scaler instead of its own:
        foreign[name] = (forecast(tmp_path / "global.keras", raw, s).scores.mae,  # to scale and de-scale
                         float(np.mean(np.abs(s.inverse(z) - result.truth[known]))))  # to de-scale only
    print(json.dumps({"kind": kind, "on_history": on_history, "global": later.mae, "adapted": a.scored.mae,
                      "persistence": later.persistence_mae, "all_rows": result.scores.mae, "foreign": foreign}))

    for scaled, descaled in foreign.values():
        assert scaled > 1.3 * result.scores.mae
        assert descaled > 2.5 * result.scores.mae  # the right shape at the wrong level
    assert later.mae <= PERSISTENCE_MARGIN * later.persistence_mae
    assert a.scored.mae <= 1.02 * later.mae  # adapting improves, or keeps
    assert a.scored.rows == later.rows == result.scores.rows - a.fit_rows
