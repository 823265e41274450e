"""Ingest worker processes (``secagg serve --ingest-workers``): uploads go through them, exactly as before.

Real aggregators on 127.0.0.1 with real worker processes; real TenSEAL updates.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import numpy as np
import pytest

import secagg
from secagg.errors import AuthError, RoundNotFoundError, SecAggError, TransportError
from secagg.packing import ModelSpec, flatten
from secagg.transport.client import AggregatorClient
from secagg.updates import seal_update


def _workers(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_uploads_go_through_the_workers_and_the_round_is_exact(keypair, helpers, tmp_path, monkeypatch):
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state", ingest_workers=2)
    try:
        with AggregatorClient(srv.address) as client:
            ports = list(client.server_info().ingest_ports)
        assert len(ports) == 2 and len(set(ports)) == 2
        # Every upload below must reach the core through a worker (Begin/Commit), never the in-process path.
        monkeypatch.setattr(srv.core, "submit", lambda *a: pytest.fail("an upload went to the aggregator's own port"))
        rng = np.random.default_rng(3)
        models = [{"w": rng.normal(0, 0.05, (300, 400)).astype(np.float32), "b": rng.normal(0, 0.05, 400)
                   .astype(np.float32)} for _ in range(4)]
        weights = [120.0, 80.0, 200.0, 100.0]
        status = secagg.create_round(srv.address, "r1", models[0], clients=4, max_weight=200.0)
        key = secagg.load_client_key(keypair.client)
        first = seal_update(key, status, "site0", flatten(ModelSpec.of(models[0]), models[0]), weights[0])
        with AggregatorClient(srv.address) as client:
            assert client.submit(first.header, first.chunks).submitted == 1
            # A resend of an accepted update (its reply lost) is acknowledged again, counted once.
            again = client.submit(first.header, first.chunks)
        assert again.already_accepted and again.submitted == 1
        receipts = [secagg.submit(srv.address, "r1", keypair.client, f"site{i}", models[i], weights[i])
                    for i in range(1, 4)]
        assert [r.submitted for r in receipts] == [2, 3, 4] and not any(r.already_accepted for r in receipts)
        average = secagg.fetch_average(srv.address, "r1", keypair.client)
        want = helpers.weighted_average(models, weights)
        assert average.contributions == 4
        assert np.max(np.abs(average.vector - np.concatenate([want["w"].ravel(), want["b"]]))) <= \
            helpers.release_tolerance(status, models, weights)
        # A refusal keeps its class through a worker.
        with AggregatorClient(srv.address) as client, pytest.raises(RoundNotFoundError):
            client.submit(dataclasses.replace(first.header, round_id="nope"), first.chunks)
        assert not any((tmp_path / "state" / "rounds" / "r1" / "incoming").glob("*.part"))
    finally:
        srv.stop()


def test_a_worker_checks_the_certificate_like_the_aggregator(keypair, pki, npz_models, tmp_path):
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state", tls=pki.server_tls(), ingest_workers=1)
    paths, _ = npz_models(3)
    try:
        secagg.create_round(srv.address, "r1", paths[0], clients=3, tls=pki.client("admin"))
        with AggregatorClient(srv.address, tls=pki.client("site1")) as client:
            assert len(client.server_info().ingest_ports) == 1
        with pytest.raises(AuthError, match="certificate is for 'site1'"):
            secagg.submit(srv.address, "r1", keypair.client, "site2", paths[0], tls=pki.client("site1"), retry_for=0)
        receipt = secagg.submit(srv.address, "r1", keypair.client, "site1", paths[0], tls=pki.client("site1"))
        assert receipt.submitted == 1
    finally:
        srv.stop()


def test_a_client_whose_worker_is_gone_resends_to_the_aggregator(keypair, npz_models, tmp_path):
    paths, tensors = npz_models(3)
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state", ingest_workers=2)
    try:
        status = secagg.create_round(srv.address, "r1", paths[0], clients=3)
        key = secagg.load_client_key(keypair.client)
        sealed = [seal_update(key, status, f"site{i}", np.zeros(status.num_params), 1.0) for i in range(2)]
        with AggregatorClient(srv.address) as client:
            assert client.submit(sealed[0].header, sealed[0].chunks).submitted == 1  # through a worker
            for pid in _workers(os.getpid()):
                os.kill(pid, signal.SIGKILL)  # both workers crash
            with pytest.raises(TransportError):
                client.submit(sealed[1].header, sealed[1].chunks)
            assert client.submit(sealed[1].header, sealed[1].chunks).submitted == 2  # the resend: own port
        assert secagg.submit(srv.address, "r1", keypair.client, "site2", paths[2]).submitted == 3
    finally:
        srv.stop()


def test_workers_die_with_the_aggregator(serve_process, tmp_path):
    """SIGKILL of the aggregator takes its workers with it: nothing serves uploads it could not commit."""
    server = serve_process(tmp_path / "state", extra=("--ingest-workers", "2"))
    workers = _workers(server.proc.pid)
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    os.kill(server.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers)


def test_a_negative_number_of_workers_is_refused(keypair, tmp_path):
    with pytest.raises(SecAggError, match="--ingest-workers must be 0"):
        secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state", ingest_workers=-1)
