"""Hostile inputs, in both directions (issue 10, attack 7).

A round's creator or a client sends the aggregator nonsense (a model spec whose shape wraps int64, a
100,000-deep spec, a padded, truncated or oversized polynomial, a coefficient not below q), and a
malicious aggregator serves the same to the sites. Each is refused with a secagg error that names
the problem, before anything is stored or written, and the aggregator keeps serving.
"""

from __future__ import annotations

import dataclasses

import pytest

import secagg
from secagg import envelope
from secagg.errors import AggregateCheckError, CiphertextError, EnvelopeError, ModelFormatError
from secagg.transport import secagg_pb2 as pb
from secagg.transport.client import AggregatorClient

from .conftest import DATA_PRIME

SITES = ("site0", "site1", "site2")
WRAPPING = '[["w",[4294967296,4294967296],"float32"]]'  # 2^64 values: 0 in int64 arithmetic
WRAPPING_NEGATIVE = '[["w",[4294967297,4294967295],"float32"]]'  # 2^64 - 1: -1 in int64 arithmetic
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("spec, match", [
    (WRAPPING, "parameters is beyond any model secagg can aggregate"),
    (WRAPPING_NEGATIVE, "parameters is beyond any model secagg can aggregate"),
    (DEEP, "nested too deeply"),
])
def test_a_hostile_model_spec_is_refused_by_the_aggregator(server, npz_models, keypair, spec, match):
    with AggregatorClient(server.address) as client:
        with pytest.raises(ModelFormatError, match=f"malformed model spec: .*{match}"):
            client.create_round(pb.CreateRoundRequest(round_id="hostile", model_spec_json=spec, expected_clients=3))
        assert client.list_rounds() == []
    # Still serving.
    paths, _ = npz_models(1)
    assert secagg.create_round(server.address, "fine", template=paths[0], clients=1).state == "collecting"


@pytest.mark.parametrize("spec, match", [
    (WRAPPING, "parameters is beyond any model secagg can aggregate"),
    (DEEP, "nested too deeply"),
])
def test_a_hostile_model_spec_is_refused_by_the_sites(malicious_server, npz_models, keypair, tmp_path, spec, match):
    """The aggregator serves the spec to sites that submit and fetch: they refuse it, nothing is sent or written."""
    srv, malice = malicious_server()
    paths, _ = npz_models(3)
    secagg.create_round(srv.address, "r1", template=paths[0], clients=3)
    honest = {"spec": True}

    def serve_hostile(caller, reply):
        if not honest["spec"]:
            reply.model_spec_json = spec

    malice.status = serve_hostile
    honest["spec"] = False
    with pytest.raises(ModelFormatError, match=match):
        secagg.submit(srv.address, "r1", keypair.client, "site0", paths[0])
    assert srv.core.status("r1").submitted == 0
    honest["spec"] = True
    for site, path in zip(SITES, paths):
        secagg.submit(srv.address, "r1", keypair.client, site, path)
    honest["spec"] = False
    out = tmp_path / "out.npz"
    with pytest.raises(ModelFormatError, match=match):
        secagg.fetch(srv.address, "r1", keypair.client, paths[0], out)
    assert not out.exists()


def _doctored(update_chunks, change):
    """Chunks with ``change(c0) -> c0`` applied to the first polynomial, every digest recomputed (as a
    malicious sender would); returns (chunks, update digest)."""
    c0s = list(update_chunks[0].c0s)
    c0s[0] = change(c0s[0])
    first = envelope.Chunk(0, tuple(c0s), update_chunks[0].seeds,
                           envelope.chunk_digest(0, c0s, update_chunks[0].seeds))
    chunks = [first, *update_chunks[1:]]
    return chunks, envelope.update_digest(c.digest for c in chunks)


BAD_POLYNOMIALS = [
    ("padded by one word", lambda c0: c0 + bytes(8), EnvelopeError, "a ciphertext of 65544 \\+ 64 bytes"),
    ("truncated by one word", lambda c0: c0[:-8], EnvelopeError, "a ciphertext of 65528 \\+ 64 bytes"),
    ("3 MB", lambda c0: c0 * 46, EnvelopeError, "a ciphertext of 3014656 \\+ 64 bytes"),
    ("a coefficient equal to q", lambda c0: DATA_PRIME.to_bytes(8, "little") + c0[8:], CiphertextError,
     "is not below the federation's modulus"),
]


@pytest.mark.parametrize("what, change, error, match", BAD_POLYNOMIALS, ids=[b[0] for b in BAD_POLYNOMIALS])
def test_a_bad_polynomial_is_refused_by_the_aggregator(server, client_key, helpers, rng, what, change, error, match):
    """The OLD format stored a ciphertext whose zstd frame inflated to 256 MB. There is no compression
    now: a polynomial is exactly N words below q, or it is refused, and nothing is stored."""
    model = helpers.random_tensors(rng)
    status = secagg.create_round(server.address, "r1", template=model, clients=3)
    header, chunks = helpers.sealed_update(client_key, status, "site0", model)
    chunks, digest = _doctored(chunks, change)
    record = dataclasses.replace(header.contribution, digest=digest)
    with AggregatorClient(server.address) as client, pytest.raises(error, match=match):
        client.submit(dataclasses.replace(header, digest=digest, contribution=record), chunks)
    folder = server.core.state_dir / "rounds" / "r1"
    assert list((folder / "accepted").iterdir()) == [] and list((folder / "incoming").iterdir()) == []
    assert server.core.status("r1").submitted == 0
    # The honest update of the same site is still accepted afterwards: nothing of the bad one was added.
    secagg.submit(server.address, "r1", client_key, "site0", model)
    assert server.core.status("r1").submitted == 1


SERVED = [
    ("padded by one word", lambda c0: c0 + bytes(8), EnvelopeError, "a ciphertext of 65544 \\+ 192 bytes"),
    ("truncated by one word", lambda c0: c0[:-8], EnvelopeError, "a ciphertext of 65528 \\+ 192 bytes"),
    ("a coefficient equal to q", lambda c0: DATA_PRIME.to_bytes(8, "little") + c0[8:], CiphertextError,
     "could not be rebuilt"),
    ("a ciphertext left out", None, AggregateCheckError, "the aggregate has 0 ciphertexts; the round's model needs 1"),
]


@pytest.mark.parametrize("what, change, error, match", SERVED, ids=[s[0] for s in SERVED])
def test_a_bad_polynomial_is_refused_by_the_sites(malicious_server, npz_models, keypair, tmp_path, what, change, error,
                                                  match):
    srv, malice = malicious_server()
    paths, _ = npz_models(3)

    def tamper(caller, round_id, served):
        s = served.copy()
        if change is None:
            return type(s)(s.records, [], [])
        s.c0s[0] = change(s.c0s[0])
        return s

    malice.fetch = tamper
    secagg.create_round(srv.address, "r1", template=paths[0], clients=3)
    for site, path in zip(SITES, paths):
        secagg.submit(srv.address, "r1", keypair.client, site, path)
    for i in range(3):
        out = tmp_path / f"out{i}.npz"
        with pytest.raises(error, match=match):
            secagg.fetch(srv.address, "r1", keypair.client, paths[i], out)
        assert not out.exists()
