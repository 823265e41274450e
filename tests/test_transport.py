"""The gRPC layer with a real server on 127.0.0.1 (port 0): rounds end to end, and every refusal
arriving at the client as the secagg error class the aggregator raised, with its message."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import secagg
from secagg.envelope import Chunk, chunk_digest
from secagg.errors import (
    CiphertextError,
    DuplicateSubmissionError,
    EnvelopeError,
    KeyFileError,
    MessageTooLargeError,
    ModelFormatError,
    OverflowRiskError,
    RoundExistsError,
    RoundNotFoundError,
    RoundStateError,
    SecAggError,
    TransportError,
)
from secagg.packing import ModelSpec
from secagg.transport import secagg_pb2 as pb
from secagg.transport import secagg_pb2_grpc as pb_grpc
from secagg.transport.client import AggregatorClient
from secagg.transport.server import chunk_to_pb, record_to_pb


@pytest.fixture
def sealed_update(helpers):
    return helpers.sealed_update


FLOATS = ("dense/kernel", "dense/bias", "odd", "out/kernel")


@pytest.fixture
def round3(server, keypair, npz_models):
    """A 3-client round on the running server, with three npz models on disk. Its max weight is a
    largest site's sample count (the default 1e5 would encode these tests' weights 100x smaller and
    make the release grid coarser than 1e-6: see helpers.release_bound)."""
    paths, tensors = npz_models(3)
    status = secagg.create_round(server.address, "r1", template=paths[0], clients=3, max_weight=1000.0)
    return status, paths, tensors


def flat(tensors) -> np.ndarray:
    return np.concatenate([tensors[n].ravel() for n in FLOATS])


def assert_released(helpers, avg, status, tensors, weights, strict=True) -> None:
    """``avg`` is the weighted average exactly within the release grid (and within 1e-6 if ``strict``)."""
    tol = helpers.release_tolerance(status, tensors, weights, strict)
    assert np.max(np.abs(avg.vector - flat(helpers.weighted_average(tensors, weights)))) <= tol
    assert abs(avg.total_weight - sum(weights)) <= tol * sum(weights)


def test_server_info(server, server_key):
    with AggregatorClient(server.address) as c:
        info = c.server_info()
    assert info.key_id == server_key.key_id and info.poly_modulus_degree == 8192 and list(info.coeff_modulus_bits) == [60, 60]


def test_multi_client_round_over_grpc(server, keypair, round3, tmp_path, helpers):
    status, paths, tensors = round3
    assert (status.state, status.expected, status.submitted) == ("collecting", 3, 0)
    weights = [120.0, 37.0, 999.0]
    receipts = []
    with ThreadPoolExecutor(3) as pool:  # concurrent clients
        futures = [pool.submit(secagg.submit, server.address, "r1", keypair.client, f"site-{i}", p, w)
                   for i, (p, w) in enumerate(zip(paths, weights))]
        receipts = [f.result() for f in futures]
    assert sorted(r.submitted for r in receipts) == [1, 2, 3]
    assert not any(r.already_accepted for r in receipts)
    assert all(r.num_params == 4807 for r in receipts)
    s = secagg.round_status(server.address, "r1")
    assert (s.state, s.submitted, s.clients) == ("closed", 3, ("site-0", "site-1", "site-2"))

    out = secagg.fetch(server.address, "r1", keypair.client, template=paths[0], out=tmp_path / "global.npz")
    result = secagg.read_model(out)
    assert list(result) == list(tensors[0])
    for name, arr in result.items():
        assert arr.dtype == tensors[0][name].dtype and arr.shape == tensors[0][name].shape
    # float32 tensors are written back as float32 (rounding < 3e-7 for these values): all within the
    # release grid (helpers.release_bound, which counts the float32 rounding), itself below 1e-6 here.
    expected = helpers.weighted_average(tensors, weights)
    tol = helpers.release_tolerance(status, tensors, weights)
    helpers.assert_close_to_average(result, expected, atol=tol, template=tensors[0])
    assert result["steps"] == tensors[0]["steps"]  # the integer counter comes from the template

    avg = secagg.fetch_average(server.address, "r1", keypair.client)
    assert avg.contributions == 3 and avg.clients == ("site-0", "site-1", "site-2")
    assert_released(helpers, avg, status, tensors, weights)


def test_fetch_waits_for_the_last_submission(server, keypair, round3, tmp_path, helpers):
    status, paths, tensors = round3
    weights = [1.0, 2.0, 3.0]
    for i in range(2):
        secagg.submit(server.address, "r1", keypair.client, f"s{i}", paths[i], weights[i])
    with pytest.raises(RoundStateError, match=r"still collecting \(2 of 3 submitted\)"):
        secagg.fetch(server.address, "r1", keypair.client, template=paths[0], out=tmp_path / "early.npz")
    assert not (tmp_path / "early.npz").exists()

    errors = []

    def last():
        try:
            time.sleep(0.5)
            secagg.submit(server.address, "r1", keypair.client, "s2", paths[2], weights[2])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=last)
    t.start()
    avg = secagg.fetch_average(server.address, "r1", keypair.client, wait=120)
    t.join()
    assert not errors
    assert avg.contributions == 3
    # Weights 1-3 against a max weight of 1000: the grid alone allows about 1e-6 here, so the bound is
    # what is asserted (tests with sample-count weights hold 1e-6).
    assert_released(helpers, avg, status, tensors, weights, strict=False)


# -- refusals arrive as the aggregator's error class and message ----------------------------------------


def test_unknown_round(server, keypair, npz_models, tmp_path):
    paths, _ = npz_models(1)
    with pytest.raises(RoundNotFoundError, match="no round 'nope' on this aggregator"):
        secagg.round_status(server.address, "nope")
    with pytest.raises(RoundNotFoundError, match="no round 'nope'"):
        secagg.submit(server.address, "nope", keypair.client, "a", paths[0])
    with pytest.raises(RoundNotFoundError, match="no round 'nope'"):
        secagg.fetch(server.address, "nope", keypair.client, template=paths[0], out=tmp_path / "o.npz")


def test_duplicate_round(server, round3):
    _, paths, _ = round3
    with pytest.raises(RoundExistsError, match="round 'r1' already exists; pick a new round id"):
        secagg.create_round(server.address, "r1", template=paths[0], clients=2)
    assert secagg.round_status(server.address, "r1").expected == 3


@pytest.mark.parametrize("kwargs, cls, match", [
    ({"clients": 0}, SecAggError, "--clients must be at least 1"),
    ({"clients": 2, "min_clients": 3}, SecAggError, "--min-clients must be between 1 and --clients"),
    ({"clients": 2, "max_weight": -5.0}, OverflowRiskError, "max weight must be a positive number"),
    ({"clients": 2, "round_id": "bad/id"}, EnvelopeError, "invalid round id"),
])
def test_bad_round_config(server, npz_models, kwargs, cls, match):
    paths, _ = npz_models(1)
    round_id = kwargs.pop("round_id", "rx")
    with pytest.raises(cls, match=match) as info:
        secagg.create_round(server.address, round_id, template=paths[0], **kwargs)
    assert type(info.value) is cls


def test_duplicate_submission(server, keypair, round3):
    _, paths, _ = round3
    secagg.submit(server.address, "r1", keypair.client, "site-0", paths[0], 5.0)
    with pytest.raises(DuplicateSubmissionError, match="client 'site-0' already submitted a different update"):
        secagg.submit(server.address, "r1", keypair.client, "site-0", paths[1], 5.0)
    s = secagg.round_status(server.address, "r1")
    assert s.submitted == 1 and s.clients == ("site-0",)


def test_identical_resend_is_acknowledged_once(sealed_update, server, client_key, round3, helpers):
    status, _, tensors = round3
    header, chunks = sealed_update(client_key, status, "site-0", tensors[0])
    with AggregatorClient(server.address) as c:
        assert not c.submit(header, chunks).already_accepted
        again = c.submit(header, chunks)
        assert again.already_accepted and again.submitted == 1
        h1, c1 = sealed_update(client_key, status, "site-1", tensors[1])
        c.submit(h1, c1)
        h2, c2 = sealed_update(client_key, status, "site-2", tensors[2])
        assert c.submit(h2, c2).submitted == 3
        # The round is closed now; the last client's resend (lost reply) is still acknowledged.
        late = c.submit(h2, c2)
        assert late.already_accepted and late.submitted == 3
    avg = secagg.fetch_average(server.address, "r1", client_key)
    assert avg.contributions == 3


def test_submission_after_close(sealed_update, server, client_key, keypair, npz_models):
    paths, tensors = npz_models(2)
    status = secagg.create_round(server.address, "r1", template=paths[0], clients=1)
    secagg.submit(server.address, "r1", keypair.client, "a", paths[0])
    # The API refuses before encrypting ...
    with pytest.raises(RoundStateError, match="round 'r1' is closed"):
        secagg.submit(server.address, "r1", keypair.client, "b", paths[1])
    # ... and the aggregator refuses on its own, with its message.
    header, chunks = sealed_update(client_key, status, "b", tensors[1])
    with AggregatorClient(server.address) as c, pytest.raises(RoundStateError,
                                                               match=r"round 'r1' is closed \(1 of 1 submitted\)"):
        c.submit(header, chunks)
    assert secagg.round_status(server.address, "r1").clients == ("a",)


def test_wrong_key(sealed_update, server, keypair, other_keypair, other_client_key, round3):
    status, paths, tensors = round3
    # The API notices before it encrypts anything ...
    with pytest.raises(KeyFileError, match=f"uses key {status.key_id} but {other_client_key.key_id} was given"):
        secagg.submit(server.address, "r1", other_keypair.client, "a", paths[0])
    with pytest.raises(KeyFileError, match="uses key"):
        secagg.fetch_average(server.address, "r1", other_keypair.client)
    # ... and so does the aggregator, for a client that does not use the API.
    header, chunks = sealed_update(other_client_key, status, "a", tensors[0])
    with AggregatorClient(server.address) as c, pytest.raises(
            KeyFileError, match=f"encrypted under key {other_client_key.key_id} but this aggregator serves key "
                                f"{status.key_id}"):
        c.submit(header, chunks)
    # The server key is not a client key.
    with pytest.raises(KeyFileError, match="is a server key"):
        secagg.submit(server.address, "r1", keypair.server, "a", paths[0])
    assert secagg.round_status(server.address, "r1").submitted == 0


def test_other_architecture(sealed_update, server, keypair, client_key, round3, tmp_path, helpers, rng):
    status, _, _ = round3
    layout = dict(helpers.SMALL_LAYOUT, odd=((7,), "float32"))
    other = helpers.random_tensors(rng, layout)
    path = helpers.save_npz(tmp_path / "other.npz", other)
    with pytest.raises(ModelFormatError, match=r"at tensor 3 of 5: the round has 'odd' \(7,\) float64, this model has "
                                               r"'odd' \(7,\) float32\. Names may differ; the layers must be the same"):
        secagg.submit(server.address, "r1", keypair.client, "a", path)
    # A client that does not use the API and sends its own model's structure.
    header, chunks = sealed_update(client_key, dataclasses.replace(status, spec_hash=ModelSpec.of(other).hash), "a",
                                   other)
    with AggregatorClient(server.address) as c, pytest.raises(EnvelopeError, match=r"spec hash differs") as info:
        c.submit(header, chunks)
    assert type(info.value) is EnvelopeError
    assert secagg.round_status(server.address, "r1").submitted == 0


def test_corrupt_ciphertext_and_bad_envelopes(sealed_update, server, client_key, round3, helpers):
    status, _, tensors = round3
    header, chunks = sealed_update(client_key, status, "site-0", tensors[0])
    (good, seed), = helpers.ciphertext_pairs(chunks)
    above_q = good[:-8] + (2**64 - 1).to_bytes(8, "little")  # a coefficient no polynomial mod q has
    bad_header, bad_chunks = helpers.reseal(client_key, status, "site-0", [(above_q, seed)])
    flipped = bytearray(good)
    flipped[777] ^= 4
    zero = bytes(32)
    big_c0, big_seed = (b"x" * 200_000,), (seed,)
    with AggregatorClient(server.address) as c:
        with pytest.raises(CiphertextError, match=r"not valid for this federation \(ciphertext 0: a ciphertext "
                                                  r"coefficient is not below"):
            c.submit(bad_header, bad_chunks)
        with pytest.raises(EnvelopeError, match="chunk 0 failed its checksum"):
            c.submit(header, [dataclasses.replace(chunks[0], c0s=(bytes(flipped),))])
        with pytest.raises(EnvelopeError, match=r"update is truncated: got 0 of 1 chunks"):
            c.submit(header, [])
        with pytest.raises(EnvelopeError, match="chunk 1 arrived where chunk 0 was expected"):
            c.submit(header, [dataclasses.replace(chunks[0], index=1)])
        with pytest.raises(EnvelopeError, match="digest does not match its header"):
            c.submit(dataclasses.replace(header, digest=zero,
                                         contribution=dataclasses.replace(header.contribution, digest=zero)), chunks)
        with pytest.raises(EnvelopeError, match="carries no contribution record for its own client id and digest"):
            other = dataclasses.replace(header.contribution, client_id="site-1")
            c.submit(dataclasses.replace(header, contribution=other), chunks)
        with pytest.raises(EnvelopeError, match=r"a ciphertext of 200000 \+ 64 bytes; this federation's are 65536 "
                                                r"\+ 64"):
            c.submit(header, [Chunk(0, big_c0, big_seed, chunk_digest(0, big_c0, big_seed))])
        with pytest.raises(EnvelopeError, match="format version 9 is not supported"):
            c.submit(dataclasses.replace(header, format_version=9), chunks)
        assert secagg.round_status(server.address, "r1").submitted == 0
        # None of that was recorded: the genuine update goes through, and the round still averages exactly.
        assert c.submit(header, chunks).submitted == 1
        for i in (1, 2):
            c.submit(*sealed_update(client_key, status, f"site-{i}", tensors[i]))
    avg = secagg.fetch_average(server.address, "r1", client_key)
    assert avg.contributions == 3
    # Equal weights of 1 under a max weight of 1000: exact within the grid (about 3e-6 here), not to 1e-6.
    assert_released(helpers, avg, status, tensors, [1.0, 1.0, 1.0], strict=False)


def test_an_update_cut_into_other_chunks_is_refused(server, client_key, helpers, rng):
    """Over gRPC as in the core: an update of 25 ciphertexts must come as chunks of 24 + 1."""
    layout = {"w": ((200_000,), "float32")}
    model = helpers.random_tensors(rng, layout)
    status = secagg.create_round(server.address, "cut", template=model, clients=1)
    header, chunks = helpers.sealed_update(client_key, status, "a", model)
    assert [len(c.c0s) for c in chunks] == [24, 1]
    ones_header, ones = helpers.reseal(client_key, status, "a", helpers.ciphertext_pairs(chunks), per_chunk=1)
    with AggregatorClient(server.address) as c:
        with pytest.raises(EnvelopeError, match="chunk 0 holds 1 ciphertexts; updates are cut into chunks of 24"
                           ) as info:
            c.submit(ones_header, ones)
        assert type(info.value) is EnvelopeError
        assert secagg.round_status(server.address, "cut").submitted == 0
        assert c.submit(header, chunks).submitted == 1


@pytest.mark.parametrize("spec", [
    [["w", [2**32, 2**32], "float32"]],  # 2^64 parameters: 0 in int64
    [["w", [2**62, 4], "float32"]],
    [["w", [2**31, 2**31, 4], "float32"]],
    [["a", [2**40], "float32"], ["b", [2**40], "float32"]],
    "deep",
], ids=["2^32x2^32", "2^62x4", "2^31x2^31x4", "two-2^40", "100000-deep"])
def test_spec_limits_are_invalid_argument(server, spec):
    """Sizes that wrap int64 and JSON nested 100,000 deep are refused as INVALID_ARGUMENT, not UNKNOWN
    (an unhandled exception), and create nothing."""
    deep = "[" * 100_000 + "]" * 100_000
    text = deep if spec == "deep" else json.dumps(spec)
    channel = grpc.insecure_channel(server.address)
    try:
        stub = pb_grpc.AggregatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateRound(pb.CreateRoundRequest(round_id="limits", model_spec_json=text, expected_clients=3),
                             timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().strip()
        # The same depth in the DP settings (which the aggregator parses too).
        valid = json.dumps([["w", [10], "float32"]])
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateRound(pb.CreateRoundRequest(round_id="limits", model_spec_json=valid, expected_clients=3,
                                                   dp_json=deep), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    finally:
        channel.close()
    with pytest.raises(RoundNotFoundError):
        secagg.round_status(server.address, "limits")
    assert not (server.core.state_dir / "rounds" / "limits").exists()


def test_a_stream_without_header_or_without_record(sealed_update, server, client_key, round3):
    status, _, tensors = round3
    header, chunks = sealed_update(client_key, status, "site-0", tensors[0])
    no_record = pb.UpdateHeader(
        format_version=header.format_version, round_id="r1", client_id="site-0", key_id=header.key_id,
        spec_hash=header.spec_hash, num_ciphertexts=header.num_ciphertexts, num_chunks=header.num_chunks,
        digest=header.digest)
    channel = grpc.insecure_channel(server.address)
    try:
        stub = pb_grpc.AggregatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(iter([pb.SubmitMessage(chunk=pb.Chunk(index=0))]), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must start with its header" in info.value.details()
        assert dict(info.value.trailing_metadata())["secagg-error"] == "EnvelopeError"
        # A format-1 style header (no contribution record) is refused before any chunk is read.
        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(iter([pb.SubmitMessage(header=no_record)] + [pb.SubmitMessage(chunk=chunk_to_pb(c))
                                                                     for c in chunks]), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "carries no contribution record" in info.value.details()
    finally:
        channel.close()
    assert secagg.round_status(server.address, "r1").submitted == 0


def test_overflow_is_refused_by_the_client(server, keypair, npz_models, tmp_path, helpers):
    paths, tensors = npz_models(1)
    secagg.create_round(server.address, "r1", template=paths[0], clients=2, max_weight=10.0, value_bound=5.0)
    with pytest.raises(OverflowRiskError, match="--max-weight 11"):
        secagg.submit(server.address, "r1", keypair.client, "a", paths[0], weight=11.0)
    big = dict(tensors[0], odd=np.full(7, 6.0))
    with pytest.raises(OverflowRiskError, match="--value-bound 8"):
        secagg.submit(server.address, "r1", keypair.client, "a", helpers.save_npz(tmp_path / "big.npz", big))
    assert secagg.round_status(server.address, "r1").submitted == 0


def test_oversize_message_is_refused_and_changes_nothing(sealed_update, server, client_key, round3):
    status, _, tensors = round3
    header, chunks = sealed_update(client_key, status, "big", tensors[0])
    huge, seed = (os.urandom(5 * 1024 * 1024),), chunks[0].seeds[0]

    def messages():
        yield pb.SubmitMessage(header=pb.UpdateHeader(
            format_version=header.format_version, round_id="r1", client_id="big", key_id=header.key_id,
            spec_hash=header.spec_hash, num_ciphertexts=header.num_ciphertexts, num_chunks=header.num_chunks,
            digest=header.digest, contribution=record_to_pb(header.contribution)))
        yield pb.SubmitMessage(chunk=pb.Chunk(index=0, c0=list(huge), seeds=[seed],
                                              digest=chunk_digest(0, huge, [seed])))

    channel = grpc.insecure_channel(server.address)  # no client-side limit: the server must refuse
    try:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.AggregatorStub(channel).Submit(messages(), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        channel.close()
    # Through secagg's client the same refusal is a MessageTooLargeError.
    with AggregatorClient(server.address) as c, pytest.raises(MessageTooLargeError, match="under 4 MiB"):
        c.submit(header, [Chunk(0, huge, (seed,), chunk_digest(0, huge, [seed]))])
    s = secagg.round_status(server.address, "r1")
    assert (s.state, s.submitted, s.clients) == ("collecting", 0, ())
    incoming = server.core.state_dir / "rounds" / "r1" / "incoming"
    assert wait_until_empty(incoming)
    # The same client can then submit its real update.
    with AggregatorClient(server.address) as c:
        assert c.submit(header, chunks).submitted == 1


def wait_until_empty(folder, timeout=30.0):
    """The aborted call's handler may still be unwinding: wait for its partial file to go."""
    end = time.monotonic() + timeout
    while any(folder.iterdir()) and time.monotonic() < end:
        time.sleep(0.05)
    return not any(folder.iterdir())


def test_failed_round_over_grpc(keypair, tmp_path, npz_models):
    paths, _ = npz_models(1)
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state", min_cohort=1)
    try:
        secagg.create_round(srv.address, "r1", template=paths[0], clients=3, min_clients=2, deadline=0.3)
        secagg.submit(srv.address, "r1", keypair.client, "only-me", paths[0])
        # The server's ticker (or the next status call) fails the round once the deadline passed.
        with pytest.raises(RoundStateError, match=r"round 'r1' failed: deadline passed with 1 of 3 .*only-me"):
            secagg.fetch_average(srv.address, "r1", keypair.client, wait=60)
        s = secagg.round_status(srv.address, "r1")
        assert s.state == "failed" and "only-me" in s.reason and s.deadline_unix is not None
    finally:
        srv.stop(0)


def test_unreachable_server_is_a_transport_error(keypair, npz_models):
    paths, _ = npz_models(1)
    srv = secagg.serve(keypair.server, "127.0.0.1:0", paths[0].parent / "state", min_cohort=1)
    address = srv.address
    srv.stop(0)
    with pytest.raises(TransportError, match=f"cannot reach the aggregator at {address}"):
        secagg.round_status(address, "r1", retry_for=0)
    with pytest.raises(TransportError):
        secagg.submit(address, "r1", keypair.client, "a", paths[0], retry_for=0)
