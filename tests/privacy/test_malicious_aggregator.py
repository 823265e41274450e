"""The aggregator is the adversary: every attack of issue 10 that goes through what it serves.

Each test runs a real aggregator (``secagg.serve`` on 127.0.0.1, the real core and gRPC server)
whose servicer is a test double that tampers with what it serves (``malicious_server`` in
conftest.py): the summed c0 polynomials, the contributors' seeds and records, the round's settings,
per caller under mutual TLS. It also keeps every update it received, as a malicious aggregator
would. The honest sites use the public API (``secagg.submit``, ``secagg.fetch``) and must refuse
with :class:`AggregateCheckError` (or the error class named) and a message naming the problem,
writing nothing. Attacks through the state dir are in test_state_dir.py, hostile inputs in
test_hostile_inputs.py, passive key recovery from a release in test_release.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import secagg
from secagg import contribution, envelope, slots, store
from secagg.contribution import Contribution
from secagg.errors import AggregateCheckError
from secagg.privacy.mechanism import DPConfig
from secagg.release import grid, release
from secagg.transport.client import AggregatorClient

from .conftest import (
    DATA_PRIME,
    N,
    add_mod_q,
    encode_reals,
    key_from_decryption,
    plaintext_of,
    raw_decryption,
    second_polynomial,
    secret_key_words,
    sub_mod_q,
    words,
)

# 9,216 + 96 + 768 = 10,080 parameters and the weight: two ciphertexts, so that a check of one
# ciphertext cannot stand in for another's. "steps" is an integer counter, never aggregated.
LAYOUT = {"dense/kernel": ((96, 96), "float32"), "dense/bias": ((96,), "float32"),
          "head/kernel": ((96, 8), "float32"), "steps": ((), "int64")}
NUM_PARAMS = 96 * 96 + 96 + 96 * 8
SITES = ("site0", "site1", "site2")
WEIGHTS = (30.0, 50.0, 20.0)
MAX_WEIGHT = 50.0
SITES4, WEIGHTS4 = SITES + ("site3",), WEIGHTS + (40.0,)
VALUE_BOUND = 10.0
#: The weight the +0.01 attack moves: in the second ciphertext (data slot 1,325 of it).
TARGET = 8175 + 1325


@pytest.fixture
def models(tmp_path, helpers, rng):
    """Three sites' models on disk (npz), and their tensors."""
    tensors = [helpers.random_tensors(rng, LAYOUT) for _ in SITES]
    paths = [helpers.save_npz(tmp_path / f"{site}.npz", t) for site, t in zip(SITES, tensors)]
    return paths, tensors


def run_round(address, round_id, paths, key, sites=SITES, weights=WEIGHTS, tls=None, admin=None, **options):
    """Create a round for len(sites) clients and have every site submit; returns the round's status."""
    secagg.create_round(address, round_id, template=paths[0], clients=len(sites), max_weight=MAX_WEIGHT,
                        value_bound=VALUE_BOUND, tls=admin, **options)
    for site, path, weight in zip(sites, paths, weights):
        secagg.submit(address, round_id, key, site, path, weight=weight, tls=tls(site) if tls else None)
    return secagg.round_status(address, round_id, tls=admin)


def expected_average(tensors, weights=WEIGHTS) -> np.ndarray:
    w = np.asarray(weights)
    flat = [np.concatenate([np.asarray(t[n], dtype=np.float64).ravel() for n in LAYOUT if n != "steps"])
            for t in tensors]
    return np.tensordot(w, np.stack(flat), axes=1) / w.sum()


def assert_refused(address, round_id, key, paths, tmp_path, match, sites=SITES, tls=None, error=AggregateCheckError):
    """Every site's secagg.fetch raises ``error`` matching ``match`` and writes no model file."""
    for i, site in enumerate(sites):
        out = tmp_path / f"fetched-{round_id}-{site}.npz"
        with pytest.raises(error, match=match):
            secagg.fetch(address, round_id, key, paths[i % len(paths)], out, tls=tls(site) if tls else None)
        assert not out.exists(), f"{site} wrote a model from a refused aggregate"


def encoded_weight_sum(status, weights=WEIGHTS) -> float:
    """The summed weight in the encoded domain: w = headroom * weight / max_weight per site."""
    headroom = slots.VALUE_LIMIT / (status.expected * status.value_bound)
    return headroom * sum(weights) / status.max_weight


# -- attack 1: key recovery from a perturbed second polynomial ------------------------------------


def test_served_aggregate_has_no_second_polynomial(malicious_server, keypair, client_key, models, tmp_path):
    """The old attack's precondition: the aggregator served (c0, c1) and could add t to c1. Now it holds
    and serves c0 and seeds only, and the clients check the seeds they expand."""
    srv, malice = malicious_server()
    seen = []
    malice.fetch = lambda caller, round_id, served: seen.append(served.copy()) or served
    paths, tensors = models
    run_round(srv.address, "r1", paths, keypair.client)
    average = secagg.fetch_average(srv.address, "r1", keypair.client)
    np.testing.assert_allclose(average.vector, expected_average(tensors), atol=1e-6)  # the honest path works

    (served,) = seen
    assert len(served.c0s) == slots.num_ciphertexts(NUM_PARAMS) == 2
    # Per ciphertext: one polynomial of N words, each < q (NTT form), and one 64-byte seed per contributor.
    for c0, seeds in zip(served.c0s, served.seeds):
        assert len(c0) == N * 8 and int(words(c0).max()) < DATA_PRIME
        assert [len(s) for s in seeds] == [64, 64, 64]
    # The aggregate on disk is the same: summed c0 || three seeds per ciphertext, not one byte more.
    on_disk = list(store.iter_blobs(tmp_path / "evil-state" / "rounds" / "r1" / "aggregate"))
    assert [len(b) for b in on_disk] == [N * 8 + 3 * 64] * 2
    assert [b[:N * 8] for b in on_disk] == served.c0s
    # The summed c0 is exactly the sum mod q of what the sites sent (nothing else went in).
    for i in range(2):
        assert served.c0s[i] == add_mod_q(*(malice.update("r1", s)[0][i] for s in SITES))


@pytest.mark.parametrize("how", ["flip a byte of a seed", "new seed and recomputed seeds digest", "swap two seeds"])
def test_an_altered_seed_is_refused(malicious_server, keypair, models, tmp_path, how):
    """Changing c1 means changing a seed: refused by its digest, or by the tag over the digest."""
    srv, malice = malicious_server()
    paths, _ = models

    def tamper(caller, round_id, served):
        served = served.copy()
        s = served.seeds[1][1]
        if how == "flip a byte of a seed":
            served.seeds[1][1] = s[:10] + bytes([s[10] ^ 1]) + s[11:]
        elif how == "swap two seeds":  # site1's seeds of ciphertexts 0 and 1
            served.seeds[0][1], served.seeds[1][1] = served.seeds[1][1], served.seeds[0][1]
        else:
            served.seeds[1][1] = hashlib.sha512(b"attacker's seed").digest()
            r = served.records[1]
            served.records[1] = Contribution(r.client_id, r.digest,
                                             contribution.seeds_digest(seeds[1] for seeds in served.seeds),
                                             r.tag, r.certificate, r.signature)
        return served

    malice.fetch = tamper
    run_round(srv.address, "r1", paths, keypair.client)
    match = ("does not carry a valid tag" if how.startswith("new") else
             "the seeds served for 'site1' are not the ones it sent")
    assert_refused(srv.address, "r1", keypair.client, paths, tmp_path, match)


def _with_second_polynomial_shifted(key, c0: bytes, seeds: list[bytes], t: int) -> np.ndarray:
    """The raw decryption of (c0, c1 + t): the OLD format let the aggregator serve this ciphertext.
    Built by hand from SEAL's serialization (FACTS: payload, DynArray of c0 then c1)."""
    import tenseal.sealapi as seal

    from secagg import ciphertexts
    from secagg.ciphertexts import _C0_START, _Scratch

    codec = ciphertexts.codec(key)
    ct = codec._load(c0, seeds[0])
    for s in seeds[1:]:
        seal.Evaluator(key.context).add_inplace(ct, codec._load(bytes(N * 8), s))
    body = bytearray(codec._body(ct))  # unseeded now: c0 and c1, 2N words
    assert int.from_bytes(body[_C0_START - 8:_C0_START], "little") == 2 * N
    c1 = np.frombuffer(bytes(body[_C0_START + N * 8:_C0_START + 2 * N * 8]), dtype="<u8").astype(object)
    c1 = np.array([(int(x) + t) % DATA_PRIME for x in c1], dtype=np.uint64)
    body[_C0_START + N * 8:_C0_START + 2 * N * 8] = c1.astype("<u8").tobytes()
    blob = b"\x5e\xa1\x10\x04\x03\x00\x00\x00" + (len(body) + 16).to_bytes(8, "little") + bytes(body)
    path = _Scratch.path()
    Path(path).write_bytes(blob)
    tampered = seal.Ciphertext()
    tampered.load(key.context, path)
    Path(path).unlink()
    pt = seal.Plaintext()
    codec.decryptor.decrypt(tampered, pt)
    z = np.asarray(codec.encoder.decode_complex(pt), dtype=np.complex128)
    out = np.empty(N)
    out[0::2], out[1::2] = z.real, z.imag
    return out


def test_key_recovery_needs_raw_decryptions(malicious_server, keypair, client_key, models, tmp_path):
    """Sanity check of attack 1's arithmetic, so that a regression releasing raw values would be caught:
    two RAW decryptions of (c0, c1) and (c0, c1 + t) give the secret key (their difference is t*s);
    the released values of the same two decryptions do not, and released values are grid points that
    two sites receive identically."""
    srv, malice = malicious_server()
    seen = []
    malice.fetch = lambda caller, round_id, served: seen.append(served.copy()) or served
    paths, tensors = models
    status = run_round(srv.address, "r1", paths, keypair.client)
    averages = [secagg.fetch_average(srv.address, "r1", keypair.client) for _ in SITES]
    served = seen[0]

    honest = raw_decryption(client_key, served.c0s[0], served.seeds[0])
    t = 1
    shifted = _with_second_polynomial_shifted(client_key, served.c0s[0], served.seeds[0], t)
    # The attack with raw values: re-encode the difference (= t*s / scale), divide by t: the key.
    diff = plaintext_of(shifted - honest)
    recovered = [(d * pow(t, -1, DATA_PRIME)) % DATA_PRIME for d in diff]
    assert recovered == secret_key_words(client_key), "the key-recovery arithmetic fails; the test proves nothing"
    # One raw decryption and the ciphertext (c0, and c1 expanded from the public seeds) are enough too.
    c1 = second_polynomial(client_key, served.seeds[0])
    assert key_from_decryption(honest, served.c0s[0], c1) == secret_key_words(client_key)

    # What a client releases of the same two decryptions: the grid points, identical (t*s/scale is
    # ~1e-10, the grid 2^-18 here), so their difference is zero and carries nothing about s.
    n = 3
    assert np.count_nonzero(release(honest, n) != release(shifted, n)) <= 2  # near a grid boundary, at most
    released_diff = plaintext_of(release(shifted, n) - release(honest, n))
    from_release = [(d * pow(t, -1, DATA_PRIME)) % DATA_PRIME for d in released_diff]
    assert sum(a == b for a, b in zip(from_release, secret_key_words(client_key))) <= 1

    # The API's released values are grid points in the encoded domain (raw values would not be), and
    # every site received the same ones.
    g = grid(n)
    wsum = encoded_weight_sum(status)
    for a in averages:
        np.testing.assert_array_equal(a.vector, averages[0].vector)
        assert a.total_weight == averages[0].total_weight
    wsum_released = averages[0].total_weight * slots.VALUE_LIMIT / (status.expected * status.value_bound) / MAX_WEIGHT
    assert abs(wsum_released / g - round(wsum_released / g)) < 1e-6 and abs(wsum_released - wsum) <= g
    units = averages[0].vector * wsum_released / g
    assert np.max(np.abs(units - np.round(units))) < 1e-4, "released values are not grid points"
    raw_units = raw_decryption(client_key, served.c0s[0], served.seeds[0])[:1000] / g
    assert np.mean(np.abs(raw_units - np.round(raw_units)) > 1e-4) > 0.9  # raw values would fail the check above
    np.testing.assert_allclose(averages[0].vector, expected_average(tensors), atol=1e-6)


# -- attack 2: one site's model handed to everyone --------------------------------------------------


@pytest.mark.parametrize("how, match", [
    ("site1 three times", "lists a contributor twice"),
    ("site1 three times, under the three real records", "counts .* contributions but the round lists 3"),
    ("site1 three times, renamed site0 and site2", "contribution of 'site0' does not carry a valid tag"),
    ("site1 alone", "1 contribution\\(s\\), fewer than this site's minimum cohort 3"),
])
def test_one_sites_update_cannot_be_served_as_the_average(malicious_server, keypair, models, tmp_path, how, match):
    """Serve "3 x site1's update" so that every site receives site1's model as the average."""
    srv, malice = malicious_server()
    paths, _ = models

    def tamper(caller, round_id, served):
        c0s, seeds = malice.update(round_id, "site1")
        site1 = served.records[1]
        if how == "site1 alone":
            return type(served)([site1], c0s, [[s] for s in seeds])
        tripled = [add_mod_q(c, c, c) for c in c0s]
        if how == "site1 three times":
            return type(served)([site1] * 3, tripled, [[s] * 3 for s in seeds])
        if how.endswith("real records"):
            return type(served)(served.records, tripled, served.seeds)
        renamed = [Contribution(name, site1.digest, site1.seeds_digest, site1.tag) for name in SITES]
        return type(served)(renamed, tripled, [[s] * 3 for s in seeds])

    malice.fetch = tamper
    run_round(srv.address, "r1", paths, keypair.client)
    assert_refused(srv.address, "r1", keypair.client, paths, tmp_path, match)


@pytest.mark.parametrize("how, min_clients, match", [
    ("drop a record, keep the sum", 3, "counts .* contributions but the round lists 3"),
    ("drop a record and its update", 4, "3 contribution\\(s\\), fewer than the round's minimum of 4"),
    ("repeat a record", 4, "lists a contributor twice"),
    ("a record from another round", 4, "contribution of 'site2' does not carry a valid tag for round 'r2'"),
    ("invent a contributor", 4, "contribution of 'site9' does not carry a valid tag"),
])
def test_a_sum_with_records_dropped_repeated_or_moved_is_refused(malicious_server, keypair, models, tmp_path,
                                                                   how, min_clients, match):
    """r2 has 4 sites; the aggregator drops, repeats, invents a contributor or swaps in site2's update of
    round r1 (which it kept), re-summing c0 consistently where it can."""
    srv, malice = malicious_server()
    paths, _ = models

    def tamper(caller, round_id, served):
        if round_id != "r2":
            return served
        s = served.copy()
        if how == "drop a record, keep the sum":
            return type(s)(s.records[:3], s.c0s, [x[:3] for x in s.seeds])
        if how == "drop a record and its update":  # a consistent sum of 3 of the round's 4 (min_clients 4)
            c0s = [sub_mod_q(total, own) for total, own in zip(s.c0s, malice.update("r2", "site3")[0])]
            return type(s)(s.records[:3], c0s, [x[:3] for x in s.seeds])
        if how == "repeat a record":
            c0s = [add_mod_q(total, own) for total, own in zip(s.c0s, malice.update("r2", "site1")[0])]
            return type(s)(s.records + [s.records[1]], c0s, [x + [x[1]] for x in s.seeds])
        if how == "a record from another round":  # site2's update of r1 (same model size) in place of r2's
            old_c0s, old_seeds = malice.update("r1", "site2")
            header, _ = malice.updates[("r1", "site2")]
            c0s = [add_mod_q(sub_mod_q(total, new), old)
                   for total, new, old in zip(s.c0s, malice.update("r2", "site2")[0], old_c0s)]
            return type(s)(s.records[:2] + [header.contribution] + s.records[3:], c0s,
                           [x[:2] + [o] + x[3:] for x, o in zip(s.seeds, old_seeds)])
        # invent a contributor: site1's update again, under a fourth id with a made-up tag
        own_c0s, own_seeds = malice.update("r2", "site1")
        r = s.records[1]
        c0s = [add_mod_q(total, own) for total, own in zip(s.c0s, own_c0s)]
        fake = Contribution("site9", r.digest, r.seeds_digest, hashlib.sha256(b"made up").digest())
        return type(s)(s.records + [fake], c0s, [x + [o] for x, o in zip(s.seeds, own_seeds)])

    malice.fetch = tamper
    run_round(srv.address, "r1", paths, keypair.client)
    run_round(srv.address, "r2", paths + paths[:1], keypair.client, sites=SITES4, weights=WEIGHTS4,
              min_clients=min_clients)
    assert_refused(srv.address, "r2", keypair.client, paths, tmp_path, match, sites=SITES4)
    secagg.fetch(srv.address, "r1", keypair.client, paths[0], tmp_path / "r1.npz")  # the untouched round is fine
    assert (tmp_path / "r1.npz").exists()


# -- the required one: a chosen shift of the sum --------------------------------------------------


def _shift_words(status, slot: int, model_units: float) -> np.ndarray:
    """The plaintext polynomial that moves weight ``slot`` of the released average by ``model_units``:
    the average is sum / total weight, so the sum's slot moves by model_units * (summed encoded weight)."""
    reals = np.zeros(N)
    reals[slot % slots.DATA_SLOTS] = model_units * encoded_weight_sum(status)
    return encode_reals(reals)


def test_a_chosen_shift_of_the_sum_is_refused(malicious_server, keypair, models, tmp_path, monkeypatch):
    """The aggregator adds encode(delta) to the sum's c0 so that one weight moves by +0.01 in the
    released model. Every fetching site refuses: the ciphertext's check slots no longer hold."""
    srv, malice = malicious_server()
    paths, tensors = models
    ciphertext = TARGET // slots.DATA_SLOTS
    shift = {}

    def tamper(caller, round_id, served):
        s = served.copy()
        s.c0s[ciphertext] = add_mod_q(s.c0s[ciphertext], shift["words"])
        return s

    malice.fetch = tamper
    status = run_round(srv.address, "r1", paths, keypair.client)
    shift["words"] = _shift_words(status, TARGET, 0.01)
    assert_refused(srv.address, "r1", keypair.client, paths, tmp_path,
                   f"ciphertext {ciphertext} of the sum fails its integrity check .*the aggregator altered the "
                   "encrypted sum; nothing was written")

    # Positive control: the attack is real and only the checks stop it. With the tolerance of counts and
    # checks made infinite, the same tampered sum is accepted and carries exactly the +0.01.
    monkeypatch.setattr(slots, "CHECK_SIGMAS", float("inf"))
    average = secagg.fetch_average(srv.address, "r1", keypair.client)
    moved = average.vector - expected_average(tensors)
    assert abs(moved[TARGET] - 0.01) < 1e-6
    assert np.max(np.abs(np.delete(moved, TARGET))) < 1e-6  # nothing else moved


def test_a_shift_served_to_one_site_is_refused_by_that_site(malicious_server, keypair, pki, models, tmp_path):
    """Under mutual TLS the aggregator knows who fetches: the shifted sum goes to site1 only. site1
    refuses; the others get the right average (the tampering machinery leaves honest fetches intact)."""
    srv, malice = malicious_server(tls=pki.server_tls())
    paths, tensors = models
    shift = {}

    def tamper(caller, round_id, served):
        if caller != "site1":
            return served
        s = served.copy()
        s.c0s[0] = add_mod_q(s.c0s[0], shift["words"])
        return s

    malice.fetch = tamper
    status = run_round(srv.address, "r1", paths, keypair.client, tls=pki.client, admin=pki.client("admin"))
    shift["words"] = _shift_words(status, 3, 0.01)
    assert_refused(srv.address, "r1", keypair.client, paths, tmp_path,
                   "ciphertext 0 of the sum fails its integrity check", sites=("site1",), tls=pki.client)
    for site in ("site0", "site2"):
        average = secagg.fetch_average(srv.address, "r1", keypair.client, tls=pki.client(site))
        np.testing.assert_allclose(average.vector, expected_average(tensors), atol=1e-6)
    assert [c for c, _ in malice.served_to] == ["site1", "site0", "site2"]


# -- attack 4: replayed updates --------------------------------------------------------------------


@pytest.mark.parametrize("as_client", ["site2", "site9"])
def test_a_replayed_update_is_refused(malicious_server, keypair, models, tmp_path, as_client):
    """The aggregator replays site2's recorded Submit stream of round r1 into round r2 (under site2's id,
    or under another id) to complete r2's cohort with it. The honest core cannot tell (it has no
    key); every fetching site refuses the tag, which binds round and client id."""
    srv, malice = malicious_server()
    paths, _ = models
    run_round(srv.address, "r1", paths, keypair.client)
    secagg.create_round(srv.address, "r2", template=paths[0], clients=3, max_weight=MAX_WEIGHT, value_bound=VALUE_BOUND)
    for site, path, weight in zip(SITES[:2], paths, WEIGHTS):
        secagg.submit(srv.address, "r2", keypair.client, site, path, weight=weight)
    header, pairs = malice.updates[("r1", "site2")]
    record = replace(header.contribution, client_id=as_client)
    replayed = replace(header, round_id="r2", client_id=as_client, contribution=record)
    with AggregatorClient(srv.address) as client:
        reply = client.submit(replayed, envelope.split_chunks(pairs))
    assert reply.submitted == 3 and secagg.round_status(srv.address, "r2").state == "closed"
    assert_refused(srv.address, "r2", keypair.client, paths, tmp_path,
                   f"contribution of '{as_client}' does not carry a valid tag for round 'r2'")


# -- attack 5: different round settings for different sites ----------------------------------------


@pytest.mark.parametrize("setting", ["dp noise multiplier", "dp clip norm", "max weight"])
def test_settings_served_per_site_fail_the_tags(malicious_server, keypair, pki, models, tmp_path, setting):
    """The aggregator tells site0 other round settings than the other sites (e.g. half the DP noise, so
    that site0's update is less protected than it believes the round promises). site0 submits under
    the settings it was shown, and every contribution's tag binds the settings its site saw: every
    fetching site finds a tag that does not verify."""
    srv, malice = malicious_server(tls=pki.server_tls())
    srv.core.ca_pem = None  # the attacker skips its own signature check (it would refuse site0 at submit)
    paths, _ = models

    def lie_to_site0(caller, reply):
        if caller != "site0":
            return
        if setting == "max weight":
            reply.max_weight = reply.max_weight * 2
            return
        dp = json.loads(reply.dp_json)
        dp["noise_multiplier" if setting == "dp noise multiplier" else "clip_norm"] *= 0.5
        reply.dp_json = json.dumps(dp)

    malice.status = lie_to_site0
    dp = DPConfig(clip_norm=100.0, noise_multiplier=1.0, delta=1e-5, mode="local", min_honest=1)
    weights = (1.0, 1.0, 1.0) if setting.startswith("dp") else WEIGHTS
    run_round(srv.address, "r1", paths, keypair.client, weights=weights, tls=pki.client, admin=pki.client("admin"),
              dp=dp if setting.startswith("dp") else None)
    seen = {site: secagg.round_status(srv.address, "r1", tls=pki.client(site)) for site in SITES}
    assert seen["site0"] != seen["site1"] == seen["site2"]  # the lie reached site0 only
    # Every site refuses: site0 finds site1's tag wrong, the others find site0's.
    for site in SITES:
        culprit = "site1" if site == "site0" else "site0"
        assert_refused(srv.address, "r1", keypair.client, paths, tmp_path,
                       f"contribution of '{culprit}' does not carry a valid tag for round 'r1' with these settings",
                       sites=(site,), tls=pki.client)


# -- a known limit: different subsets for different sites ------------------------------------------


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception,
                   reason="known limit (docs/privacy-audit.md, section 18): when a round may close with fewer "
                          "contributions than it expects (--min-clients below --clients), a sum of any subset of at "
                          "least --min-clients contributors passes every check, and no site sees what the others got")
def test_different_subsets_for_different_sites_are_refused(malicious_server, keypair, pki, models, tmp_path):
    """Round of 4 that may close with 3. The aggregator serves site0 the sum of all 4, and site1 the sum
    of site0-site2 (re-summed from the c0s it kept). Both pass every check; the two released averages
    with their total weights give site3's model. The test asserts what should happen (site1 refuses)
    after checking that the leak is real; it fails today, hence xfail."""
    srv, malice = malicious_server(tls=pki.server_tls())
    paths, tensors = models
    sites = ("site0", "site1", "site2", "site3")

    def tamper(caller, round_id, served):
        if caller != "site1":
            return served
        c0s = [sub_mod_q(total, own) for total, own in zip(served.c0s, malice.update(round_id, "site3")[0])]
        return type(served)(served.records[:3], c0s, [s[:3] for s in served.seeds])

    malice.fetch = tamper
    run_round(srv.address, "r1", paths + paths[:1], keypair.client, sites=sites, weights=WEIGHTS4, tls=pki.client,
              admin=pki.client("admin"), min_clients=3)
    full = secagg.fetch_average(srv.address, "r1", keypair.client, tls=pki.client("site0"))
    subset = secagg.fetch_average(srv.address, "r1", keypair.client, tls=pki.client("site1"))
    assert (full.contributions, subset.contributions) == (4, 3)
    site3 = (full.vector * full.total_weight - subset.vector * subset.total_weight) / WEIGHTS4[3]
    np.testing.assert_allclose(site3, expected_average(tensors[:1], weights=(1.0,)), atol=1e-5)  # site3 = site0's model
    assert_refused(srv.address, "r1", keypair.client, paths, tmp_path, "contribution", sites=("site1",), tls=pki.client)


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception,
                   reason="known limit (docs/privacy-audit.md, section 18): a tag binds the round id, not a moment; "
                          "an aggregator that starts afresh and reuses a round id with the same settings can replay "
                          "that round's old updates, and no site can tell them from fresh ones")
def test_updates_replayed_into_a_reused_round_id_are_refused(malicious_server, keypair, models, tmp_path, helpers, rng):
    """Life 1: round r1 of site0-site2, released. Life 2 (a new state dir, same key): r1 again, same settings;
    only site0 submits, with a new model; the aggregator replays site1's and site2's recorded updates of
    life 1. site0 accepts the sum, and the two releases give the change of site0's model, an individual
    update that the cohort minimum should hide. The test asserts that site0 refuses; it fails today."""
    old, malice = malicious_server(name="life1")
    paths, tensors = models
    run_round(old.address, "r1", paths, keypair.client)
    before = secagg.fetch_average(old.address, "r1", keypair.client)
    old.stop(grace=0)

    srv, _ = malicious_server(name="life2")
    new_model = helpers.random_tensors(rng, LAYOUT)
    new_path = helpers.save_npz(tmp_path / "site0-new.npz", new_model)
    secagg.create_round(srv.address, "r1", template=paths[0], clients=3, max_weight=MAX_WEIGHT, value_bound=VALUE_BOUND)
    secagg.submit(srv.address, "r1", keypair.client, "site0", new_path, weight=WEIGHTS[0])
    with AggregatorClient(srv.address) as client:
        for site in ("site1", "site2"):
            header, pairs = malice.updates[("r1", site)]
            client.submit(header, envelope.split_chunks(pairs))
    after = secagg.fetch_average(srv.address, "r1", keypair.client)
    change = (after.vector - before.vector) * sum(WEIGHTS) / WEIGHTS[0]
    np.testing.assert_allclose(change, expected_average([new_model], (1.0,)) - expected_average(tensors[:1], (1.0,)),
                               atol=1e-5)
    assert_refused(srv.address, "r1", keypair.client, [new_path], tmp_path, "contribution", sites=("site0",))


def test_a_site_with_its_own_ledger_refuses_a_reused_round_id(malicious_server, keypair, models, tmp_path, helpers, rng):
    """The mitigation of the replay above: a site that keeps its own ledger (any site-policy option, e.g.
    --site-ledger) refuses to send a second, different update to a round id it already sent one to, so the
    aggregator of life 2 never gets the fresh update it would difference against life 1's release."""
    from secagg.errors import PrivacyError
    from secagg.site_policy import SitePolicy

    policy = SitePolicy(ledger=tmp_path / "site0-ledger.json")
    old, _ = malicious_server(name="life1-ledger")
    paths, _ = models
    secagg.create_round(old.address, "r1", template=paths[0], clients=3, max_weight=MAX_WEIGHT, value_bound=VALUE_BOUND)
    secagg.submit(old.address, "r1", keypair.client, "site0", paths[0], weight=WEIGHTS[0], policy=policy)
    for i in (1, 2):
        secagg.submit(old.address, "r1", keypair.client, f"site{i}", paths[i], weight=WEIGHTS[i])
    secagg.fetch_average(old.address, "r1", keypair.client)
    old.stop(grace=0)

    srv, _ = malicious_server(name="life2-ledger")
    new_path = helpers.save_npz(tmp_path / "site0-new.npz", helpers.random_tensors(rng, LAYOUT))
    secagg.create_round(srv.address, "r1", template=paths[0], clients=3, max_weight=MAX_WEIGHT, value_bound=VALUE_BOUND)
    with pytest.raises(PrivacyError, match="already sent that round an update"):
        secagg.submit(srv.address, "r1", keypair.client, "site0", new_path, weight=WEIGHTS[0], policy=policy)
    assert secagg.round_status(srv.address, "r1").submitted == 0
    # Sending the very same update again (a retry after a crash) is not refused: it reveals nothing new.
    secagg.submit(srv.address, "r1", keypair.client, "site0", paths[0], weight=WEIGHTS[0], policy=policy)
