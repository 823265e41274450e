"""Tests of the demo's forecasting helpers (clients/forecast.py) and the end-to-end demo."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
sys.path.insert(0, str(CLIENTS))

import forecast  # noqa: E402


@pytest.fixture(scope="module")
def counts() -> pd.DataFrame:
    return forecast.load_counts()


def make_site(z: np.ndarray, rows: tuple[int, int], window: int = 24, horizon: int = 1
              ) -> forecast.SiteData:
    targets = forecast.target_indices(rows, window, horizon)
    return forecast.SiteData("s", forecast.SiteScaler(0.0, 1.0), np.asarray(z, np.float64),
                             targets, targets, window, horizon)


# ── data ────────────────────────────────────────────────────────────────────────────────────


def test_loader_shape_and_order(counts: pd.DataFrame) -> None:
    assert counts.shape == (61367, 21)
    assert list(counts.columns[:2]) == ["1 Courthouse Lane", "107 Quay Street"]
    raw = pd.read_csv(forecast.data_path(), nrows=2)
    assert counts.iloc[1]["107 Quay Street"] == raw.iloc[1]["107 Quay Street"] == 145.0


def test_clean_sensors(counts: pd.DataFrame) -> None:
    clean = forecast.clean_sensors(counts)
    assert len(clean) == 18
    assert "107 Quay Street" not in clean
    assert "188 Quay Street Lower Albert (EW)" not in clean
    for s in clean:
        assert not np.isnan(forecast.sensor_series(counts, s)).any()


def test_interpolation_fills_small_gaps() -> None:
    df = pd.DataFrame({"a": [1.0, np.nan, 3.0, np.nan, np.nan, 6.0, np.nan]})
    np.testing.assert_allclose(forecast.sensor_series(df, "a"), [1, 2, 3, 4, 5, 6, 6])


def test_pick_sensors_deterministic_and_disjoint() -> None:
    names = [f"s{i}" for i in range(18)]
    a = forecast.pick_sensors(names, 8, 4, seed=0)
    assert a == forecast.pick_sensors(names, 8, 4, seed=0)
    train, held = a
    assert len(train) == 8 and len(held) == 4 and not set(train) & set(held)
    with pytest.raises(ValueError):
        forecast.pick_sensors(names, 10, 9)


# ── scaling ─────────────────────────────────────────────────────────────────────────────────


def test_scaler_round_trip_and_standardizes_train() -> None:
    rng = np.random.default_rng(0)
    x = rng.poisson(200, size=1000).astype(np.float64)
    sc = forecast.SiteScaler.fit(x[:600])
    z = sc.transform(x)
    assert abs(z[:600].mean()) < 1e-12 and abs(z[:600].std() - 1) < 1e-12
    np.testing.assert_allclose(sc.inverse(z), x, rtol=1e-12, atol=1e-9)
    assert sc.mean == pytest.approx(np.log1p(x[:600]).mean())


def test_scaler_constant_series_does_not_divide_by_zero() -> None:
    sc = forecast.SiteScaler.fit(np.full(10, 5.0))
    assert sc.std == 1.0
    np.testing.assert_allclose(sc.transform(np.full(3, 5.0)), 0.0)


def test_prepare_site_uses_training_period_only(counts: pd.DataFrame) -> None:
    d = forecast.prepare_site(counts, "45 Queen Street", train_rows=(0, 1000), test_rows=(2000, 2100))
    raw = forecast.sensor_series(counts, "45 Queen Street")
    assert d.scaler.mean == pytest.approx(np.log1p(raw[:1000]).mean())
    assert d.train_targets[0] == 24 and d.train_targets[-1] == 999
    assert d.test_targets[0] == 2000 and d.test_targets[-1] == 2099


# ── windowing ───────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("window,horizon", [(24, 1), (5, 3), (1, 1)])
def test_windows_align_with_targets(window: int, horizon: int) -> None:
    z = np.arange(100, dtype=np.float64)
    t = forecast.target_indices((0, 100), window, horizon)
    assert t[0] == window + horizon - 1 and t[-1] == 99
    x, y = forecast.make_windows(z, t, window, horizon)
    assert x.shape == (len(t), window, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(y, t)
    np.testing.assert_array_equal(x[:, -1, 0], t - horizon)  # last input is H hours before
    np.testing.assert_array_equal(x[:, 0, 0], t - horizon - window + 1)
    np.testing.assert_array_equal(np.diff(x[:, :, 0], axis=1), 1)


def test_test_windows_reach_back_before_split() -> None:
    z = np.arange(50, dtype=np.float64)
    x, y = forecast.make_windows(z, forecast.target_indices((30, 40)), 24, 1)
    assert y[0] == 30 and x[0, 0, 0] == 6


def test_subsample_sorted_subset() -> None:
    t = np.arange(1000)
    s = forecast.subsample(t, 100, seed=1)
    assert len(s) == 100 and np.all(np.diff(s) > 0) and set(s) <= set(t)
    np.testing.assert_array_equal(s, forecast.subsample(t, 100, seed=1))
    assert forecast.subsample(t, None, 0) is t


# ── baselines and metrics ───────────────────────────────────────────────────────────────────


def test_rmse() -> None:
    assert forecast.rmse(np.array([1.0, 2.0]), np.array([1.0, 4.0])) == pytest.approx(math.sqrt(2))


def test_persistence_on_known_series() -> None:
    z = np.array([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])
    d = make_site(z, (2, 6), window=2, horizon=1)  # targets 2..5, last values 1, 3, 6, 10
    assert forecast.persistence_nrmse(d) == pytest.approx(math.sqrt((4 + 9 + 16 + 25) / 4))
    d3 = make_site(z, (4, 6), window=1, horizon=3)  # targets 4, 5 from values at 1, 2
    assert forecast.persistence_nrmse(d3) == pytest.approx(math.sqrt((81 + 144) / 2))


def test_same_hour_yesterday() -> None:
    daily = np.tile(np.sin(np.arange(24)), 5)
    assert forecast.same_hour_yesterday_nrmse(make_site(daily, (30, 120))) == pytest.approx(0.0)
    trend = np.arange(120, dtype=np.float64)
    assert forecast.same_hour_yesterday_nrmse(make_site(trend, (30, 120))) == pytest.approx(24.0)
    with pytest.raises(ValueError):
        forecast.same_hour_yesterday_nrmse(make_site(trend, (60, 120), window=24, horizon=25))


# ── model (imports TensorFlow) ──────────────────────────────────────────────────────────────


def test_lstm_seeded_named_and_ensemble() -> None:
    a, b, a2 = forecast.build_lstm(1), forecast.build_lstm(2), forecast.build_lstm(1)
    assert [w.path for w in a.weights] == [w.path for w in b.weights]  # same names every build
    assert a.count_params() == 4 * (32 * (1 + 32 + 1)) + 33
    for wa, wa2 in zip(a.get_weights(), a2.get_weights()):
        np.testing.assert_array_equal(wa, wa2)
    assert not np.array_equal(a.get_weights()[0], b.get_weights()[0])
    z = np.sin(np.arange(200) / 3.0)
    d = make_site(z, (100, 200))
    x, y = d.test_xy()
    pa, pb = forecast.predict(a, x), forecast.predict(b, x)
    np.testing.assert_allclose(pa, a.predict(x, verbose=0).reshape(-1), rtol=1e-5, atol=1e-6)
    assert forecast.ensemble_nrmse([a, b], d) == pytest.approx(forecast.rmse((pa + pb) / 2, y))
    assert forecast.model_nrmse(a, d) == pytest.approx(forecast.rmse(pa, y))


# ── end to end ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.slow
def test_demo_quick(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    plot = tmp_path / "forecast.png"
    proc = subprocess.run([sys.executable, str(CLIENTS / "demo.py"), "--quick", "--report",
                           str(report), "--plot", str(plot)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rep = json.loads(report.read_text())
    assert rep["max_abs_diff"] < 1e-6
    assert set(rep["nrmse"]) == {"local_own", "encrypted_average", "encrypted_auto", "plaintext_average",
                                 "output_ensemble", "local_transferred", "persistence",
                                 "same_hour_yesterday"}
    held, train = rep["heldout_sensors"], rep["train_sensors"]
    for key, row in rep["nrmse"].items():
        groups = {"train"} if key == "local_own" else {"heldout"} if key == "local_transferred" \
            else {"heldout", "train"}
        for g, sensors in (("heldout", held), ("train", train)):
            assert (set(row[g]) == set(sensors)) == (g in groups), (key, g)
            assert all(math.isfinite(v) and v >= 0 for v in row[g].values())
    assert rep["wire_bytes_per_param"] > 0
    assert len(rep["receipts"]) == len(train)
    for stage in ("keygen", "serve_start", "round_create", "encrypt_submit_total",
                  "aggregate_close", "fetch_decrypt", "total"):
        assert stage in rep["seconds"]
    assert "encrypted weight average" in proc.stdout
    # The recommended merge ran through its encrypted rounds and chose one of its candidates.
    assert rep["auto"]["encrypted_steps"] >= 5 and rep["auto"]["chosen"] in rep["auto"]["scores"]["candidates"]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sc = rep["descaling_mae_people_per_hour"]
    assert sc["other_site_scaler_mae"] > sc["own_scaler_mae"]
