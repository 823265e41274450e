"""Tests of the PyTorch site program (clients/torch_site.py) and its forecast.py helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
sys.path.insert(0, str(CLIENTS))

import forecast  # noqa: E402
import torch_site  # noqa: E402

SENSOR = "45 Queen Street"
KEYS = ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
        "head.weight", "head.bias"]


def test_torch_lstm_convention_and_seeding() -> None:
    a, b, a2 = (forecast.build_torch_lstm(s) for s in (1, 2, 1))
    state = a.state_dict()
    assert list(state) == KEYS
    assert state["lstm.weight_ih_l0"].shape == (128, 1)
    assert state["head.weight"].shape == (1, 32)
    assert a.lstm.batch_first
    n_keras = 4 * (32 * (1 + 32 + 1)) + 33  # forecast.build_lstm(...).count_params()
    assert sum(v.numel() for v in state.values()) == n_keras + 4 * 32  # torch: two bias vectors
    for k in KEYS:
        torch.testing.assert_close(state[k], a2.state_dict()[k])
    assert not torch.equal(state["lstm.weight_ih_l0"], b.state_dict()["lstm.weight_ih_l0"])


def test_forward_uses_last_time_step() -> None:
    m = forecast.build_torch_lstm(0)
    x = np.random.default_rng(0).normal(size=(5, 24, 1)).astype(np.float32)
    with torch.no_grad():
        out, _ = m.lstm(torch.from_numpy(x))
        expected = m.head(out[:, -1]).numpy().reshape(-1)
    np.testing.assert_allclose(forecast.predict_torch(m, x), expected, rtol=1e-6, atol=1e-7)
    assert forecast.predict_torch(m, x[:0]).shape == (0,)


def test_train_torch_learns_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8, 1)).astype(np.float32)
    y = x[:, -1, 0] * 0.8  # the last value, scaled
    m1 = forecast.train_torch(forecast.build_torch_lstm(3), x, y,
                              seed=3, epochs=8, batch_size=32, lr=1e-2)
    m2 = forecast.train_torch(forecast.build_torch_lstm(3), x, y,
                              seed=3, epochs=8, batch_size=32, lr=1e-2)
    before = forecast.rmse(forecast.predict_torch(forecast.build_torch_lstm(3), x), y)
    after = forecast.rmse(forecast.predict_torch(m1, x), y)
    assert after < 0.5 * before
    np.testing.assert_array_equal(forecast.predict_torch(m1, x), forecast.predict_torch(m2, x))


def test_save_xy_shapes_and_validation(tmp_path: Path) -> None:
    x = np.zeros((4, 24, 1), np.float64)
    path = forecast.save_xy(tmp_path / "d" / "site.data", x, np.arange(4))
    assert path.name == "site.data"  # no ".npz" appended
    with np.load(path) as f:
        assert f["x"].dtype == np.float32 and f["x"].shape == (4, 24, 1)
        assert f["y"].dtype == np.float32 and f["y"].shape == (4, 1)
    with pytest.raises(ValueError):
        forecast.save_xy(tmp_path / "bad.npz", x[:, :, 0], np.arange(4))
    with pytest.raises(ValueError):
        forecast.save_xy(tmp_path / "bad.npz", x, np.arange(3))


def test_rows_xy_and_lag_forecast() -> None:
    z = np.arange(400, dtype=np.float64)
    targets = forecast.target_indices((200, 400))
    d = forecast.SiteData("s", forecast.SiteScaler(0.0, 1.0), z, targets, targets)
    x, y = forecast.rows_xy(d, (100, 150))
    np.testing.assert_array_equal(y, np.arange(100, 150))
    np.testing.assert_array_equal(x[:, -1, 0], y - 1)
    assert len(forecast.rows_xy(d, (100, 150), max_n=7)[1]) == 7
    np.testing.assert_array_equal(forecast.lag_forecast(d, 168), targets - 168)
    assert forecast.same_hour_last_week_nrmse(d) == pytest.approx(168.0)
    with pytest.raises(ValueError):
        forecast.lag_forecast(d, 0)
    with pytest.raises(ValueError):
        forecast.lag_forecast(d, 300)


def test_site_program_trains_saves_and_exports(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out, data_out = tmp_path / "site.pt", tmp_path / "site.npz"
    rc = torch_site.main(["--sensor", SENSOR, "--out", str(out), "--data-out", str(data_out),
                          "--epochs", "1", "--max-train", "300", "--seed", "7"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "samples=300" in stdout.splitlines()[-1]
    state = torch.load(out, weights_only=True)
    assert list(state) == KEYS
    with np.load(data_out) as f:
        x, y = f["x"], f["y"]
    assert x.shape == (300, 24, 1) and y.shape == (300, 1) and x.dtype == np.float32
    # the exported windows are the site's own normalized training windows
    counts = forecast.load_counts()
    d = forecast.prepare_site(counts, SENSOR, max_train=300, seed=7)
    xt, yt = d.train_xy()
    np.testing.assert_array_equal(x, xt)
    np.testing.assert_array_equal(y[:, 0], yt)
    model = forecast.load_torch_lstm(out)
    assert np.isfinite(forecast.predict_torch(model, x)).all()
    import secagg

    assert set(secagg.read_model(out)) == set(KEYS)


def test_site_program_rejects_unknown_sensor_and_partial_submit(tmp_path: Path) -> None:
    assert torch_site.main(["--sensor", "nowhere", "--out", str(tmp_path / "a.pt")]) == 2
    with pytest.raises(SystemExit):
        torch_site.parse_args(["--sensor", SENSOR, "--out", "a.pt", "--server", "x:1"])
