"""Masked rounds end to end: a real aggregator on 127.0.0.1 under mutual TLS, real TenSEAL ciphertexts, one
thread per site with its own certificate, ``secagg.submit`` running every stage itself."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import secagg
from secagg.errors import MaskingError, RoundStateError, SecAggError
from secagg.masking import flow
from secagg.masking.settings import MaskSettings
from secagg.transport.client import AggregatorClient

STAGE = 8.0  # seconds each stage waits for missing sites in these tests (room for a loaded CI machine)


def create(server, pki, template, n, round_id="m1", enroll=(), **kw):
    settings = MaskSettings(kw.pop("threshold", 0), kw.pop("degree", 0), kw.pop("stage_seconds", STAGE))
    return secagg.create_round(server.address, round_id, template=template, clients=n, max_weight=kw.pop("max_weight", 512.0),
                               enroll=list(enroll), masking=settings, tls=pki.client("admin"), **kw)


def test_masked_round_releases_the_exact_weighted_average(mtls_server, keypair, pki, npz_models, helpers):
    paths, tensors = npz_models(4)
    weights = [120.0, 37.0, 512.0, 300.0]
    status = create(mtls_server, pki, paths[0], 4)
    assert status.masking["stage_seconds"] == STAGE and status.stage == "advertise"
    receipts = helpers.submit_each(mtls_server.address, "m1", keypair.client, pki, paths, weights,
                                   [f"site{i}" for i in range(4)])
    assert all(isinstance(r, secagg.Receipt) and r.masked for r in receipts), receipts
    # The masked update is as large as an unmasked one: the masks live inside c0 (8.0 bytes per real).
    assert all(abs(r.wire_bytes - receipts[0].wire_bytes) < 64 for r in receipts)
    s = secagg.round_status(mtls_server.address, "m1", tls=pki.client("site0"))
    assert (s.state, s.clients, s.stage) == ("closed", ("site0", "site1", "site2", "site3"), "")
    assert not (mtls_server.core.state_dir / "rounds" / "m1" / "masking.json").exists()  # shares gone with the round
    avg = secagg.fetch_average(mtls_server.address, "m1", keypair.client, tls=pki.client("site1"))
    tol = helpers.release_tolerance(status, tensors, weights)
    want = np.concatenate([v.ravel() for v in helpers.weighted_average(tensors, weights).values()])
    assert np.max(np.abs(avg.vector - want)) <= tol


def _run_partial(server, keypair, pki, name, round_id, until):
    """A site that takes part up to ``until`` ('advertise' or 'share') and then goes away (a crash)."""
    with AggregatorClient(server.address, tls=pki.client(name)) as client:
        status = client.status(round_id)[0]
        site = flow.start(status, name, secagg.load_client_key(keypair.client).parameters.data_prime,
                          pki.client(name), 3)
        calls = flow.StageCalls(lambda st, pl, w: client.mask_stage(round_id, name, st, pl, w), site.settings)
        if until == "advertise":
            client.mask_stage(round_id, name, "advertise", site.advertise().to_dict(), 0.0)
            return
        flow.exchange_keys(site, calls)


@pytest.mark.parametrize("drop_at", ["advertise", "share", "never"])
def test_a_dropout_at_any_stage_below_the_threshold_still_releases_the_survivors_average(
        drop_at, mtls_server, keypair, pki, npz_models, helpers):
    paths, tensors = npz_models(5)  # complete graph, threshold 3 of 5: two may drop
    names = [f"site{i}" for i in range(5)]
    status = create(mtls_server, pki, paths[0], 5, enroll=names, min_clients=3)
    with ThreadPoolExecutor(1) as pool:
        gone = pool.submit(_run_partial, mtls_server, keypair, pki, "site4", "m1", drop_at) if drop_at != "never" else None
        receipts = helpers.submit_each(mtls_server.address, "m1", keypair.client, pki, paths[:4], [1.0] * 4,
                                       names[:4])
        if gone is not None:
            gone.result()
    assert all(isinstance(r, secagg.Receipt) for r in receipts), receipts
    s = secagg.round_status(mtls_server.address, "m1", tls=pki.client("site0"))
    assert (s.state, s.clients) == ("closed", tuple(names[:4]))
    avg = secagg.fetch_average(mtls_server.address, "m1", keypair.client, tls=pki.client("site0"))
    want = np.concatenate([v.ravel() for v in helpers.weighted_average(tensors[:4], [1.0] * 4).values()])
    assert np.max(np.abs(avg.vector - want)) <= helpers.release_tolerance(status, tensors[:4], [1.0] * 4, strict=False)


def test_too_many_dropouts_fail_the_round_naming_who_is_missing(mtls_server, keypair, pki, npz_models, helpers):
    paths, _ = npz_models(4)
    names = [f"site{i}" for i in range(4)]
    create(mtls_server, pki, paths[0], 4, enroll=names)  # threshold 3: two missing sites are too many
    receipts = helpers.submit_each(mtls_server.address, "m1", keypair.client, pki, paths[:2], [1.0, 1.0], names[:2])
    assert all(isinstance(r, RoundStateError) for r in receipts), receipts
    assert all("advertise stage ended" in str(r) and "missing: site2, site3" in str(r) for r in receipts)
    s = secagg.round_status(mtls_server.address, "m1", tls=pki.client("site0"))
    assert s.state == "failed" and "missing: site2, site3" in s.reason


def test_masked_rounds_need_mutual_tls_and_certificates(tmp_path, keypair, pki, npz_models):
    paths, _ = npz_models(3)
    plain = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "plain")
    try:
        with pytest.raises(MaskingError, match="mutual TLS"):
            secagg.create_round(plain.address, "m1", template=paths[0], clients=3, masking=MaskSettings())
    finally:
        plain.stop(0)


def test_a_site_without_its_certificate_cannot_join(mtls_server, keypair, pki, npz_models, monkeypatch):
    paths, _ = npz_models(3)
    create(mtls_server, pki, paths[0], 3)
    with AggregatorClient(mtls_server.address, tls=pki.client("site0")) as client:
        status = client.status("m1")[0]
    with pytest.raises(MaskingError, match="needs its certificate"):
        flow.start(status, "site0", 1152921504606748673, secagg.ClientTLS(pki.ca), 3)
    with pytest.raises(MaskingError, match="--deadline"):
        create(mtls_server, pki, paths[0], 3, round_id="m2", deadline=30)
    with pytest.raises(MaskingError, match="majority"):
        create(mtls_server, pki, paths[0], 4, round_id="m3", threshold=2)


def test_resent_stage_messages_are_idempotent(mtls_server, keypair, pki, npz_models):
    paths, _ = npz_models(3)
    create(mtls_server, pki, paths[0], 3)
    with AggregatorClient(mtls_server.address, tls=pki.client("site0")) as client:
        status = client.status("m1")[0]
        site = flow.start(status, "site0", 1152921504606748673, pki.client("site0"), 3)
        ad = site.advertise().to_dict()
        assert client.mask_stage("m1", "site0", "advertise", ad, 0.0)[0] is False
        assert client.mask_stage("m1", "site0", "advertise", ad, 0.0)[0] is False  # the same again: fine
        with pytest.raises(SecAggError, match="already sent a different advertisement"):
            other = flow.start(status, "site0", 1152921504606748673, pki.client("site0"), 3)  # new keys, validly signed
            client.mask_stage("m1", "site0", "advertise", other.advertise().to_dict(), 0.0)
        # another site's name is refused under mutual TLS
        with pytest.raises(SecAggError, match="certificate is for 'site0'"):
            client.mask_stage("m1", "site1", "advertise", ad, 0.0)


def test_cli_masked_round_options(cli, mtls_server, pki, npz_models):
    paths, _ = npz_models(3)
    r = cli("round", "create", "--server", mtls_server.address, "--round", "c1", "--clients", "3", "--template",
            str(paths[0]), "--mask-threshold", "3", *_tls_args(pki, "admin"))
    assert r.returncode == 1 and "add --masking" in r.stderr
    r = cli("round", "create", "--server", mtls_server.address, "--round", "c1", "--clients", "3", "--template",
            str(paths[0]), "--masking", "--stage-timeout", "30", *_tls_args(pki, "admin"))
    assert r.returncode == 0, r.stderr
    import json

    status = json.loads(r.stdout)
    assert status["masking"] == {"threshold": 0, "degree": 0, "stage_seconds": 30.0} and status["stage"] == "advertise"


def _tls_args(pki, name):
    return ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.certs[name].cert), "--tls-key", str(pki.certs[name].key)]
