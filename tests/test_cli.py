"""The ``secagg`` command, run as a subprocess against a ``secagg serve`` subprocess.

The contract: every command exits 0 on success and non-zero with exactly one line on stderr
otherwise; ``round status`` prints JSON with state, submitted and expected; ``fetch`` writes the
weighted average as a model file of the template's format.
"""

from __future__ import annotations

import json
import stat
import subprocess
import threading
import types

import numpy as np
import pytest

import secagg

# Round mechanics with two clients need the aggregator's minimum cohort lowered (default 3, tested in
# tests/privacy/test_cohort.py).
SMALL_COHORT = ("--min-cohort", "1")
COMMANDS = [[], ["keygen"], ["serve"], ["round"], ["round", "create"], ["round", "status"], ["round", "cancel"],
            ["round", "list"], ["submit"], ["fetch"]]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def one_line_error(proc: subprocess.CompletedProcess, match: str) -> str:
    """A failed command: non-zero exit, and stderr is exactly one line naming the problem."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("secagg: error: "), lines[0]
    assert match in lines[0], f"{match!r} not in {lines[0]!r}"
    return lines[0]


def status(cli, address, round_id="r1") -> dict:
    s = json.loads(ok(cli("round", "status", "--server", address, "--round", round_id)).stdout)
    assert {"state", "submitted", "expected"} <= s.keys()
    return s


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a background command; its CompletedProcess."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_round(cli, address, key_dir, round_id, paths, weights, template, out, popen=None, create_args=(),
              fetch_args=()):
    """round create, one submit per model (optionally all at once), then fetch; returns the status JSONs
    seen after each submission and the round as created (its limits: see :func:`limits`)."""
    created = json.loads(ok(cli("round", "create", "--server", address, "--round", round_id, "--clients",
                                str(len(paths)), "--template", str(template), *create_args)).stdout)
    assert (created["state"], created["submitted"], created["expected"]) == ("collecting", 0, len(paths))
    args = [["submit", "--server", address, "--round", round_id, "--key", str(key_dir / "client.key"),
             "--client-id", f"site-{i}", "--model", str(p), "--weight", str(w)]
            for i, (p, w) in enumerate(zip(paths, weights))]
    seen = []
    if popen is not None:  # all clients at once
        for proc in [popen(*a) for a in args]:
            ok(finish(proc))
    else:
        for i, a in enumerate(args):
            receipt = json.loads(ok(cli(*a)).stdout)
            assert receipt["submitted"] == i + 1 and receipt["already_accepted"] is False
            seen.append(status(cli, address, round_id))
    final = status(cli, address, round_id)
    assert (final["state"], final["submitted"], final["expected"]) == ("closed", len(paths), len(paths))
    fetched = json.loads(ok(cli("fetch", "--server", address, "--round", round_id, "--key",
                                str(key_dir / "client.key"), "--template", str(template), "--out", str(out),
                                *fetch_args)).stdout)
    assert fetched["out"] == str(out) and out.is_file()
    return seen, created


def limits(created: dict):
    """What helpers.release_tolerance needs of a round: its expected clients, max weight and value bound.

    A released average is exact within the round's release grid; where the max weight is of the order
    of the weights (``--max-weight`` below, or sample-count weights) that is also within the old 1e-6.
    """
    return types.SimpleNamespace(expected=created["expected"], max_weight=created["max_weight"],
                                 value_bound=created["value_bound"])


@pytest.fixture
def keydir(keypair):
    return keypair.client.parent


# -- help and keygen ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "secagg")
def test_help(cli, command):
    proc = ok(cli(*command, "--help"))
    assert proc.stdout.startswith("usage: secagg") and proc.stderr == ""


def test_keygen(cli, tmp_path):
    out = tmp_path / "keys"
    info = json.loads(ok(cli("keygen", "--out", str(out))).stdout)
    assert stat.S_IMODE((out / "client.key").stat().st_mode) == 0o600
    assert (out / "server.key").is_file()
    assert info["key_id"] == secagg.load_client_key(out / "client.key").key_id
    before = (out / "client.key").read_bytes()
    one_line_error(cli("keygen", "--out", str(out)), "already exists")
    assert (out / "client.key").read_bytes() == before
    other = json.loads(ok(cli("keygen", "--out", str(tmp_path / "keys2"))).stdout)
    assert other["key_id"] != info["key_id"]


# -- full rounds, one per model format ------------------------------------------------------------------


def test_round_with_npz_models(cli, serve_process, keydir, npz_models, tmp_path, helpers):
    server = serve_process()
    paths, tensors = npz_models(3)
    weights = [250.0, 75.0, 1000.0]
    # The defaults, unchanged since issue 2 (sample counts as weights: exact to 1e-6 at the default max weight).
    seen, created = run_round(cli, server.address, keydir, "r1", paths, weights, paths[0], tmp_path / "global.npz")
    assert (created["max_weight"], created["value_bound"]) == (1e5, 100.0)
    assert [(s["state"], s["submitted"], s["expected"]) for s in seen] == [
        ("collecting", 1, 3), ("collecting", 2, 3), ("closed", 3, 3)]
    assert seen[-1]["clients"] == ["site-0", "site-1", "site-2"]
    result = dict(np.load(tmp_path / "global.npz"))
    assert list(result) == list(tensors[0])
    tol = helpers.release_tolerance(limits(created), tensors, weights)
    helpers.assert_close_to_average(result, helpers.weighted_average(tensors, weights), atol=tol, template=tensors[0])
    for name, arr in result.items():
        assert arr.dtype == tensors[0][name].dtype


def _torch_model(torch, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    net.train()
    net(torch.randn(16, 6))  # updates the running stats and the integer num_batches_tracked
    return net


def test_round_with_torch_models(cli, cli_popen, serve_process, keydir, tmp_path, helpers):
    torch = pytest.importorskip("torch")
    server = serve_process()
    nets = [_torch_model(torch, s) for s in range(3)]
    paths = []
    for i, net in enumerate(nets):
        paths.append(tmp_path / f"site-{i}.pt")
        torch.save(net.state_dict(), paths[-1])
    weights = [10.0, 20.0, 5.0]
    out = tmp_path / "global.pt"
    _, created = run_round(cli, server.address, keydir, "r1", paths, weights, paths[0], out, popen=cli_popen,
                           create_args=("--max-weight", "20"))

    result = torch.load(out, weights_only=True)
    states = [{k: v.numpy() for k, v in n.state_dict().items()} for n in nets]
    assert list(result) == list(states[0])
    assert result["1.num_batches_tracked"].dtype == torch.int64
    helpers.assert_close_to_average({k: v.numpy() for k, v in result.items()},
                                    helpers.weighted_average(states, weights),
                                    atol=helpers.release_tolerance(limits(created), states, weights),
                                    template=states[0])
    # The file loads into the architecture it came from.
    fresh = _torch_model(torch, 99)
    fresh.load_state_dict(result)
    assert torch.allclose(fresh[0].weight, result["0.weight"])
    # Importing torch adds nothing to stderr: a failure is still one line.
    one_line_error(cli("submit", "--server", server.address, "--round", "r1", "--key", str(keydir / "client.key"),
                       "--client-id", "late", "--model", str(paths[0])), "round 'r1' is closed")


def _keras_model(keras, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="hidden"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1, name="out")])


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_round_with_keras_models(cli, cli_popen, serve_process, keydir, tmp_path, helpers, suffix):
    keras = pytest.importorskip("keras")
    server = serve_process(extra=SMALL_COHORT)
    models = [_keras_model(keras, s) for s in range(2)]
    paths = []
    for i, m in enumerate(models):
        paths.append(tmp_path / f"site-{i}{suffix}")
        m.save(paths[-1])
    weights = [3.0, 1.0]
    out = tmp_path / f"global{suffix}"
    # Two sites: the fetching site lowers its own minimum cohort (default 3) as the aggregator did.
    _, created = run_round(cli, server.address, keydir, "r1", paths, weights, paths[0], out, popen=cli_popen,
                           create_args=("--max-weight", "3"), fetch_args=SMALL_COHORT)

    loaded = keras.saving.load_model(out, compile=False)
    got = {str(i): w for i, w in enumerate(loaded.get_weights())}
    sent = [{str(i): w for i, w in enumerate(m.get_weights())} for m in models]
    assert len(got) == len(sent[0]) == 8  # 2 + 4 (BatchNormalization) + 2
    helpers.assert_close_to_average(got, helpers.weighted_average(sent, weights),
                                    atol=helpers.release_tolerance(limits(created), sent, weights))


def _notebook_models(keras, variant: str, n: int) -> list:
    """What a user's notebook does: build and briefly train n models in one loop, without naming any layer,
    so Keras numbers them (lstm, lstm_1, ...; the inner layers of wrappers too)."""
    layers = keras.layers
    rng = np.random.default_rng(7)
    models = []
    for i in range(n):
        if variant == "lstm":
            model = keras.Sequential([keras.Input((12, 1)), layers.LSTM(8), layers.Dense(1)])
        else:
            model = keras.Sequential([keras.Input((12, 1)), layers.Bidirectional(layers.LSTM(4, return_sequences=True)),
                                      layers.TimeDistributed(layers.Dense(3)), layers.LSTM(4), layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        x = rng.standard_normal((32, 12, 1)).astype(np.float32)
        model.fit(x, x[:, -1] * (i + 1), epochs=1, batch_size=16, verbose=0)
        models.append(model)
    return models


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lstm", "bidirectional"])
def test_round_with_notebook_keras_models(cli, cli_popen, serve_process, keydir, tmp_path, helpers, variant):
    """Four identical architectures with four sets of auto-numbered names go through one encrypted round."""
    keras = pytest.importorskip("keras")
    server = serve_process()
    models = _notebook_models(keras, variant, 4)
    paths = [tmp_path / f"site-{i}{'.h5' if i == 3 else '.keras'}" for i in range(4)]
    for model, path in zip(models, paths):
        model.save(path)
    names = [list(secagg.read_model(p)) for p in paths]
    assert len({tuple(n) for n in names}) == 4  # the names differ from site to site
    weights = [120.0, 80.0, 300.0, 45.0]
    out = tmp_path / "global.keras"
    _, created = run_round(cli, server.address, keydir, "r1", paths, weights, paths[0], out, popen=cli_popen,
                           create_args=("--max-weight", "300"))

    # Exact against the positional weighted average of get_weights(), and written with the template's names.
    expected = [sum(w * np.asarray(m.get_weights()[k], np.float64) for w, m in zip(weights, models)) / sum(weights)
                for k in range(len(models[0].get_weights()))]
    got = keras.models.load_model(out, compile=False).get_weights()
    assert len(got) == len(expected) == len(names[0])
    sent = [{str(k): w for k, w in enumerate(m.get_weights())} for m in models]
    tol = helpers.release_tolerance(limits(created), sent, weights)
    helpers.assert_close_to_average({str(k): g for k, g in enumerate(got)},
                                    {str(k): e for k, e in enumerate(expected)}, atol=tol)
    assert list(secagg.read_model(out)) == names[0]
    # Site 3 fetches with its own .h5 model as template: the same average under site 3's names.
    ck = str(keydir / "client.key")
    ok(cli("fetch", "--server", server.address, "--round", "r1", "--key", ck, "--template", str(paths[3]), "--out",
           str(tmp_path / "global.h5")))
    mine = secagg.read_model(tmp_path / "global.h5")
    assert list(mine) == names[3]
    helpers.assert_close_to_average({str(k): g for k, g in enumerate(mine.values())},
                                    {str(k): e for k, e in enumerate(expected)}, atol=tol)

    if variant == "lstm":
        # A model of other sizes is refused before anything is encrypted, naming both sides and the fix.
        wider = keras.Sequential([keras.Input((12, 1)), keras.layers.LSTM(16), keras.layers.Dense(1)])
        wider.save(tmp_path / "wider.keras")
        secagg.create_round(server.address, "r2", template=paths[0], clients=3)
        wider_name = list(secagg.read_model(tmp_path / "wider.keras"))[0]
        line = one_line_error(cli("submit", "--server", server.address, "--round", "r2", "--key", ck, "--client-id",
                                  "site-9", "--model", str(tmp_path / "wider.keras")),
                              f"model does not match the round's architecture at tensor 1 of 5: the round has "
                              f"{names[0][0]!r} (1, 32) float32 (LSTM), this model has {wider_name!r} (1, 64) float32 "
                              "(LSTM). Names may differ; the layers must be the same kinds and sizes in the same "
                              "order: build every site's model with the same code as the round's template.")
        assert "missing" not in line
        assert secagg.round_status(server.address, "r2").submitted == 0


@pytest.mark.slow
def test_keras_model_error_is_one_line(cli, keydir, tmp_path):
    keras = pytest.importorskip("keras")
    path = tmp_path / "site.keras"
    _keras_model(keras, 0).save(path)
    one_line_error(cli("submit", "--server", "127.0.0.1:1", "--round", "r1", "--key", str(keydir / "client.key"),
                       "--client-id", "a", "--model", str(path), "--retry-for", "1"), "cannot reach the aggregator")


# -- errors: non-zero exit and one line on stderr ------------------------------------------------------------


def test_errors_are_one_line(cli, serve_process, keypair, other_keypair, npz_models, tmp_path):
    server = serve_process(extra=SMALL_COHORT)
    a = server.address
    paths, _ = npz_models(2)
    ck, sk, other = str(keypair.client), str(keypair.server), str(other_keypair.client)
    ok(cli("round", "create", "--server", a, "--round", "r1", "--clients", "2", "--template", str(paths[0])))

    one_line_error(cli("round", "status", "--server", a, "--round", "nope"), "no round 'nope'")
    one_line_error(cli("round", "create", "--server", a, "--round", "r1", "--clients", "2",
                       "--template", str(paths[0])), "round 'r1' already exists")
    one_line_error(cli("round", "create", "--server", a, "--round", "r2", "--clients", "-1",
                       "--template", str(paths[0])), "--clients must be at least 1")
    one_line_error(cli("round", "create", "--server", a, "--round", "r2", "--clients", "2", "--min-clients", "3",
                       "--template", str(paths[0])), "--min-clients must be between 1 and --clients")
    one_line_error(cli("submit", "--server", a, "--round", "nope", "--key", ck, "--client-id", "x",
                       "--model", str(paths[0])), "no round 'nope'")
    one_line_error(cli("submit", "--server", a, "--round", "r1", "--key", other, "--client-id", "x",
                       "--model", str(paths[0])), "use the client.key from the same 'secagg keygen'")
    one_line_error(cli("submit", "--server", a, "--round", "r1", "--key", sk, "--client-id", "x",
                       "--model", str(paths[0])), "is a server key")
    one_line_error(cli("submit", "--server", a, "--round", "r1", "--key", ck, "--client-id", "x",
                       "--model", str(tmp_path / "missing.npz")), "no such model file")
    one_line_error(cli("submit", "--server", a, "--round", "r1", "--key", ck, "--client-id", "x",
                       "--model", str(paths[0]), "--weight", "2e6"), "--max-weight")
    one_line_error(cli("submit", "--server", a, "--round", "r1", "--key", ck, "--client-id", "bad/id",
                       "--model", str(paths[0])), "invalid client id")
    ok(cli("submit", "--server", a, "--round", "r1", "--key", ck, "--client-id", "x", "--model", str(paths[0])))
    one_line_error(cli("submit", "--server", a, "--round", "r1", "--key", ck, "--client-id", "x",
                       "--model", str(paths[1])), "client 'x' already submitted a different update")
    one_line_error(cli("fetch", "--server", a, "--round", "r1", "--key", ck, "--template", str(paths[0]),
                       "--out", str(tmp_path / "o.npz")), "still collecting (1 of 2 submitted)")
    assert not (tmp_path / "o.npz").exists()
    s = status(cli, a)
    assert (s["state"], s["submitted"], s["expected"], s["clients"]) == ("collecting", 1, 2, ["x"])

    # An aggregator that is not there, and aggregators that cannot start.
    one_line_error(cli("round", "status", "--server", "127.0.0.1:1", "--round", "r1", "--retry-for", "0"),
                   "cannot reach the aggregator")
    one_line_error(cli("serve", "--key", ck, "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s2")),
                   "give the aggregator server.key instead")
    one_line_error(cli("serve", "--key", str(other_keypair.server), "--listen", "127.0.0.1:0",
                       "--state-dir", str(tmp_path / "serve-state")), "belongs to key")
    one_line_error(cli("serve", "--key", sk, "--listen", f"127.0.0.1:{server.port}",
                       "--state-dir", str(tmp_path / "s3")), "cannot listen on")


def test_fetch_wait_and_template_mismatch(cli, cli_popen, serve_process, keydir, npz_models, tmp_path, helpers):
    server = serve_process(extra=SMALL_COHORT)
    a = server.address
    paths, tensors = npz_models(2)
    # Max weight 1 (the weights): exact to 1e-6. Two sites: fetches lower their own minimum cohort too.
    created = json.loads(ok(cli("round", "create", "--server", a, "--round", "r1", "--clients", "2", "--template",
                                str(paths[0]), "--max-weight", "1")).stdout)
    tol = helpers.release_tolerance(limits(created), tensors, [1, 1])
    ck = str(keydir / "client.key")
    ok(cli("submit", "--server", a, "--round", "r1", "--key", ck, "--client-id", "a", "--model", str(paths[0])))
    fetch = cli_popen("fetch", "--server", a, "--round", "r1", "--key", ck, "--template", str(paths[0]),
                      "--out", str(tmp_path / "g.npz"), "--wait", "120", *SMALL_COHORT)
    try:
        ok(cli("submit", "--server", a, "--round", "r1", "--key", ck, "--client-id", "b", "--model", str(paths[1])))
    finally:
        done = finish(fetch)
    ok(done)
    assert json.loads(done.stdout)["out"] == str(tmp_path / "g.npz")
    helpers.assert_close_to_average(dict(np.load(tmp_path / "g.npz")), helpers.weighted_average(tensors, [1, 1]),
                                    atol=tol, template=tensors[0])

    wrong = helpers.save_npz(tmp_path / "wrong.npz", {k: v for k, v in tensors[0].items() if k != "odd"})
    line = one_line_error(cli("fetch", "--server", a, "--round", "r1", "--key", ck, "--template", str(wrong),
                              "--out", str(tmp_path / "w.npz"), *SMALL_COHORT),
                          f"template {wrong} does not match the round's architecture at tensor 3 of 5 (the round has 5 "
                          f"tensors, template {wrong} has 4): the round has 'odd' (7,) float64, template {wrong} has "
                          "'out/kernel' (64, 10) float32.")
    assert "Names may differ; the layers must be the same kinds and sizes in the same order" in line
    assert not (tmp_path / "w.npz").exists()
    # Any site's own model serves as template, whatever its tensors are called: the file gets its names.
    renamed = helpers.save_npz(tmp_path / "renamed.npz", {f"site_b/{k}": v for k, v in tensors[1].items()})
    ok(cli("fetch", "--server", a, "--round", "r1", "--key", ck, "--template", str(renamed), "--out",
           str(tmp_path / "b.npz"), *SMALL_COHORT))
    result = dict(np.load(tmp_path / "b.npz"))
    assert list(result) == [f"site_b/{k}" for k in tensors[1]]
    helpers.assert_close_to_average({k.removeprefix("site_b/"): v for k, v in result.items()},
                                    helpers.weighted_average(tensors, [1, 1]), atol=tol, template=tensors[1])


# -- cancel and list --------------------------------------------------------------------------------------


def test_round_cancel_and_list(cli, cli_popen, serve_process, keydir, npz_models, tmp_path):
    state = tmp_path / "state"
    server = serve_process(state, extra=SMALL_COHORT)
    a = server.address
    paths, _ = npz_models(3)
    ck = str(keydir / "client.key")
    for round_id, clients in (("r1", "3"), ("r2", "1")):
        ok(cli("round", "create", "--server", a, "--round", round_id, "--clients", clients, "--template",
               str(paths[0])))
    ok(cli("submit", "--server", a, "--round", "r1", "--key", ck, "--client-id", "site-0", "--model", str(paths[0])))
    ok(cli("submit", "--server", a, "--round", "r2", "--key", ck, "--client-id", "site-0", "--model", str(paths[0])))
    assert (state / "rounds" / "r1" / "accepted" / "site-0").is_file()
    fetch = cli_popen("fetch", "--server", a, "--round", "r1", "--key", ck, "--template", str(paths[0]), "--out",
                      str(tmp_path / "g.npz"), "--wait", "600")
    try:
        # Give the fetch time to reach its wait (if it is slower, it fails the same way; the wake-up
        # itself is tested in tests/test_rounds.py).
        threading.Event().wait(2.0)
        cancelled = json.loads(ok(cli("round", "cancel", "--server", a, "--round", "r1", "--reason",
                                      "site-2 left the federation")).stdout)
    finally:
        fetched = finish(fetch, timeout=120)  # far less than its --wait: nobody waits for a cancelled round
    assert (cancelled["state"], cancelled["submitted"], cancelled["expected"]) == ("failed", 1, 3)
    assert cancelled["reason"] == "cancelled: site-2 left the federation; accepted from: site-0"
    one_line_error(fetched, "round 'r1' failed: cancelled: site-2 left the federation")
    assert not (tmp_path / "g.npz").exists()
    assert not (state / "rounds" / "r1" / "accepted").exists()  # deleted like any failed round's updates
    one_line_error(cli("submit", "--server", a, "--round", "r1", "--key", ck, "--client-id", "site-1", "--model",
                       str(paths[1])), "round 'r1' is failed")
    one_line_error(cli("round", "cancel", "--server", a, "--round", "r2"),
                   "round 'r2' is already closed; only a collecting round can be cancelled")
    one_line_error(cli("round", "cancel", "--server", a, "--round", "nope"), "no round 'nope'")

    listed = json.loads(ok(cli("round", "list", "--server", a)).stdout)["rounds"]
    assert [(r["round_id"], r["state"], r["submitted"], r["expected"]) for r in listed] == [
        ("r1", "failed", 1, 3), ("r2", "closed", 1, 1)]
    assert listed[0]["reason"] == cancelled["reason"] and listed[0]["created_unix"] <= listed[1]["created_unix"]

    # Durable: after a SIGKILL and a restart the round is still cancelled.
    server.kill()
    again = serve_process(state, extra=SMALL_COHORT)
    assert json.loads(ok(cli("round", "list", "--server", again.address)).stdout)["rounds"] == listed
    one_line_error(cli("fetch", "--server", again.address, "--round", "r1", "--key", ck, "--template", str(paths[0]),
                       "--out", str(tmp_path / "g.npz")), "round 'r1' failed: cancelled: site-2 left the federation")
