"""SIGKILL of a ``secagg serve`` process and a restart on the same state dir: nothing acknowledged is
lost, nothing is counted twice, and the final average is exact (within the release grid, and to
1e-6: the rounds' max weights are the largest site's weight, see helpers.release_bound). A round
damaged on disk while the aggregator was down is quarantined; the restart serves the others."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import secagg
from secagg.errors import DuplicateSubmissionError, RoundStateError
from secagg.transport.client import AggregatorClient

# About 600k parameters: 74 ciphertexts in 4 chunks, so a submission is a real stream.
BIG_LAYOUT = {"w": ((600, 1000), "float32"), "b": ((1000,), "float32"), "n": ((), "int64")}
BIG_PARAMS = 600 * 1000 + 1000


def _flat(avg_tensors, names):
    return np.concatenate([avg_tensors[n].ravel() for n in names])


def test_sigkill_between_submissions(serve_process, keypair, client_key, npz_models, tmp_path, helpers):
    state = tmp_path / "state"
    server = serve_process(state)
    paths, tensors = npz_models(3)
    weights = [300.0, 20.0, 81.0]
    status = secagg.create_round(server.address, "r1", template=paths[0], clients=3, max_weight=300.0)
    # Two clients are acknowledged; one of them keeps its exact bytes to resend after the crash.
    h0, c0 = helpers.sealed_update(client_key, status, "site-0", tensors[0], weights[0])
    with AggregatorClient(server.address) as c:
        assert c.submit(h0, c0).submitted == 1
    r1 = secagg.submit(server.address, "r1", keypair.client, "site-1", paths[1], weights[1])
    assert r1.submitted == 2

    server.kill()
    assert server.proc.returncode == -9
    server = serve_process(state, listen=f"127.0.0.1:{server.port}")  # same port, same state dir

    s = secagg.round_status(server.address, "r1")
    assert (s.state, s.submitted, s.expected, s.clients) == ("collecting", 2, 3, ("site-0", "site-1"))
    with AggregatorClient(server.address) as c:
        again = c.submit(h0, c0)  # the retry of a client that never saw its reply
    assert again.already_accepted and again.submitted == 2
    with pytest.raises(DuplicateSubmissionError):  # re-encrypted: different bytes, refused
        secagg.submit(server.address, "r1", keypair.client, "site-1", paths[1], weights[1])
    assert secagg.round_status(server.address, "r1").submitted == 2

    r2 = secagg.submit(server.address, "r1", keypair.client, "site-2", paths[2], weights[2])
    assert r2.submitted == 3 and not r2.already_accepted
    expected = helpers.weighted_average(tensors, weights)
    names = ["dense/kernel", "dense/bias", "odd", "out/kernel"]
    tol = helpers.release_tolerance(status, tensors, weights)
    avg = secagg.fetch_average(server.address, "r1", keypair.client)
    assert avg.contributions == 3 and avg.clients == ("site-0", "site-1", "site-2")
    assert np.max(np.abs(avg.vector - _flat(expected, names))) <= tol
    assert abs(avg.total_weight - sum(weights)) <= tol * sum(weights)

    # A closed round survives a SIGKILL too (new port this time).
    server.kill()
    server = serve_process(state)
    s = secagg.round_status(server.address, "r1")
    assert (s.state, s.submitted, s.clients) == ("closed", 3, ("site-0", "site-1", "site-2"))
    out = secagg.fetch(server.address, "r1", keypair.client, template=paths[0], out=tmp_path / "global.npz")
    helpers.assert_close_to_average(secagg.read_model(out), expected, atol=tol, template=tensors[0])


def test_sigkill_while_a_submission_streams(serve_process, keypair, tmp_path, helpers, rng):
    state = tmp_path / "state"
    server = serve_process(state)
    models = [helpers.random_tensors(rng, BIG_LAYOUT) for _ in range(3)]
    weights = [5.0, 2.0, 9.0]
    status = secagg.create_round(server.address, "big", template=models[0], clients=3, max_weight=10.0)
    for i in range(2):
        secagg.submit(server.address, "big", keypair.client, f"site-{i}", models[i], weights[i])

    killed = threading.Event()
    first_server = server
    sent: list[int] = []

    def progress(stage, done, total):
        if stage == "send":
            sent.append(done)
        # Chunks 0 and 1 of 4 are on their way: the aggregator dies in the middle of the stream.
        if stage == "send" and done == 2 and not killed.is_set():
            assert total == 4
            first_server.proc.kill()
            killed.set()

    result: dict = {}

    def last_client():
        try:
            result["receipt"] = secagg.submit(server.address, "big", keypair.client, "site-2", models[2], weights[2],
                                              progress=progress, retry_for=120)
        except Exception as exc:  # reported by the main thread
            result["error"] = exc

    t = threading.Thread(target=last_client)
    t.start()
    assert killed.wait(120), result
    first_server.kill()  # reap it
    assert first_server.proc.returncode == -9
    # Restart on the same port: the client is retrying that address with the same encrypted bytes.
    server = serve_process(state, listen=first_server.address)
    t.join(180)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    receipt = result["receipt"]
    assert receipt.submitted == 3 and not receipt.already_accepted
    # The stream was cut after two chunks and resent whole to the restarted aggregator.
    assert sent[:2] == [1, 2] and sent[-4:] == [1, 2, 3, 4], sent
    assert sum("update accepted" in line for line in first_server.log) == 2
    # (the log line is written before the reply; the reader thread may still be catching up)
    assert helpers.wait_for(lambda: sum("update accepted" in line for line in server.log) >= 1)
    assert sum("update accepted" in line for line in server.log) == 1

    s = secagg.round_status(server.address, "big")
    assert (s.state, s.submitted, s.clients) == ("closed", 3, ("site-0", "site-1", "site-2"))
    avg = secagg.fetch_average(server.address, "big", keypair.client)
    assert avg.contributions == 3
    expected = helpers.weighted_average(models, weights)
    tol = helpers.release_tolerance(status, models, weights)
    assert np.max(np.abs(avg.vector - _flat(expected, ["w", "b"]))) <= tol
    assert abs(avg.total_weight - sum(weights)) <= tol * sum(weights)


def test_sigkill_before_any_submission_and_failed_rounds(serve_process, keypair, npz_models, tmp_path):
    state = tmp_path / "state"
    small = ("--min-cohort", "1")  # rounds of two clients (the default minimum cohort of 3 is tested elsewhere)
    server = serve_process(state, extra=small)
    paths, _ = npz_models(1)
    secagg.create_round(server.address, "r1", template=paths[0], clients=2)
    secagg.create_round(server.address, "r2", template=paths[0], clients=2, min_clients=2, deadline=0.5)
    secagg.submit(server.address, "r2", keypair.client, "lonely", paths[0])
    with pytest.raises(RoundStateError, match="round 'r2' failed"):
        secagg.fetch_average(server.address, "r2", keypair.client, wait=60)
    server.kill()
    server = serve_process(state, extra=small)
    s1, s2 = secagg.round_status(server.address, "r1"), secagg.round_status(server.address, "r2")
    assert (s1.state, s1.submitted) == ("collecting", 0)
    assert s2.state == "failed" and "lonely" in s2.reason


def test_a_round_damaged_while_the_aggregator_was_down_is_quarantined(serve_process, keypair, client_key, npz_models,
                                                                       tmp_path, helpers):
    """A byte of an acknowledged update flipped on disk: the restarted aggregator starts, reports that
    round failed (damaged, quarantined, files kept) over gRPC, and serves the other round to the end."""
    state = tmp_path / "state"
    server = serve_process(state)
    paths, tensors = npz_models(3)
    weights = [10.0, 20.0, 30.0]
    secagg.create_round(server.address, "damaged", template=paths[0], clients=3)
    healthy = secagg.create_round(server.address, "healthy", template=paths[0], clients=3, max_weight=30.0)
    for i in range(2):
        secagg.submit(server.address, "damaged", keypair.client, f"site-{i}", paths[i], weights[i])
        secagg.submit(server.address, "healthy", keypair.client, f"site-{i}", paths[i], weights[i])
    server.kill()
    accepted = state / "rounds" / "damaged" / "accepted" / "site-1"
    data = bytearray(accepted.read_bytes())
    data[len(data) // 2] ^= 0x40
    accepted.write_bytes(bytes(data))

    server = serve_process(state)
    summary = {r.round_id: r for r in secagg.list_rounds(server.address)}["damaged"]
    assert summary.state == "failed" and "quarantined at start" in summary.reason
    assert "damaged on disk" in summary.reason
    assert accepted.read_bytes() == bytes(data) and (state / "rounds" / "damaged" / "QUARANTINE").is_file()
    with pytest.raises(RoundStateError, match=r"round 'damaged' is failed \(quarantined at start"):
        secagg.submit(server.address, "damaged", keypair.client, "site-2", paths[2], weights[2])
    with pytest.raises(RoundStateError, match="quarantined"):
        secagg.fetch_average(server.address, "damaged", keypair.client)
    listed = {r.round_id: r.state for r in secagg.list_rounds(server.address)}
    assert listed == {"damaged": "failed", "healthy": "collecting"}

    secagg.submit(server.address, "healthy", keypair.client, "site-2", paths[2], weights[2])
    avg = secagg.fetch_average(server.address, "healthy", keypair.client)
    tol = helpers.release_tolerance(healthy, tensors, weights)
    expected = helpers.weighted_average(tensors, weights)
    assert np.max(np.abs(avg.vector - _flat(expected, ["dense/kernel", "dense/bias", "odd", "out/kernel"]))) <= tol
