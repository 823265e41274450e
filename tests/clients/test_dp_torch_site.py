"""Tests of the differentially private PyTorch site program (clients/dp_torch_site.py)."""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.analysis import rdp as rdp_analysis  # noqa: E402
from opacus.layers import DPLSTM  # noqa: E402

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
sys.path.insert(0, str(CLIENTS))

import dp_torch_site  # noqa: E402
import forecast  # noqa: E402
import torch_site  # noqa: E402

import secagg  # noqa: E402
from secagg.packing import ModelSpec  # noqa: E402

SENSOR = "45 Queen Street"
KEYS = ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
        "head.weight", "head.bias"]
# A small real slice: 256 training windows, 2 epochs of expected batch 64 -> 8 noisy steps.
SMALL = ["--sensor", SENSOR, "--max-train", "256", "--max-val", "512", "--epochs", "2",
         "--batch-size", "64", "--seed", "11"]


@pytest.fixture(scope="module")
def val_windows() -> np.ndarray:
    data = forecast.prepare_site(forecast.load_counts(), SENSOR)
    return forecast.rows_xy(data, forecast.VAL_ROWS, max_n=512, seed=0)[0]


def run_site(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[dict, str]:
    """Run the program in-process; its JSON summary (last line) and the whole stdout."""
    assert dp_torch_site.main(list(args)) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of the subsampled Gaussian mechanism, straight from opacus's RDP analysis."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                                   orders=orders)
    return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def test_conversion_to_nn_lstm_preserves_outputs(val_windows: np.ndarray, tmp_path: Path) -> None:
    dp = dp_torch_site.build_dp_lstm(5)
    assert isinstance(dp.lstm, DPLSTM)
    with torch.no_grad():  # move away from the shared initialization: every tensor matters
        gen = torch.Generator().manual_seed(0)
        for p in dp.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model = dp_torch_site.torch_from_dp(dp)
    assert isinstance(model.lstm, torch.nn.LSTM) and model.lstm.batch_first
    state = model.state_dict()
    assert list(state) == KEYS
    # each tensor is the one opacus itself names so (DPLSTM renames l0.ih.weight -> weight_ih_l0)
    for name, tensor in dp.lstm.state_dict().items():
        assert torch.equal(state[f"lstm.{name}"], tensor), name
    reference = forecast.build_torch_lstm(0).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}

    # float32, as saved: the two implementations round differently, but only just
    pred = forecast.predict_torch(model, val_windows)
    assert pred.std() > 0.05  # not a constant: the test below could not miss a gate mix-up
    assert dp_torch_site.conversion_error(dp, model, val_windows) < 5e-6
    # float64: the conversion itself is exact
    xt = torch.from_numpy(val_windows.astype(np.float64))
    with torch.no_grad():
        diff = (copy.deepcopy(dp).double()(xt) - copy.deepcopy(model).double()(xt)).abs().max()
    assert float(diff) < 1e-12

    back = dp_torch_site.dp_from_torch(model)
    for (name, a), b in zip(dp.named_parameters(), back.parameters()):
        assert torch.equal(a, b), name
    # the file has the ordinary torch site's architecture, so a torch-site round accepts it
    torch.save(state, tmp_path / "dp.pt")
    torch.save(reference, tmp_path / "plain.pt")
    assert (ModelSpec.of(secagg.read_model(tmp_path / "dp.pt"))
            == ModelSpec.of(secagg.read_model(tmp_path / "plain.pt")))


def test_initialization_matches_the_torch_site() -> None:
    dp = dp_torch_site.build_dp_lstm(3)
    plain = forecast.build_torch_lstm(3).state_dict()
    for name, tensor in dp_torch_site.torch_from_dp(dp).state_dict().items():
        assert torch.equal(tensor, plain[name]), name


def test_epsilon_is_the_accountants_and_falls_with_more_noise(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    low, out = run_site(capsys, *SMALL, "--out", str(tmp_path / "low.pt"),
                        "--noise-multiplier", "0.8")
    high, _ = run_site(capsys, *SMALL, "--out", str(tmp_path / "high.pt"),
                       "--noise-multiplier", "1.6")
    for s, noise in ((low, 0.8), (high, 1.6)):
        assert s["accountant"] == "rdp" and s["delta"] == 1e-5 and s["max_grad_norm"] == 1.0
        assert s["noise_multiplier"] == noise
        assert s["samples"] == 256 and s["sample_rate"] == 1 / 4 and s["steps"] == 2 * 4
        assert math.isfinite(s["epsilon"]) and s["epsilon"] > 0
        assert s["epsilon"] == pytest.approx(
            rdp_epsilon(s["noise_multiplier"], s["sample_rate"], s["steps"], s["delta"]),
            rel=1e-9)
        assert s["conversion_max_abs_diff"] < 5e-6
    assert high["epsilon"] < low["epsilon"]
    assert f"epsilon = {low['epsilon']:.4g} at delta = 1e-05 (RDP accountant" in out
    assert "samples=256" in out

    # the printed validation error is the saved file's, on the site's validation windows
    data = forecast.prepare_site(forecast.load_counts(), SENSOR, max_train=256, seed=11)
    xv, yv = forecast.rows_xy(data, forecast.VAL_ROWS, max_n=512, seed=11)
    model = forecast.load_torch_lstm(tmp_path / "low.pt")
    assert forecast.rmse(forecast.predict_torch(model, xv), yv) == pytest.approx(
        low["val_nrmse"], rel=1e-6)
    assert list(torch.load(tmp_path / "low.pt", weights_only=True)) == KEYS


def test_target_epsilon_chooses_the_noise(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    s, _ = run_site(capsys, *SMALL, "--out", str(tmp_path / "t.pt"), "--target-epsilon", "3")
    assert s["target_epsilon"] == 3.0
    assert 3.0 - 0.01 <= s["epsilon"] <= 3.0  # opacus's search tolerance
    assert s["epsilon"] == pytest.approx(
        rdp_epsilon(s["noise_multiplier"], s["sample_rate"], s["steps"], s["delta"]), rel=1e-9)


def test_rejects_unknown_sensor_and_bad_options(tmp_path: Path) -> None:
    assert dp_torch_site.main(["--sensor", "nowhere", "--out", str(tmp_path / "a.pt")]) == 2
    for bad in (["--server", "x:1"], ["--noise-multiplier", "0"], ["--delta", "1"],
                ["--batch-size", "0"]):
        with pytest.raises(SystemExit):
            dp_torch_site.parse_args(["--sensor", SENSOR, "--out", "a.pt", *bad])


def samples(stdout: str) -> float:
    return float(re.findall(r"^samples=(\d+)$", stdout, flags=re.MULTILINE)[-1])


@pytest.mark.slow
def test_dp_site_joins_a_torch_site_round(server, keypair, helpers, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    a, b, dp = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "dp.pt"
    assert torch_site.main(["--sensor", "150 K Road", "--out", str(a), "--epochs", "1",
                            "--max-train", "200", "--seed", "1"]) == 0
    weight_a = samples(capsys.readouterr().out)
    # an ordinary torch site's model is the round's template
    secagg.create_round(server.address, "r1", template=a, clients=3)
    secagg.submit(server.address, "r1", key=keypair.client, client_id="site-a", model=a,
                  weight=weight_a)
    submit = ["--server", server.address, "--round", "r1", "--key", str(keypair.client)]
    assert torch_site.main(["--sensor", "210 Queen Street", "--out", str(b), "--epochs", "1",
                            "--max-train", "250", "--seed", "2", *submit,
                            "--client-id", "site-b"]) == 0
    weight_b = samples(capsys.readouterr().out)
    summary, out = run_site(capsys, *SMALL, "--out", str(dp), *submit, "--client-id", "site-dp")
    assert "submitted to" in out

    out_path = secagg.fetch(server.address, "r1", keypair.client, template=a,
                            out=tmp_path / "global.pt", wait=30)
    models = [secagg.read_model(p) for p in (a, b, dp)]
    weights = [weight_a, weight_b, float(summary["samples"])]
    assert weights == [200.0, 250.0, 256.0]
    expected = helpers.weighted_average(models, weights)
    fetched = secagg.read_model(out_path)
    assert list(fetched) == KEYS
    helpers.assert_close_to_average(fetched, expected, atol=1e-6)
    # and the DP model really moved the average (it is not silently dropped)
    without_dp = helpers.weighted_average(models[:2], weights[:2])
    assert max(float(np.max(np.abs(fetched[k] - without_dp[k]))) for k in KEYS) > 1e-3
    global_model = forecast.load_torch_lstm(out_path)
    data = forecast.prepare_site(forecast.load_counts(), SENSOR, max_test=200)
    assert np.isfinite(forecast.predict_torch(global_model, data.test_xy()[0])).all()
