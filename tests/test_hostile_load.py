"""Silent upload streams (a slowloris) cannot freeze the aggregator: admission limits and the idle watchdog.

A real aggregator on 127.0.0.1; the attacker opens 40 or 200 Submit streams that never send a byte.
Meanwhile round status and the main port's health answer within a 1 s deadline, a real 3-site round
completes, and the server closes the silent streams after its idle timeout.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import secagg
from secagg.errors import BusyError
from secagg.transport import secagg_pb2 as pb
from secagg.transport import secagg_pb2_grpc as pb_grpc
from secagg.transport.admission import Admission, Limits

IDLE = 2.0


def _channel(address, tls=None):
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.credentials())


def silent_streams(address, n, tls=None, channels=10):
    """``n`` Submit streams that send nothing until ``release`` is set; returns (futures, release, channels)."""
    release = threading.Event()
    chans = [_channel(address, tls) for _ in range(channels)]

    def nothing():
        release.wait()
        return
        yield  # a generator that yields nothing

    futures = [pb_grpc.AggregatorStub(chans[i % channels]).Submit.future(nothing()) for i in range(n)]
    return futures, release, chans


def _answers_within_a_second(address, tls=None):
    with _channel(address, tls) as ch:
        status = pb_grpc.AggregatorStub(ch).GetRound(pb.GetRoundRequest(round_id="r1"), timeout=1.0)
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    return status.state, health.status


@pytest.mark.parametrize("streams,mutual", [(40, False), (40, True), (200, True)])
def test_silent_streams_do_not_freeze_the_aggregator(streams, mutual, keypair, pki, npz_models, helpers, tmp_path):
    tls = pki.server_tls() if mutual else None
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state", tls=tls,
                       limits=Limits(max_uploads=8, max_waits=16, per_client=4, idle_seconds=IDLE))
    admin = pki.client("admin") if mutual else None
    attacker = pki.client("site3") if mutual else None  # a valid certificate, enrolled in nothing
    paths, tensors = npz_models(3)
    futures, release, chans = [], threading.Event(), []
    try:
        secagg.create_round(srv.address, "r1", template=paths[0], clients=3, max_weight=512.0, tls=admin)
        futures, release, chans = silent_streams(srv.address, streams, attacker)
        assert helpers.wait_for(lambda: srv.admission.uploads > 0, timeout=10)
        # Status and health answer at once (a 1 s deadline), while the silent streams are open.
        assert _answers_within_a_second(srv.address, admin) == ("collecting", health_pb2.HealthCheckResponse.SERVING)
        # A real round completes meanwhile: under mutual TLS at once (the attacker's certificate may hold 4
        # uploads, no more); without it nothing tells the attacker from the sites, the silent streams hold
        # the global limit until the idle watchdog closes them, and the sites' retries go through then.
        with ThreadPoolExecutor(3) as pool:
            receipts = list(pool.map(
                lambda i: secagg.submit(srv.address, "r1", keypair.client, f"site{i}", paths[i], 100.0 + i,
                                        tls=pki.client(f"site{i}") if mutual else None, retry_for=60),
                range(3)))
        assert sorted(r.submitted for r in receipts) == [1, 2, 3]
        avg = secagg.fetch_average(srv.address, "r1", keypair.client, tls=pki.client("site0") if mutual else None)
        want = np.concatenate([v.ravel() for v in helpers.weighted_average(tensors, [100.0, 101.0, 102.0]).values()])
        assert np.max(np.abs(avg.vector - want)) <= helpers.release_tolerance(
            secagg.round_status(srv.address, "r1", tls=admin), tensors, [100.0, 101.0, 102.0])
        # Every silent stream ends: refused at once (over the limits) or cancelled after the idle timeout.
        codes = [f.exception(timeout=IDLE + 20).code() for f in futures]
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}, set(codes)
        assert grpc.StatusCode.CANCELLED in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert helpers.wait_for(lambda: srv.admission.uploads == 0, timeout=10)
    finally:
        release.set()
        for ch in chans:
            ch.close()
        srv.stop(0)


def test_limits_count_per_client_and_release_slots():
    adm = Admission(Limits(max_uploads=3, max_waits=3, per_client=2, idle_seconds=60))
    try:
        a1, a2 = adm.wait("a"), adm.wait("a")
        with pytest.raises(BusyError, match="a already has 2 waiting calls open"):
            adm.wait("a")
        b1 = adm.wait("b")
        with pytest.raises(BusyError, match="maximum of 3 waiting calls"):
            adm.wait("c")
        with a1:
            pass  # leaving a slot releases it
        with adm.wait("c"), a2, b1:
            pass
        with adm.wait("a"), adm.wait("a"):  # all released: "a" may have 2 again
            pass
    finally:
        adm.stop()


def test_busy_error_is_retried_by_the_client():
    assert issubclass(BusyError, secagg.errors.TransportError) and BusyError("x").transient


def test_an_upload_sends_its_chunks_only_once_admitted(keypair, npz_models, helpers, tmp_path, monkeypatch):
    """A refused upload costs the aggregator its header, not a receive window of chunks it would drop:
    the client pulls no chunk from the update until the aggregator has admitted the upload. The
    aggregator here takes a second to decide, so a client that did not wait would pull chunks meanwhile."""
    import time

    from secagg.transport.client import AggregatorClient
    from secagg.updates import seal_update

    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state",
                       limits=Limits(max_uploads=1, max_waits=4, per_client=1, idle_seconds=30))
    futures, release, chans = [], threading.Event(), []
    paths, _ = npz_models(1)
    try:
        status = secagg.create_round(srv.address, "r1", template=paths[0], clients=3)
        key = secagg.load_client_key(keypair.client)
        update = seal_update(key, status, "site0", np.random.default_rng(0).normal(0, 0.05, status.num_params), 1.0)
        pulled: list[int] = []
        pulled_before_admission: list[int] = []
        admit = srv.admission.upload

        def slow_admission(*args, **kwargs):
            time.sleep(1.0)
            slot = admit(*args, **kwargs)  # raises BusyError when the slot is taken
            pulled_before_admission.append(len(pulled))
            return slot

        def counted():
            for chunk in update.chunks:
                pulled.append(chunk.index)
                yield chunk

        futures, release, chans = silent_streams(srv.address, 1)  # holds the only upload slot
        assert helpers.wait_for(lambda: srv.admission.uploads == 1, timeout=10)
        monkeypatch.setattr(srv.admission, "upload", slow_admission)
        with AggregatorClient(srv.address) as client:
            with pytest.raises(BusyError):
                client.submit(update.header, counted())
            assert pulled == []
            release.set()  # the silent stream ends; its slot is free again
            assert helpers.wait_for(lambda: srv.admission.uploads == 0, timeout=10)
            reply = client.submit(update.header, counted())
        assert reply.submitted == 1 and pulled == [c.index for c in update.chunks]
        assert pulled_before_admission == [0]
    finally:
        release.set()
        for ch in chans:
            ch.close()
        srv.stop(0)
