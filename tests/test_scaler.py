"""The scaler format (``secagg.Scaler``) and ``secagg scaler``: local fits, shared rounds, refusals.

References are plain numpy formulas; the file format is checked through its JSON text and
through the three-line reimplementation the module docstring gives users.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import secagg
from secagg import Scaler
from secagg.errors import ScalerError, SecAggError
from secagg.merge.scaling import shared_scaler


@pytest.fixture
def counts(rng) -> np.ndarray:
    """Two features of hourly counts at very different levels (rows, features)."""
    return np.stack([rng.poisson(30, 500), rng.poisson(900, 500)], axis=1).astype(np.float64)


def test_standard_fit_is_mean_and_std_of_log1p(counts):
    s = Scaler.fit(counts, "standard", log1p=True)
    logs = np.log1p(counts)
    np.testing.assert_allclose(s.mean, logs.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.std, logs.std(axis=0), rtol=1e-12)
    z = s.transform(counts)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(s.inverse(z), counts, rtol=1e-10)
    assert s.rows == 500 and s.features == 2


def test_minmax_fit_maps_min_and_max_to_the_feature_range(counts):
    s = Scaler.fit(counts, "minmax", log1p=False, feature_range=(-1.0, 2.0))
    z = s.transform(counts)
    np.testing.assert_allclose(z.min(axis=0), -1.0, atol=1e-12)
    np.testing.assert_allclose(z.max(axis=0), 2.0, atol=1e-12)
    want = -1.0 + (counts - counts.min(axis=0)) / (counts.max(axis=0) - counts.min(axis=0)) * 3.0
    np.testing.assert_allclose(z, want, rtol=1e-12)
    np.testing.assert_allclose(s.inverse(z), counts, rtol=1e-10)
    logged = Scaler.fit(counts, "minmax", log1p=True)
    np.testing.assert_allclose(logged.min, np.log1p(counts).min(axis=0))
    np.testing.assert_allclose(logged.inverse(logged.transform(counts)), counts, rtol=1e-10)


def test_one_feature_of_several(counts):
    s = Scaler.fit(counts, "standard", log1p=True)
    busy = s.feature(1)
    assert busy.features == 1
    np.testing.assert_allclose(busy.transform(counts[:, 1]), s.transform(counts)[:, 1])
    np.testing.assert_allclose(s.inverse(np.zeros(3), feature=1), np.expm1(s.mean[1]))
    np.testing.assert_allclose(s.feature(-1).mean, s.mean[1:])
    with pytest.raises(ScalerError, match="feature 2 does not exist.*--column"):
        s.transform(counts[:, 0], feature=2)
    with pytest.raises(ScalerError, match="data has 3 feature.*scaler maps 2"):
        s.transform(np.ones((4, 3)))


def test_constant_feature_maps_to_a_constant():
    values = np.stack([np.full(10, 7.0), np.arange(10.0)], axis=1)
    for kind in ("standard", "minmax"):
        z = Scaler.fit(values, kind).transform(values)
        assert np.all(np.isfinite(z)) and np.ptp(z[:, 0]) == 0.0


def test_rows_with_nan_are_skipped_when_fitting(counts):
    gappy = counts.copy()
    gappy[[3, 70], 0] = np.nan
    s = Scaler.fit(gappy, "minmax")
    clean = np.delete(counts, [3, 70], axis=0)
    np.testing.assert_array_equal(s.min, clean.min(axis=0))
    assert s.rows == 498


@pytest.mark.parametrize("kind", ["standard", "minmax"])
def test_file_round_trip_and_json_fields(kind, counts, tmp_path):
    s = Scaler.fit(counts, kind, log1p=True)
    path = s.save(tmp_path / "s.json")
    d = json.loads(path.read_text())
    assert d["format"] == "secagg-scaler" and d["version"] == 1 and d["kind"] == kind and d["log1p"] is True
    assert d["rows"] == 500
    assert set(d) >= ({"mean", "std"} if kind == "standard" else {"min", "max", "feature_range"})
    back = Scaler.load(path)
    np.testing.assert_array_equal(back.transform(counts), s.transform(counts))
    assert back.kind == kind and back.rows == 500


@pytest.mark.parametrize("kind", ["standard", "minmax"])
def test_the_documented_three_line_reimplementation(kind, counts, tmp_path):
    """The module docstring's snippet, run as written, gives what Scaler.transform gives."""
    Scaler.fit(counts, kind, log1p=True, feature_range=(0.0, 1.0)).save(tmp_path / "s.json")
    doc = secagg.scaler.__doc__
    snippet = re.search(r"three lines::\n\n((?:    .*\n)+)", doc).group(1)
    code = "\n".join(line[4:] for line in snippet.splitlines())
    assert len(code.strip().splitlines()) == 3
    env = {"json": json, "np": np, "open": lambda p: open(tmp_path / p), "v": counts}
    exec(code, env)  # noqa: S102 - the documentation's own code
    np.testing.assert_allclose(env["z"], Scaler.load(tmp_path / "s.json").transform(counts), rtol=1e-12, atol=1e-12)


def test_reads_the_earlier_mean_std_files(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"mean": 3.0, "std": 0.5, "log1p": True, "site_rows": 12}))
    s = Scaler.load(tmp_path / "old.json")
    assert s.kind == "standard" and s.log1p and s.features == 1
    np.testing.assert_allclose(s.inverse(np.array([0.0, 2.0])), np.expm1([3.0, 4.0]))
    (tmp_path / "lists.json").write_text(json.dumps({"mean": [1.0, 2.0], "std": [2.0, 4.0]}))
    s = Scaler.load(tmp_path / "lists.json")
    assert not s.log1p
    np.testing.assert_allclose(s.transform(np.array([[3.0, 6.0]])), [[1.0, 1.0]])


@pytest.mark.parametrize("content, message", [
    ("not json", "must be JSON"),
    ("[1, 2]", "a scaler is a JSON object"),
    ({"mean": 1.0}, r"missing \['std'\]"),
    ({"version": 2, "kind": "standard", "mean": [0], "std": [1]}, "unsupported scaler version 2"),
    ({"version": 1, "kind": "robust", "mean": [0], "std": [1]}, "'standard' or 'minmax', got 'robust'"),
    ({"version": 1, "kind": "minmax", "min": [0]}, r"missing \['max'\]"),
    ({"version": 1, "kind": "standard", "mean": [0, 1], "std": [1]}, "2 means but 1 stds"),
    ({"version": 1, "kind": "standard", "mean": [0], "std": [0]}, "'std' must be positive"),
    ({"version": 1, "kind": "standard", "mean": ["a"], "std": [1]}, "'mean' must be a number"),
    ({"version": 1, "kind": "standard", "mean": [float("nan")], "std": [1]}, "NaN or infinite"),
    ({"version": 1, "kind": "minmax", "min": [5], "max": [5]}, "'max' must exceed 'min'"),
    ({"version": 1, "kind": "minmax", "min": [0], "max": [1], "feature_range": [1, 0]}, "lo < hi"),
    ({"version": 1, "kind": "standard", "mean": [0], "std": [1], "log1p": "yes"}, "'log1p' must be true or false"),
    ({"version": 1, "kind": "standard", "mean": [0], "std": [1], "rows": -3}, "'rows' must be a non-negative"),
])
def test_bad_files_are_refused_with_the_file_name(content, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ScalerError, match=message) as info:
        Scaler.load(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, SecAggError)


def test_missing_file_and_log1p_of_negative_values(tmp_path):
    with pytest.raises(ScalerError, match="cannot read the scaler file .*nope.json"):
        Scaler.load(tmp_path / "nope.json")
    with pytest.raises(ScalerError, match="log1p scaling needs values > -1"):
        Scaler.fit(np.array([1.0, -2.0]), log1p=True)
    s = Scaler.fit(np.array([1.0, 5.0]), log1p=True)
    with pytest.raises(ScalerError, match="needs values > -1"):
        s.transform(np.array([-3.0]))
    with pytest.raises(ScalerError, match="no finite rows"):
        Scaler.fit(np.array([np.nan, np.inf]))


def test_shared_minmax_is_refused_before_any_round(counts):
    protocol = shared_scaler(counts, log1p=True, kind="minmax")
    with pytest.raises(ScalerError, match="cannot give a maximum.*--kind standard.*--local"):
        next(protocol)


# -- the command -----------------------------------------------------------------------------------


@pytest.fixture
def raw_file(counts, tmp_path):
    path = tmp_path / "raw.npz"
    np.savez(path, values=counts)
    return path


def test_cli_local_scalers(cli, raw_file, counts, tmp_path):
    out = tmp_path / "own.json"
    proc = cli("scaler", "--local", "--data", str(raw_file), "--kind", "minmax", "--log1p", "--feature-range", "0",
               "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["shared"] is False and report["kind"] == "minmax" and report["site_rows"] == 500
    s = Scaler.load(out)
    np.testing.assert_allclose(s.transform(counts).max(axis=0), 2.0)
    np.testing.assert_allclose(s.min, np.log1p(counts).min(axis=0))

    proc = cli("scaler", "--local", "--data", str(raw_file), "--out", str(tmp_path / "std.json"))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(Scaler.load(tmp_path / "std.json").mean, counts.mean(axis=0))


@pytest.mark.parametrize("args, message", [
    (["--kind", "minmax", "--server", "127.0.0.1:1", "--round", "s", "--key", "k", "--client-id", "a",
      "--clients", "3"], "a shared min-max scaler needs the minimum and maximum over all sites"),
    (["--server", "127.0.0.1:1"], "a shared scaler needs --round, --key, --client-id, --clients; or .* --local"),
    (["--local", "--server", "127.0.0.1:1"], "--local fits this site's own scaler without an aggregator; drop "
                                             "--server"),
    (["--local", "--feature-range", "0", "1"], "--feature-range applies to --kind minmax only"),
])
def test_cli_refusals(cli, raw_file, tmp_path, args, message):
    proc = cli("scaler", "--data", str(raw_file), "--out", str(tmp_path / "s.json"), *args)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secagg: error:") and re.search(message, lines[0]), proc.stderr
    assert not (tmp_path / "s.json").exists()


def test_cli_bad_raw_file(cli, tmp_path):
    np.savez(tmp_path / "raw.npz", counts=np.ones(4))
    proc = cli("scaler", "--local", "--data", str(tmp_path / "raw.npz"), "--out", str(tmp_path / "s.json"))
    assert proc.returncode == 1 and "needs an array 'values'" in proc.stderr and "['counts']" in proc.stderr


def test_cli_shared_standard_scaler_through_an_aggregator(cli_popen, server, keypair, rng, tmp_path):
    """Three sites run `secagg scaler`; every one writes the same new-format file: the pooled statistics."""
    values = [rng.poisson(lam, size=(n, 2)).astype(float) for lam, n in ((20, 300), (200, 500), (900, 410))]
    procs = []
    for i, v in enumerate(values):
        np.savez(tmp_path / f"raw{i}.npz", values=v)
        procs.append(cli_popen("scaler", "--server", server.address, "--round", "s1", "--key", str(keypair.client),
                               "--client-id", f"site{i}", "--data", str(tmp_path / f"raw{i}.npz"), "--clients", "3",
                               "--log1p", "--wait", "60", "--out", str(tmp_path / f"s{i}.json"),
                               # The row counts are the weights: a max weight close to them keeps the release
                               # grid (secagg.release) fine enough for 1e-6 (the default 1e5 gives ~1e-5).
                               "--max-weight", "500"))
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert json.loads(out)["site_rows"] == len(values[i]) and json.loads(out)["shared"] is True
    pooled = np.log1p(np.concatenate(values))
    for i in range(3):
        s = Scaler.load(tmp_path / f"s{i}.json")
        assert s.kind == "standard" and s.log1p
        np.testing.assert_allclose(s.mean, pooled.mean(axis=0), atol=1e-6)
        np.testing.assert_allclose(s.std, pooled.std(axis=0), atol=1e-6)
