"""Masked rounds against an aggregator that deviates, alone or with one site (the attacker's code is here).

* Colluding with one site, with every masked update it received, every stage message, ``client.key``
  and the colluding site's own pairwise secrets, the aggregator decrypts no single update: each
  ciphertext decrypts to values uncorrelated with the real update. The same attack on the same
  bytes with the masks removed reads the update (so the test would fail if masking broke).
* Telling sites different sets of survivors is caught before any share is revealed.
* Replacing a site's advertised keys with the colluding site's keys is caught before any share leaves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import secagg
from secagg import ciphertexts, slots
from secagg.errors import MaskingError, SecAggError
from secagg.masking import flow
from secagg.masking.prg import sub_mod, add_mod
from secagg.masking.settings import MaskSettings
from secagg.masking.site import MaskingSite, pair_sign
from secagg.packing import ModelSpec, flatten
from secagg.updates import bounds, checks

Q = 1152921504606748673
STAGE = 8.0


def _create(srv, pki, template, n, round_id="m1", min_clients=None):
    return secagg.create_round(srv.address, round_id, template=template, clients=n, min_clients=min_clients,
                               max_weight=512.0, masking=MaskSettings(stage_seconds=STAGE), tls=pki.client("admin"))


@pytest.fixture
def recorded_sites(monkeypatch):
    """Every MaskingSite made in this test, by site id: the colluding site's secrets come from here."""
    made: dict[str, MaskingSite] = {}

    class Recorded(MaskingSite):
        def __init__(self, terms, client_id, *a, **kw):
            super().__init__(terms, client_id, *a, **kw)
            made[client_id] = self

    monkeypatch.setattr(flow, "MaskingSite", Recorded)
    return made


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.corrcoef(a, b)[0, 1]))


def test_aggregator_with_one_site_cannot_decrypt_a_single_update(malicious_server, keypair, pki, npz_models, helpers,
                                                                  client_key, recorded_sites):
    srv, malice = malicious_server(tls=pki.server_tls())
    posts = []
    malice.mask = lambda caller, request, reply: posts.append((caller, request.stage, request.payload_json)) or reply
    paths, tensors = npz_models(4)
    weights = [120.0, 37.0, 512.0, 300.0]
    names = ["site0", "site1", "site2", "site3"]
    status = _create(srv, pki, paths[0], 4)
    receipts = helpers.submit_each(srv.address, "m1", keypair.client, pki, paths, weights, names)
    assert all(isinstance(r, secagg.Receipt) for r in receipts), receipts
    seen_status = secagg.round_status(srv.address, "m1", tls=pki.client("site0"))
    assert seen_status.state == "closed"
    assert any(stage == "unmask" for _, stage, _ in posts)  # the attacker saw every stage message

    colluder = recorded_sites["site0"]  # client.key and all of site0's own masking secrets
    spec = ModelSpec.of(tensors[0])
    worst, readable = 0.0, []
    for victim, model, w in zip(names[1:], tensors[1:], weights[1:]):
        c0s, seeds = malice.update("m1", victim)
        real = slots.encode_update(flatten(spec, model), w, bounds(seen_status), checks(client_key, "m1"))
        # The colluder removes the pairwise mask it shares with the victim (it knows that secret) ...
        own = dict(zip(colluder.maskers, colluder.streams()[1:]))[victim][1]
        sign = pair_sign(victim, "site0")
        for i, (c0, seed) in enumerate(zip(c0s, seeds)):
            row = np.frombuffer(c0, dtype="<u8").copy()
            (sub_mod if sign > 0 else add_mod)(row, own.words(i, row.size), np.uint64(Q))
            got = ciphertexts.decrypt(client_key, [row.astype("<u8").tobytes()], [[seed]])
            worst = max(worst, _corr(got, real[i * 8192:(i + 1) * 8192]))
        # ... and the same decryption with every mask removed (the victim's own streams) reads the update:
        # the attack itself works, only the masks stop it.
        site = recorded_sites[victim]
        row = np.frombuffer(c0s[0], dtype="<u8").copy()
        for s, stream in site.streams():
            (sub_mod if s > 0 else add_mod)(row, stream.words(0, row.size), np.uint64(Q))
        readable.append(_corr(ciphertexts.decrypt(client_key, [row.astype("<u8").tobytes()], [[seeds[0]]]),
                              real[:8192]))
    assert worst < 0.05, worst
    assert min(readable) > 0.999, readable
    # ... while the round's sum is exact within the release grid.
    avg = secagg.fetch_average(srv.address, "m1", keypair.client, tls=pki.client("site1"))
    want = np.concatenate([v.ravel() for v in helpers.weighted_average(tensors, weights).values()])
    assert np.max(np.abs(avg.vector - want)) <= helpers.release_tolerance(status, tensors, weights)


def test_different_survivor_sets_for_different_sites_are_detected(malicious_server, keypair, pki, npz_models,
                                                                  monkeypatch, helpers):
    srv, malice = malicious_server(tls=pki.server_tls())
    # This aggregator does not check the statements it relays (an honest one refuses a signature over
    # another set of survivors): only the sites' own checks stand between it and the shares.
    monkeypatch.setattr("secagg.masking.stages.check_signature", lambda *a, **k: None)
    reveals = []

    def lie(caller, request, reply):
        if request.stage == "submit" and reply.ready and caller == "site3":
            view = json.loads(reply.payload_json)
            view["survivors"] = [s for s in view["survivors"] if s != "site2"]  # "site2 dropped", to site3 only
            reply.payload_json = json.dumps(view)
        if request.stage == "unmask" and request.payload_json:
            reveals.append(caller)
        return reply

    malice.mask = lie
    paths, _ = npz_models(4)
    _create(srv, pki, paths[0], 4, min_clients=3)  # a 3-site sum is acceptable: site3 signs the smaller set
    results = helpers.submit_each(srv.address, "m1", keypair.client, pki, paths, [1.0] * 4,
                                  ["site0", "site1", "site2", "site3"])
    # site3 signs the set it was shown and finds the others signed another; they find site3's signature
    # does not fit theirs: every site refuses, nobody reveals a share.
    assert all(isinstance(r, MaskingError) and "different sets of survivors" in str(r) for r in results), results
    assert reveals == []
    # Without shares the aggregator cannot unmask: at the unmask stage's timeout the round fails.
    status = lambda: secagg.round_status(srv.address, "m1", tls=pki.client("site0"))  # noqa: E731
    assert helpers.wait_for(lambda: status().state == "failed", timeout=STAGE + 10)
    assert "unmask stage" in status().reason


def test_keys_substituted_by_the_aggregator_with_one_site_are_detected(malicious_server, keypair, pki, npz_models,
                                                                      helpers):
    srv, malice = malicious_server(tls=pki.server_tls())
    relayed = []

    def swap(caller, request, reply):
        if request.stage == "advertise" and reply.ready and caller != "site1":
            view = json.loads(reply.payload_json)
            ads = {a["client_id"]: a for a in view["adverts"]}
            # site1 (colluding) gives its keys; the aggregator presents them as site2's, with site2's certificate
            # and the signature site1 made (site1 cannot sign as site2: it lacks site2's certificate key).
            for field in ("enc_pk", "mask_pk", "commit"):
                ads["site2"][field] = ads["site1"][field]
            reply.payload_json = json.dumps(view)
        if request.stage == "share" and request.payload_json:
            relayed.append(caller)
        return reply

    malice.mask = swap
    paths, _ = npz_models(4)
    _create(srv, pki, paths[0], 4)
    results = helpers.submit_each(srv.address, "m1", keypair.client, pki, paths, [1.0] * 4,
                                  ["site0", "site1", "site2", "site3"])
    for name, r in zip(["site0", "site1", "site2", "site3"], results):
        if name in ("site0", "site3"):
            assert isinstance(r, MaskingError) and "advertisement does not verify" in str(r), (name, r)
        if name == "site2":  # its own keys were replaced in what it was shown
            assert isinstance(r, MaskingError) and "own keys" in str(r), r
    # No share of site0, site2 or site3 ever left them (site1, shown the honest cohort, sent its own).
    assert set(relayed) <= {"site1"}
