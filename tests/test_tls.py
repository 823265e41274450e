"""Authenticated transport: TLS, mutual TLS with per-client certificates, the ``secagg certs`` CA,
and the refusal to serve other machines without credentials. Real gRPC servers on 127.0.0.1 (port 0)
with real certificates from ``secagg.certs``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import struct
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

import secagg
from secagg.errors import AuthError, KeyFileError, RoundNotFoundError, RoundStateError, SecAggError, TransportError
from secagg.packing import ModelSpec
from secagg.rounds import DEFAULT_MAX_WEIGHT, DEFAULT_VALUE_BOUND, QUARANTINE_FILE, Aggregator, RoundConfig
from secagg.transport.client import AggregatorClient

FLOATS = ("dense/kernel", "dense/bias", "odd", "out/kernel")


def flat_average(helpers, tensors, weights):
    expected = helpers.weighted_average(tensors, weights)
    return np.concatenate([expected[n].ravel() for n in FLOATS])


def _records(server, round_id):
    """The contribution records the aggregator serves with a closed round's sum."""
    return server.core.aggregate(round_id).records


def test_tls_only_round_trip(keypair, pki, npz_models, helpers, tmp_path, caplog):
    paths, tensors = npz_models(3)
    with caplog.at_level(logging.WARNING, logger="secagg.server"):
        srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state", tls=pki.server_tls(mutual=False))
    try:
        # TLS without client certificates protects the channel only, and the log says so.
        assert any("no client certificates" in r.getMessage() for r in caplog.records)
        tls = pki.client(None)
        # Max weight = the largest weight: exact to 1e-6 within the release grid (helpers.release_bound).
        status = secagg.create_round(srv.address, "r1", template=paths[0], clients=3, max_weight=3.0, tls=tls)
        for i, p in enumerate(paths):
            secagg.submit(srv.address, "r1", keypair.client, f"anyone-{i}", p, float(i + 1), tls=tls)
        avg = secagg.fetch_average(srv.address, "r1", keypair.client, tls=tls)
        assert avg.contributions == 3 and avg.clients == ("anyone-0", "anyone-1", "anyone-2")
        tol = helpers.release_tolerance(status, tensors, [1.0, 2.0, 3.0])
        assert np.max(np.abs(avg.vector - flat_average(helpers, tensors, [1.0, 2.0, 3.0]))) <= tol
        # TLS without client certificates: the contributions carry tags, no signatures.
        assert not any(c.signature for c in _records(srv, "r1"))
        # A plaintext client cannot talk to a TLS aggregator, and is told what to give.
        with pytest.raises(TransportError, match="if it uses TLS, give --tls-ca"):
            secagg.round_status(srv.address, "r1")
    finally:
        srv.stop(0)


def test_mutual_tls_round_trip(mtls_server, keypair, pki, npz_models, helpers, tmp_path):
    paths, tensors = npz_models(3)
    status = secagg.create_round(mtls_server.address, "r1", template=paths[0], clients=3, max_weight=999.0,
                                 tls=pki.client("admin"))
    assert (status.state, status.expected) == ("collecting", 3)
    weights = [120.0, 37.0, 999.0]
    with ThreadPoolExecutor(3) as pool:  # each site with its own certificate, concurrently
        receipts = [f.result() for f in [
            pool.submit(secagg.submit, mtls_server.address, "r1", keypair.client, f"site{i}", p, w,
                        tls=pki.client(f"site{i}"))
            for i, (p, w) in enumerate(zip(paths, weights))]]
    assert sorted(r.submitted for r in receipts) == [1, 2, 3]
    s = secagg.round_status(mtls_server.address, "r1", tls=pki.client("site0"))
    assert (s.state, s.clients) == ("closed", ("site0", "site1", "site2"))
    out = secagg.fetch(mtls_server.address, "r1", keypair.client, template=paths[0], out=tmp_path / "global.npz",
                       tls=pki.client("site1"))
    # Sample-count weights under max weight 999: exact to 1e-6 within the release grid.
    tol = helpers.release_tolerance(status, tensors, weights)
    helpers.assert_close_to_average(secagg.read_model(out), helpers.weighted_average(tensors, weights), atol=tol,
                                    template=tensors[0])
    avg = secagg.fetch_average(mtls_server.address, "r1", keypair.client, tls=pki.client("site2"))
    assert np.max(np.abs(avg.vector - flat_average(helpers, tensors, weights))) <= tol
    # Every contribution is signed with its site's certificate (checked by the aggregator and the fetch).
    records = _records(mtls_server, "r1")
    assert [(r.client_id, bool(r.signature)) for r in records] == [("site0", True), ("site1", True), ("site2", True)]
    assert all(r.certificate == pki.certs[r.client_id].cert.read_bytes() for r in records)


def test_client_without_certificate_is_refused(mtls_server, keypair, pki, npz_models):
    paths, _ = npz_models(1)
    with pytest.raises(TransportError, match="if it requires client certificates, give --tls-cert and --tls-key"):
        secagg.create_round(mtls_server.address, "r1", template=paths[0], clients=3, tls=pki.client(None))
    with pytest.raises(TransportError, match="if it uses TLS, give --tls-ca"):
        secagg.create_round(mtls_server.address, "r1", template=paths[0], clients=3)
    with pytest.raises(RoundNotFoundError):
        secagg.round_status(mtls_server.address, "r1", tls=pki.client("admin"))


def test_wrong_ca_is_refused_both_ways(mtls_server, keypair, pki, npz_models, tmp_path):
    paths, _ = npz_models(1)
    site0 = pki.certs["site0"]
    # The client does not trust the aggregator's certificate ...
    with pytest.raises(TransportError, match="the aggregator's certificate was not issued by --tls-ca"):
        secagg.round_status(mtls_server.address, "r1", tls=secagg.ClientTLS(pki.other_ca, site0.cert, site0.key))
    # ... and the aggregator does not accept a client certificate from another CA, even one named site0.
    foreign = pki.other_certs["site0"]
    with pytest.raises(TransportError, match="if it refused the client certificate"):
        secagg.create_round(mtls_server.address, "r1", template=paths[0], clients=3,
                            tls=secagg.ClientTLS(pki.ca, foreign.cert, foreign.key))
    # An aggregator whose certificate comes from another CA is not trusted by this federation's clients.
    other = pki.other_certs["server"]
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "other-state",
                       tls=secagg.ServerTLS(other.cert, other.key, pki.other_ca))
    try:
        with pytest.raises(TransportError, match="not issued by --tls-ca"):
            secagg.round_status(srv.address, "r1", tls=pki.client("site0"))
    finally:
        srv.stop(0)
    with pytest.raises(RoundNotFoundError):
        secagg.round_status(mtls_server.address, "r1", tls=pki.client("admin"))


def test_a_server_certificate_must_name_the_host(keypair, pki, tmp_path):
    # The development server certificate names localhost and 127.0.0.1: both verify.
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state", tls=pki.server_tls())
    try:
        port = srv.address.rsplit(":", 1)[1]
        for host in ("127.0.0.1", "localhost"):
            with AggregatorClient(f"{host}:{port}", tls=pki.client("site0")) as c:
                assert c.server_info().key_id == srv.core.key.key_id
    finally:
        srv.stop(0)
    from secagg import certs

    only_dns = certs.issue(pki.dir, "server-example", server=True, hosts=["aggregator.example.org"])
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state2",
                       tls=secagg.ServerTLS(only_dns.cert, only_dns.key, pki.ca))
    try:
        with pytest.raises(TransportError, match="does not name '127.0.0.1'.*--host 127.0.0.1"):
            secagg.round_status(srv.address, "r1", tls=pki.client("site0"))
    finally:
        srv.stop(0)


def test_certs_cli_writes_private_keys_0600_and_never_overwrites(cli, tmp_path):
    d = tmp_path / "pki"
    proc = cli("certs", "init", "--dir", str(d))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"cert": str(d / "ca.crt"), "key": str(d / "ca.key")}
    for args in (("--name", "site1"), ("--name", "boss", "--admin"),
                 ("--name", "server", "--server", "--host", "agg.example.org", "--host", "10.0.0.7")):
        proc = cli("certs", "issue", "--dir", str(d), *args)
        assert proc.returncode == 0, proc.stderr
    for name in ("ca", "site1", "boss", "server"):
        assert stat.S_IMODE(os.stat(d / f"{name}.key").st_mode) == 0o600, name
        assert stat.S_IMODE(os.stat(d / f"{name}.crt").st_mode) == 0o644, name
    # Names and roles are in the certificates as the aggregator reads them.
    site1 = x509.load_pem_x509_certificate((d / "site1.crt").read_bytes())
    boss = x509.load_pem_x509_certificate((d / "boss.crt").read_bytes())
    server = x509.load_pem_x509_certificate((d / "server.crt").read_bytes())
    assert site1.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site1"
    assert not site1.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert boss.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "secagg-admin"
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["agg.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]

    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for args, match in ((("init", "--dir", str(d)), "ca.crt already exists"),
                        (("issue", "--dir", str(d), "--name", "site1"), "site1.crt already exists"),
                        (("issue", "--dir", str(tmp_path / "none"), "--name", "x"), "run 'secagg certs init"),
                        (("issue", "--dir", str(d), "--name", "x", "--host", "h"), "add --server"),
                        (("issue", "--dir", str(d), "--name", "../escape"), "--name '../escape'")):
        proc = cli("certs", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and match in lines[0], proc.stderr
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing overwritten, nothing added


def test_non_loopback_bind_needs_credentials_or_insecure(keypair, pki, tmp_path, cli, caplog):
    with pytest.raises(SecAggError, match=r"refusing to listen on 0\.0\.0\.0:0 without TLS.*--tls-ca.*--insecure"):
        secagg.serve(keypair.server, "0.0.0.0:0", tmp_path / "s1")
    with pytest.raises(SecAggError, match="with TLS but no client certificates"):
        secagg.serve(keypair.server, "0.0.0.0:0", tmp_path / "s2", tls=pki.server_tls(mutual=False))
    proc = cli("serve", "--key", str(keypair.server), "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "s3"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "--insecure" in lines[-1] and lines[-1].startswith("secagg: error: refusing")
    with caplog.at_level(logging.WARNING, logger="secagg.server"):
        srv = secagg.serve(keypair.server, "0.0.0.0:0", tmp_path / "s4", insecure=True)
    try:
        assert any("(--insecure)" in r.getMessage() for r in caplog.records)
        port = srv.address.rsplit(":", 1)[1]
        with AggregatorClient(f"127.0.0.1:{port}") as c:
            assert c.server_info().key_id == srv.core.key.key_id
    finally:
        srv.stop(0)
    srv = secagg.serve(keypair.server, "0.0.0.0:0", tmp_path / "s5", tls=pki.server_tls())  # mutual TLS: allowed
    srv.stop(0)


def test_loopback_without_tls_still_serves_with_a_warning(keypair, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="secagg.server"):
        srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state")
    try:
        assert any("without TLS" in r.getMessage() and "development only" in r.getMessage() for r in caplog.records)
        with AggregatorClient(srv.address) as c:
            assert c.server_info().key_id == srv.core.key.key_id
    finally:
        srv.stop(0)


def test_environment_credentials(mtls_server, pki, npz_models, monkeypatch, cli):
    paths, _ = npz_models(1)
    for k, v in pki.env("admin").items():
        monkeypatch.setenv(k, v)
    secagg.create_round(mtls_server.address, "r1", template=paths[0], clients=3)  # admin, from the environment
    monkeypatch.setenv("SECAGG_TLS_CERT", str(pki.certs["site0"].cert))
    monkeypatch.setenv("SECAGG_TLS_KEY", str(pki.certs["site0"].key))
    with pytest.raises(AuthError, match="certificate 'site0' may not create rounds"):
        secagg.create_round(mtls_server.address, "r2", template=paths[0], clients=3)
    # Explicit settings win over the environment.
    assert secagg.create_round(mtls_server.address, "r3", template=paths[0], clients=3,
                               tls=pki.client("admin")).round_id == "r3"
    # The CLI reads the same variables when no --tls-* option is given.
    proc = cli("round", "status", "--server", mtls_server.address, "--round", "r1", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["expected"] == 3
    monkeypatch.delenv("SECAGG_TLS_CA")
    with pytest.raises(KeyFileError, match="SECAGG_TLS_CA is not"):
        secagg.round_status(mtls_server.address, "r1")


def test_cli_end_to_end_with_mutual_tls(serve_process, keypair, pki, npz_models, tmp_path, cli, helpers):
    paths, tensors = npz_models(3)
    srv = serve_process(extra=("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                               "--tls-ca", str(pki.ca)))

    def creds(name):
        return ("--tls-ca", str(pki.ca), "--tls-cert", str(pki.certs[name].cert), "--tls-key", str(pki.certs[name].key))

    at = ("--server", srv.address, "--round", "r1")
    proc = cli("round", "create", *at, "--clients", "3", "--template", str(paths[0]), *creds("site0"))
    assert proc.returncode == 1 and "may not create rounds" in proc.stderr
    proc = cli("round", "create", *at, "--clients", "3", "--template", str(paths[0]), *creds("admin"))
    assert proc.returncode == 0, proc.stderr
    proc = cli("submit", *at, "--key", str(keypair.client), "--client-id", "site1", "--model", str(paths[0]),
               *creds("site0"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "certificate is for 'site0'" in lines[0], proc.stderr
    for i, p in enumerate(paths):
        proc = cli("submit", *at, "--key", str(keypair.client), "--client-id", f"site{i}", "--model", str(p),
                   *creds(f"site{i}"))
        assert proc.returncode == 0, proc.stderr
    proc = cli("fetch", *at, "--key", str(keypair.client), "--template", str(paths[0]), "--out",
               str(tmp_path / "g.npz"), *creds("site2"))
    assert proc.returncode == 0, proc.stderr
    # Weights of 1 under the default max weight (1e5): exact within the release grid (about 1e-4 here,
    # helpers.release_bound), not to 1e-6; the CLI contract is unchanged.
    limits = types.SimpleNamespace(expected=3, max_weight=DEFAULT_MAX_WEIGHT, value_bound=DEFAULT_VALUE_BOUND)
    helpers.assert_close_to_average(secagg.read_model(tmp_path / "g.npz"),
                                    helpers.weighted_average(tensors, [1.0] * 3),
                                    atol=helpers.release_tolerance(limits, tensors, [1.0] * 3, strict=False))
    proc = cli("round", "status", *at, "--tls-cert", str(pki.certs["site0"].cert))
    assert proc.returncode == 1 and "--tls-cert and --tls-key need --tls-ca" in proc.stderr
    # A failed handshake is one line on stderr too, with what to fix (not gRPC's own log lines).
    proc = cli("round", "status", *at, "--tls-ca", str(pki.other_ca))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "not issued by --tls-ca" in lines[0], proc.stderr


def test_bad_credential_files_name_the_option(pki, keypair, tmp_path):
    site0, site1 = pki.certs["site0"], pki.certs["site1"]
    with pytest.raises(KeyFileError, match=r"--tls-cert: .*missing\.crt does not exist"):
        secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "s", tls=secagg.ServerTLS(tmp_path / "missing.crt",
                                                                                          pki.server.key))
    with pytest.raises(KeyFileError, match="--tls-key: .* is not the private key of"):
        secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "s", tls=secagg.ServerTLS(pki.server.cert, site0.key))
    with pytest.raises(KeyFileError, match="--tls-ca: .* is not a PEM certificate"):
        secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "s",
                     tls=secagg.ServerTLS(pki.server.cert, pki.server.key, site0.key))
    with pytest.raises(KeyFileError, match="--tls-key .*is not the private key"):
        AggregatorClient("127.0.0.1:1", tls=secagg.ClientTLS(pki.ca, site0.cert, site1.key))
    with pytest.raises(KeyFileError, match="--tls-cert and --tls-key go together"):
        secagg.ClientTLS(pki.ca, site0.cert)
    # The message never quotes the key file.
    with pytest.raises(KeyFileError) as info:
        AggregatorClient("127.0.0.1:1", tls=secagg.ClientTLS(pki.ca, site0.cert, site0.cert))
    assert "BEGIN" not in str(info.value)


def test_merge_under_mutual_tls_needs_one_admin_site(mtls_server, keypair, pki, tmp_path, helpers):
    from secagg import certs
    from secagg.merge.remote import run_protocol
    from secagg.merge.scaling import shared_scaler

    # site0 coordinates (an admin certificate in its own name); the others may only submit as themselves.
    for name in ("ca.crt", "ca.key"):  # the same CA, in a directory where site0's name is still free
        shutil.copy(pki.dir / name, tmp_path / name)
    lead = certs.issue(tmp_path, "site0", admin=True)
    tls = [secagg.ClientTLS(pki.ca, lead.cert, lead.key), pki.client("site1"), pki.client("site2")]
    key = secagg.load_client_key(keypair.client)
    rng = np.random.default_rng(3)
    values = [rng.poisson(lam, size=(n, 2)).astype(float) for lam, n in ((20, 300), (200, 500), (900, 410))]
    results, errors = {}, []

    def site(i: int) -> None:
        try:
            if i == 0:  # the admin comes late: the others were refused creating each round and wait for it
                time.sleep(1.0)
            results[i] = run_protocol(mtls_server.address, "s1", key, f"site{i}", shared_scaler(values[i], log1p=True),
                                      3, wait=60, tls=tls[i])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=site, args=(i,)) for i in (1, 2, 0)]  # the admin starts last
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and sorted(results) == [0, 1, 2]
    pooled = np.log1p(np.concatenate(values))
    # The scaling round's defaults (max weight 1e5, value bound 1e3) against row counts of a few hundred
    # make its release grid about 1e-5 on these means: exact within it (helpers.release_bound), not to 1e-6.
    mean = pooled.mean(axis=0)
    tol = helpers.release_bound(3, 1e5, 1e3, [len(v) for v in values], float(np.max(np.abs(mean))))
    assert 1e-6 < tol < 2e-5
    for scaler in results.values():
        np.testing.assert_allclose(scaler.mean, mean, rtol=0, atol=tol)


def test_cancel_is_admin_only_and_list_is_for_every_site(mtls_server, keypair, pki, npz_models):
    paths, _ = npz_models(1)
    address = mtls_server.address
    secagg.create_round(address, "r1", template=paths[0], clients=3, tls=pki.client("admin"))
    secagg.submit(address, "r1", keypair.client, "site1", paths[0], tls=pki.client("site1"))
    with pytest.raises(AuthError, match="certificate 'site0' may not cancel rounds: that needs an admin certificate"):
        secagg.cancel_round(address, "r1", "site0 would rather stop", tls=pki.client("site0"))
    with pytest.raises(TransportError, match="give --tls-cert and --tls-key"):
        secagg.cancel_round(address, "r1", tls=pki.client(None))
    assert secagg.round_status(address, "r1", tls=pki.client("site0")).state == "collecting"
    # Any site may list the rounds (as any site may read a round's status).
    listed = secagg.list_rounds(address, tls=pki.client("site2"))
    assert [(r.round_id, r.state, r.submitted, r.expected) for r in listed] == [("r1", "collecting", 1, 3)]
    assert listed[0].created_unix is not None

    s = secagg.cancel_round(address, "r1", "wrong template", tls=pki.client("admin"))
    assert (s.state, s.clients) == ("failed", ("site1",))
    assert s.reason == "cancelled: wrong template (by admin); accepted from: site1"
    with pytest.raises(RoundStateError, match="round 'r1' is already failed"):
        secagg.cancel_round(address, "r1", tls=pki.client("admin"))
    with pytest.raises(RoundStateError, match="round 'r1' failed: cancelled: wrong template"):
        secagg.fetch_average(address, "r1", keypair.client, wait=30, tls=pki.client("site2"))
    assert [r.state for r in secagg.list_rounds(address, tls=pki.client("site0"))] == ["failed"]
    assert mtls_server.metrics.registry.get_sample_value("secagg_rounds_failed_total") == 1  # cancelled = failed


# -- issue 10: enrollment on fetch, signed contributions re-checked at start --------------------------


def test_enrollment_applies_to_fetch(mtls_server, keypair, pki, npz_models, helpers):
    """site3 holds a certificate of the federation's CA and client.key, but is not enrolled: it gets no sum."""
    paths, tensors = npz_models(3)
    address = mtls_server.address
    enrolled = ["site0", "site1", "site2"]
    status = secagg.create_round(address, "r1", template=paths[0], clients=3, enroll=enrolled, max_weight=1.0,
                                 tls=pki.client("admin"))
    for i, p in enumerate(paths):
        secagg.submit(address, "r1", keypair.client, f"site{i}", p, tls=pki.client(f"site{i}"))
    assert secagg.round_status(address, "r1", tls=pki.client("site3")).state == "closed"  # status is public
    with pytest.raises(AuthError, match="client 'site3' is not enrolled in round 'r1', so it may not fetch its sum"):
        secagg.fetch_average(address, "r1", keypair.client, tls=pki.client("site3"))
    with AggregatorClient(address, tls=pki.client("site3")) as raw, pytest.raises(AuthError, match="not enrolled"):
        raw.fetch("r1", 0.0)  # not even the encrypted stream
    assert mtls_server.metrics.registry.get_sample_value("secagg_fetches_refused_total",
                                                         {"reason": "AuthError"}) == 2
    # An enrolled site fetches, and the average is exact.
    avg = secagg.fetch_average(address, "r1", keypair.client, tls=pki.client("site1"))
    assert avg.clients == tuple(enrolled)
    tol = helpers.release_tolerance(status, tensors, [1.0] * 3)
    assert np.max(np.abs(avg.vector - flat_average(helpers, tensors, [1.0] * 3))) <= tol


def _edit_accepted_header(path, edit) -> None:
    """Rewrite an accepted update's JSON header (secagg.store layout) and keep its ciphertexts."""
    data = path.read_bytes()
    (n,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4:4 + n])
    edit(header)
    head = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(struct.pack(">I", len(head)) + head + data[4 + n:])


def test_signatures_are_checked_at_submit_and_again_at_start(server_key, client_key, pki, tmp_path, helpers, rng):
    ca = pki.ca.read_bytes()
    state = tmp_path / "state"
    agg = Aggregator(server_key, state, min_cohort=1, ca_pem=ca)
    tensors = [helpers.random_tensors(rng) for _ in range(3)]
    for round_id in ("r1", "r2"):
        agg.create_round(RoundConfig(round_id, ModelSpec.of(tensors[0]), 3, 3, None, max_weight=1.0))
    status = agg.status("r1")
    unsigned = helpers.sealed_update(client_key, status, "site0", tensors[0])
    with pytest.raises(AuthError, match="the contribution of 'site0' is not signed"):
        agg.submit(*unsigned)
    # Signed with site0's certificate key but submitted as site1: every site knows client.key, so the
    # tag alone cannot tell sites apart; the signature does.
    impostor = helpers.sealed_update(client_key, status, "site1", tensors[1], tls=pki.client("site0"))
    with pytest.raises(AuthError, match=r"names \['site0'\], not 'site1'"):
        agg.submit(*impostor)
    # A certificate of another CA, even one named site1.
    foreign = secagg.ClientTLS(pki.other_ca, pki.other_certs["site0"].cert, pki.other_certs["site0"].key)
    # (Both development CAs have the same name, so this is refused by the CA's signature on the certificate.)
    with pytest.raises(AuthError, match="not a valid certificate of the federation's CA|'site0''s contribution does "
                                        "not verify"):
        agg.submit(*helpers.sealed_update(client_key, status, "site0", tensors[0], tls=foreign))
    assert agg.status("r1").submitted == 0
    for round_id in ("r1", "r2"):
        s = agg.status(round_id)
        for i in (0, 1):
            agg.submit(*helpers.sealed_update(client_key, s, f"site{i}", tensors[i], tls=pki.client(f"site{i}")))

    # On disk, site1's signature in r1 is changed (the ciphertexts and digest are untouched): at start the
    # signature no longer verifies, and r1 is quarantined while r2 goes on.
    def corrupt(header):
        sig = bytearray(bytes.fromhex(header["contribution"]["signature"]))
        sig[-1] ^= 0x01
        header["contribution"]["signature"] = sig.hex()

    _edit_accepted_header(state / "rounds" / "r1" / "accepted" / "site1", corrupt)
    again = Aggregator(server_key, state, min_cohort=1, ca_pem=ca)
    reason = again.status("r1").reason
    assert again.status("r1").state == "failed" and "quarantined at start: AuthError" in reason
    assert "signature on 'site1'" in reason and (state / "rounds" / "r1" / QUARANTINE_FILE).is_file()
    assert again.status("r2").submitted == 2
    s2 = again.status("r2")
    again.submit(*helpers.sealed_update(client_key, s2, "site2", tensors[2], tls=pki.client("site2")))
    assert again.status("r2").state == "closed"
    assert [bool(r.signature) for r in again.aggregate("r2").records] == [True] * 3
