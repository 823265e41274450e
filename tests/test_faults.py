"""Faults: a SIGKILL of ``secagg serve`` at a random moment of a round with concurrent clients,
rounds whose clients drop out before the deadline, and sites started before the aggregator.

The kill trials are a short version of ``benchmarks/faults.py``: whenever the aggregator dies
(before any submission, mid-stream, between submissions, after the round closed) and comes back on
the same port and state dir, every client's ``secagg.submit`` completes, every client is counted
exactly once, and the average is exact. The delays come from a seeded RNG; nothing asserts a time.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
import types

import numpy as np
import pytest

import secagg
from secagg.errors import AuthError, RoundExistsError, RoundNotFoundError, RoundStateError, TransportError
from secagg.packing import ModelSpec
from secagg.rounds import DEFAULT_MAX_WEIGHT, DEFAULT_VALUE_BOUND, Aggregator, RoundConfig, RoundStatus
from secagg.transport.client import AggregatorClient


# 200k parameters: 25 ciphertexts in 2 chunks, so that a kill can land inside a stream.
LAYOUT = {"w": ((400, 500), "float32"), "b": ((500,), "float32"), "steps": ((), "int64")}
CLIENTS = 6


def _flat(tensors) -> np.ndarray:
    return np.concatenate([tensors["w"].ravel(), tensors["b"].ravel()])


class Client(threading.Thread):
    """One site calling ``secagg.submit`` once the start event is set."""

    def __init__(self, address: str, round_id: str, key, client_id: str, model, weight: float,
                 start: threading.Event) -> None:
        super().__init__(daemon=True)
        self.args = (address, round_id, key, client_id, model, weight)
        self.start_event = start
        self.sent_chunks = 0
        self.receipt = None
        self.error: Exception | None = None
        self.restarts = 0

    def progress(self, stage: str, done: int, total: int) -> None:
        if stage == "send":
            self.sent_chunks += 1

    def run(self) -> None:
        self.start_event.wait()
        while True:
            try:
                self.receipt = secagg.submit(*self.args, progress=self.progress, retry_for=60.0)
                return
            except TransportError as exc:
                # secagg.submit retries its first call (GetRound) while nothing answers and resends
                # its update for 60 s, but a kill in the middle of that first call breaks a connection
                # the way a refused TLS handshake does, which is not retried: the site fails before
                # sending anything, and starting it again is safe.
                if self.sent_chunks or self.restarts >= 100:
                    self.error = exc
                    return
                self.restarts += 1
                threading.Event().wait(0.2)
            except Exception as exc:  # reported by the test
                self.error = exc
                return


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_moment(trial, serve_process, keypair, client_key, tmp_path, helpers):
    rng = random.Random(20240607 + trial)
    # The kill comes a random moment after the k-th acceptance (k random, 0 = any time after the
    # start): before any update, mid-stream, between submissions, while or after the round closes,
    # whatever the machine's speed.
    after_accepted, jitter = rng.randint(0, CLIENTS), rng.uniform(0.0, 0.3)
    weights = [float(rng.randint(1, 100)) for _ in range(CLIENTS)]
    models = [helpers.random_tensors(np.random.default_rng([trial, i]), LAYOUT) for i in range(CLIENTS)]
    ids = [f"site-{i}" for i in range(CLIENTS)]
    state = tmp_path / "state"
    first = serve_process(state)
    # Max weight = the largest site weight allowed (100): exact to 1e-6 within the release grid.
    status = secagg.create_round(first.address, "r", models[0], clients=CLIENTS, max_weight=100.0)
    start = threading.Event()
    clients = [Client(first.address, "r", client_key, cid, m, w, start) for cid, m, w in zip(ids, models, weights)]
    for c in clients:
        c.start()
    start.set()
    assert helpers.wait_for(lambda: sum("update accepted" in line for line in first.log) >= after_accepted,
                            timeout=120)
    threading.Event().wait(jitter)
    first.kill()
    assert first.proc.returncode == -9
    second = serve_process(state, listen=first.address)  # same port, same state dir
    for c in clients:
        c.join(240)
    assert not any(c.is_alive() for c in clients)
    assert [c.error for c in clients] == [None] * CLIENTS

    receipts = [c.receipt for c in clients]
    status = secagg.round_status(second.address, "r")
    assert (status.state, status.submitted, status.clients) == ("closed", CLIENTS, tuple(ids))
    # Exactly once: each update was accepted by one of the two processes, never by both; a client
    # whose acknowledgement died with the first process got it from the second (already_accepted).
    # Such an update's log line may have died too (the kill came between the durable rename into
    # accepted/ and the log call), so the lines are between N - (re-acknowledged) and N.
    resent = sum(r.already_accepted for r in receipts)
    lines = lambda: sum(line.count("update accepted") for line in first.log + second.log)  # noqa: E731
    assert helpers.wait_for(lambda: lines() >= CLIENTS - resent)
    assert CLIENTS - resent <= lines() <= CLIENTS
    # fetch_average checks the decrypted count slot against the contributions: every update is in
    # the encrypted sum exactly once.
    average = secagg.fetch_average(second.address, "r", client_key)
    assert average.contributions == CLIENTS and average.clients == tuple(ids)
    expected = helpers.weighted_average(models, weights)
    tol = helpers.release_tolerance(status, models, weights)
    assert np.max(np.abs(average.vector - _flat(expected))) <= tol
    assert abs(average.total_weight - sum(weights)) <= tol * sum(weights)


# -- dropouts ---------------------------------------------------------------------------------------


ENROLLED = ("site-0", "site-1", "site-2", "site-3", "site-4")
SMALL = {"w": ((3000,), "float32"), "steps": ((), "int64")}


def _presealed(client_key, helpers, round_id: str, models, max_weight: float, weights):
    """Updates sealed before the round exists, so that sending them takes milliseconds, well inside the
    short deadline even on a busy machine. The round status they are bound to (tag) is the one the
    round will have: 5 enrolled clients, quorum 4, the given max weight and the default value bound."""
    spec = ModelSpec.of(models[0])
    like_status = RoundStatus(round_id, "collecting", 0, len(ENROLLED), 4, (), None, spec.hash, client_key.key_id,
                              max_weight, DEFAULT_VALUE_BOUND, spec.num_params, enrolled=ENROLLED)
    return like_status, [helpers.sealed_update(client_key, like_status, cid, m, w)
                         for cid, m, w in zip(ENROLLED, models, weights)]


def test_fewer_than_quorum_fails_and_says_who_is_missing(serve_process, client_key, helpers, rng):
    server = serve_process()
    models = [helpers.random_tensors(rng, SMALL) for _ in ENROLLED]
    _, sealed = _presealed(client_key, helpers, "short", models, DEFAULT_MAX_WEIGHT, [1.0] * 5)
    secagg.create_round(server.address, "short", models[0], clients=5, min_clients=4, deadline=2.0,
                        enroll=list(ENROLLED))
    with AggregatorClient(server.address) as c:
        for header, chunks in sealed[:2]:
            c.submit(header, chunks)
    assert helpers.wait_for(lambda: secagg.round_status(server.address, "short").state != "collecting", timeout=60)
    status = secagg.round_status(server.address, "short")
    assert status.state == "failed" and status.clients == ("site-0", "site-1")
    assert "accepted from: site-0, site-1" in status.reason
    assert "missing: site-2, site-3, site-4" in status.reason
    with pytest.raises(RoundStateError, match="failed"):
        secagg.fetch_average(server.address, "short", client_key)
    with AggregatorClient(server.address) as c, pytest.raises(RoundStateError, match="failed"):
        c.submit(*sealed[2])  # a late site is refused


def test_above_quorum_closes_at_the_deadline_with_the_survivors(serve_process, client_key, helpers, rng):
    server = serve_process()
    models = [helpers.random_tensors(rng, SMALL) for _ in ENROLLED]
    weights = [5.0, 1.0, 30.0, 2.0, 9.0]
    status, sealed = _presealed(client_key, helpers, "survivors", models, 30.0, weights)
    secagg.create_round(server.address, "survivors", models[0], clients=5, min_clients=4, deadline=2.0,
                        enroll=list(ENROLLED), max_weight=30.0)
    with AggregatorClient(server.address) as c:
        for header, chunks in sealed[:4]:  # site-4 drops out
            c.submit(header, chunks)
    average = secagg.fetch_average(server.address, "survivors", client_key, wait=60)
    assert average.contributions == 4 and average.clients == ENROLLED[:4]
    expected = helpers.weighted_average(models[:4], weights[:4])
    tol = helpers.release_tolerance(status, models[:4], weights[:4])  # max weight 30: exact to 1e-6
    assert np.max(np.abs(average.vector - expected["w"])) <= tol
    assert abs(average.total_weight - sum(weights[:4])) <= tol * sum(weights[:4])
    status = secagg.round_status(server.address, "survivors")
    assert (status.state, status.submitted) == ("closed", 4)


# -- a site that starts before the aggregator ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _finish(proc: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_submit_and_fetch_started_before_the_aggregator(serve_process, server_key, keypair, npz_models, tmp_path,
                                                          cli_popen, helpers):
    """README: `secagg submit` keeps trying for up to 60 s when the aggregator is unreachable; so does fetch."""
    paths, tensors = npz_models(1)
    state = tmp_path / "state"
    # The round exists in the aggregator's state directory, but no aggregator runs yet.
    Aggregator(server_key, state, min_cohort=1).create_round(
        RoundConfig("early", ModelSpec.of(tensors[0]), 1, 1, None, max_weight=3.0))
    address = f"127.0.0.1:{_free_port()}"
    key = str(keypair.client)
    submit = cli_popen("submit", "--server", address, "--round", "early", "--key", key, "--client-id", "site-0",
                       "--model", str(paths[0]), "--weight", "3")
    fetch = cli_popen("fetch", "--server", address, "--round", "early", "--key", key, "--template", str(paths[0]),
                      "--out", str(tmp_path / "global.npz"), "--wait", "120", "--min-cohort", "1")
    try:
        # Both commands are running and have found nothing listening (they have nothing to print yet).
        threading.Event().wait(4.0)
        assert submit.poll() is None and fetch.poll() is None
        serve_process(state, listen=address, extra=("--min-cohort", "1"))
    finally:
        submitted, fetched = _finish(submit), _finish(fetch)
    assert submitted.returncode == 0, submitted.stderr
    receipt = json.loads(submitted.stdout)
    assert (receipt["submitted"], receipt["already_accepted"]) == (1, False)
    assert fetched.returncode == 0, fetched.stderr
    # The site's weight is the round's max weight: exact to 1e-6 within the release grid.
    tol = helpers.release_tolerance(types.SimpleNamespace(expected=1, max_weight=3.0, value_bound=DEFAULT_VALUE_BOUND),
                                    tensors, [3.0])
    helpers.assert_close_to_average(secagg.read_model(tmp_path / "global.npz"),
                                    helpers.weighted_average(tensors, [3.0]), atol=tol, template=tensors[0])


def test_admin_commands_started_before_the_aggregator(serve_process, keypair, npz_models, tmp_path, cli_popen):
    """README: every command keeps trying while the aggregator is unreachable, round administration included
    (a compose file or script that starts the admin beside the aggregator)."""
    paths, _ = npz_models(1)
    address = f"127.0.0.1:{_free_port()}"
    create = cli_popen("round", "create", "--server", address, "--round", "early", "--clients", "3",
                       "--template", str(paths[0]))
    listing = cli_popen("round", "list", "--server", address)
    try:
        threading.Event().wait(3.0)
        assert create.poll() is None and listing.poll() is None  # still trying: nothing listens yet
        serve_process(tmp_path / "state", listen=address)
    finally:
        created, listed = _finish(create), _finish(listing)
    assert created.returncode == 0, created.stderr
    assert (json.loads(created.stdout)["round_id"], json.loads(created.stdout)["state"]) == ("early", "collecting")
    assert listed.returncode == 0, listed.stderr
    assert all(r["round_id"] == "early" for r in json.loads(listed.stdout)["rounds"])


def test_a_create_or_cancel_whose_reply_was_lost_is_not_an_error(server, npz_models, monkeypatch):
    """A retried create or cancel that finds its own earlier attempt done returns it; anything else stays an error."""
    paths, _ = npz_models(1)
    monkeypatch.setattr(secagg.api.time, "sleep", lambda seconds: None)
    real_create, real_cancel = AggregatorClient.create_round, AggregatorClient.cancel_round
    lost: list[str] = []

    def create_reply_lost(self, request):
        reply = real_create(self, request)
        if request.round_id not in lost:
            lost.append(request.round_id)
            raise TransportError("the connection broke before the reply arrived")
        return reply

    def cancel_reply_lost(self, round_id, reason):
        reply = real_cancel(self, round_id, reason)
        if round_id not in lost:
            lost.append(round_id)
            raise TransportError("the connection broke before the reply arrived")
        return reply

    monkeypatch.setattr(AggregatorClient, "create_round", create_reply_lost)
    status = secagg.create_round(server.address, "lost-reply", paths[0], clients=2)
    assert (status.round_id, status.state, status.expected, lost) == ("lost-reply", "collecting", 2, ["lost-reply"])
    # The same id with other settings is another round: refused, on a first attempt and on a retry alike.
    with pytest.raises(RoundExistsError):
        secagg.create_round(server.address, "lost-reply", paths[0], clients=3)

    def create_never_arrives(self, request):
        if request.round_id not in lost:
            lost.append(request.round_id)
            raise TransportError("nothing answered")
        return real_create(self, request)

    secagg.create_round(server.address, "taken", paths[0], clients=3)
    monkeypatch.setattr(AggregatorClient, "create_round", create_never_arrives)
    with pytest.raises(RoundExistsError):
        secagg.create_round(server.address, "taken", paths[0], clients=2)

    monkeypatch.setattr(AggregatorClient, "cancel_round", cancel_reply_lost)
    cancelled = secagg.cancel_round(server.address, "lost-reply", "operator")
    assert cancelled.state == "failed" and cancelled.reason.startswith("cancelled: operator")
    with pytest.raises(RoundStateError):  # a second cancel, not a retry, still says the round is not collecting
        secagg.cancel_round(server.address, "lost-reply", "again")


def test_errors_that_cannot_heal_are_not_retried(monkeypatch, mtls_server, server, keypair, pki, npz_models):
    """Only an aggregator that does not answer is tried again: a wrong CA, a refused certificate or an unknown
    round fail at the first attempt, even with a long retry_for."""
    paths, _ = npz_models(1)
    pauses: list[float] = []
    monkeypatch.setattr(secagg.api.time, "sleep", pauses.append)
    wrong_ca = secagg.ClientTLS(pki.other_ca, pki.certs["site0"].cert, pki.certs["site0"].key)
    with pytest.raises(TransportError, match="not issued by --tls-ca"):
        secagg.submit(mtls_server.address, "r1", keypair.client, "site0", paths[0], retry_for=3600, tls=wrong_ca)
    with pytest.raises(TransportError, match="give --tls-cert and --tls-key"):
        secagg.fetch_average(mtls_server.address, "r1", keypair.client, retry_for=3600, tls=pki.client(None))
    with pytest.raises(RoundNotFoundError):
        secagg.submit(server.address, "nope", keypair.client, "a", paths[0], retry_for=3600)
    secagg.create_round(mtls_server.address, "r1", template=paths[0], clients=3, tls=pki.client("admin"))
    with pytest.raises(AuthError, match="certificate is for 'site0'"):
        secagg.submit(mtls_server.address, "r1", keypair.client, "site1", paths[0], retry_for=3600,
                      tls=pki.client("site0"))
    assert pauses == []
    # An aggregator that does not answer is tried again until retry_for runs out.
    dead = f"127.0.0.1:{_free_port()}"
    with pytest.raises(TransportError, match=f"cannot reach the aggregator at {dead}"):
        secagg.submit(dead, "r1", keypair.client, "a", paths[0], retry_for=1.0)
    assert pauses and all(p > 0 for p in pauses)
