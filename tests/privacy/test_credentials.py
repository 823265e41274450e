"""Audit 6: credentials decide who may submit and who may create rounds.

An aggregator on 127.0.0.1 with mutual TLS and real certificates from ``secagg.certs``. Each
refusal is checked at the aggregator (through the raw client, so no client-side check can hide a
missing server-side one) and by the round's status afterwards: nothing was accepted.
"""

from __future__ import annotations

import grpc
import pytest

import secagg
from secagg.errors import AuthError, DuplicateSubmissionError, RoundNotFoundError, TransportError
from secagg.transport import secagg_pb2 as pb
from secagg.transport import secagg_pb2_grpc as pb_grpc
from secagg.transport.client import AggregatorClient


@pytest.fixture
def round3(mtls_server, pki, npz_models):
    """A 3-client round created by the admin, and three models on disk."""
    paths, tensors = npz_models(3)
    status = secagg.create_round(mtls_server.address, "r1", template=paths[0], clients=3, tls=pki.client("admin"))
    return status, paths, tensors


def status_of(server, pki, round_id="r1"):
    return secagg.round_status(server.address, round_id, tls=pki.client("admin"))


def test_a_client_cannot_submit_as_another(mtls_server, pki, keypair, client_key, round3, helpers):
    status, paths, tensors = round3
    # Through the API ...
    with pytest.raises(AuthError, match="certificate is for 'site1' but the update claims client 'site2'"):
        secagg.submit(mtls_server.address, "r1", keypair.client, "site2", paths[0], tls=pki.client("site1"))
    # ... and with a hand-made update, straight to the aggregator.
    header, chunks = helpers.sealed_update(client_key, status, "site2", tensors[0])
    with AggregatorClient(mtls_server.address, tls=pki.client("site1")) as c, pytest.raises(
            AuthError, match="certificate is for 'site1' but the update claims client 'site2'"):
        c.submit(header, chunks)
    s = status_of(mtls_server, pki)
    assert (s.state, s.submitted, s.clients) == ("collecting", 0, ())
    # The impersonation did not take site2's place: site2 itself still submits, once.
    receipt = secagg.submit(mtls_server.address, "r1", keypair.client, "site2", paths[1], tls=pki.client("site2"))
    assert receipt.submitted == 1 and not receipt.already_accepted
    assert status_of(mtls_server, pki).clients == ("site2",)


def test_a_client_cannot_submit_twice(mtls_server, pki, keypair, round3):
    _, paths, _ = round3
    secagg.submit(mtls_server.address, "r1", keypair.client, "site0", paths[0], tls=pki.client("site0"))
    with pytest.raises(DuplicateSubmissionError, match="client 'site0' already submitted a different update"):
        secagg.submit(mtls_server.address, "r1", keypair.client, "site0", paths[1], tls=pki.client("site0"))
    s = status_of(mtls_server, pki)
    assert (s.submitted, s.clients) == (1, ("site0",))


def test_a_client_cannot_submit_without_credentials(mtls_server, pki, keypair, round3, client_key, helpers):
    status, paths, tensors = round3
    with pytest.raises(TransportError, match="give --tls-cert and --tls-key"):
        secagg.submit(mtls_server.address, "r1", keypair.client, "site0", paths[0], tls=pki.client(None))
    header, chunks = helpers.sealed_update(client_key, status, "site0", tensors[0])
    for tls in (pki.client(None), None):  # TLS without a certificate, and no TLS at all
        with AggregatorClient(mtls_server.address, tls=tls) as c, pytest.raises(TransportError):
            c.submit(header, chunks)
    # A certificate from another CA is no credential either, even one named site0.
    foreign = pki.other_certs["site0"]
    with AggregatorClient(mtls_server.address, tls=secagg.ClientTLS(pki.ca, foreign.cert, foreign.key)) as c, \
            pytest.raises(TransportError):
        c.submit(header, chunks)
    s = status_of(mtls_server, pki)
    assert (s.submitted, s.clients) == (0, ())


def test_only_an_admin_creates_rounds(mtls_server, pki, npz_models):
    paths, _ = npz_models(1)
    with pytest.raises(AuthError, match="certificate 'site0' may not create rounds"):
        secagg.create_round(mtls_server.address, "r2", template=paths[0], clients=3, tls=pki.client("site0"))
    with pytest.raises(RoundNotFoundError):
        status_of(mtls_server, pki, "r2")
    # On the wire it is PERMISSION_DENIED.
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.certs["site1"].key.read_bytes(),
                                         pki.certs["site1"].cert.read_bytes())
    with grpc.secure_channel(mtls_server.address, creds) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.AggregatorStub(channel).CreateRound(pb.CreateRoundRequest(round_id="r3", expected_clients=3),
                                                    timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert secagg.create_round(mtls_server.address, "r2", template=paths[0], clients=3,
                               tls=pki.client("admin")).state == "collecting"


def test_a_client_not_enrolled_cannot_submit(mtls_server, pki, keypair, client_key, npz_models, helpers):
    paths, tensors = npz_models(3)
    status = secagg.create_round(mtls_server.address, "r1", template=paths[0], clients=3,
                                 enroll=["site0", "site1", "site2"], tls=pki.client("admin"))
    # site3 holds a valid certificate of the federation and submits as itself, but is not enrolled.
    with pytest.raises(AuthError, match="client 'site3' is not enrolled in round 'r1'"):
        secagg.submit(mtls_server.address, "r1", keypair.client, "site3", paths[0], tls=pki.client("site3"))
    header, chunks = helpers.sealed_update(client_key, status, "site3", tensors[0])
    with AggregatorClient(mtls_server.address, tls=pki.client("site3")) as c, pytest.raises(
            AuthError, match="not enrolled"):
        c.submit(header, chunks)
    # Nor can it borrow an enrolled client's name.
    with pytest.raises(AuthError, match="certificate is for 'site3'"):
        secagg.submit(mtls_server.address, "r1", keypair.client, "site0", paths[0], tls=pki.client("site3"))
    s = status_of(mtls_server, pki)
    assert (s.submitted, s.clients, s.enrolled) == (0, (), ("site0", "site1", "site2"))
    for i in range(3):
        secagg.submit(mtls_server.address, "r1", keypair.client, f"site{i}", paths[i], tls=pki.client(f"site{i}"))
    avg = secagg.fetch_average(mtls_server.address, "r1", keypair.client, tls=pki.client("site0"))
    assert avg.clients == ("site0", "site1", "site2")


def test_a_client_not_enrolled_cannot_fetch(mtls_server, pki, keypair, npz_models, tmp_path):
    """The OLD aggregator served any round's sum to any valid certificate. Enrollment now applies to
    fetching as well: site3 holds a valid certificate of the federation but is not enrolled."""
    paths, tensors = npz_models(3)
    secagg.create_round(mtls_server.address, "r1", template=paths[0], clients=3, enroll=["site0", "site1", "site2"],
                        tls=pki.client("admin"))
    for i in range(3):
        secagg.submit(mtls_server.address, "r1", keypair.client, f"site{i}", paths[i], tls=pki.client(f"site{i}"))
    out = tmp_path / "site3.npz"
    with pytest.raises(AuthError, match="client 'site3' is not enrolled in round 'r1', so it may not fetch its sum"):
        secagg.fetch(mtls_server.address, "r1", keypair.client, paths[0], out, tls=pki.client("site3"))
    assert not out.exists()
    # Straight to the aggregator: refused before a byte of the sum is streamed.
    with AggregatorClient(mtls_server.address, tls=pki.client("site3")) as c, pytest.raises(AuthError):
        c.fetch("r1", 0.0)
    # The enrolled sites fetch it.
    assert secagg.fetch_average(mtls_server.address, "r1", keypair.client, tls=pki.client("site2")).contributions == 3
