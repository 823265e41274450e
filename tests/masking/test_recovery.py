"""A masked round survives an aggregator restart at any stage: the journal is replayed, the stages resume."""

from __future__ import annotations

import numpy as np
import pytest

from secagg import certs
from secagg.masking.settings import MaskSettings
from secagg.masking.site import MaskingSite
from secagg.masking.statements import Advertisement, SurvivorsSignature
from secagg.packing import ModelSpec, flatten
from secagg.rounds import Aggregator, RoundConfig
from secagg.transport.tls import ClientTLS
from secagg.updates import encrypt_update, open_aggregate, open_chunks, seal_ciphertexts

NAMES = ["site0", "site1", "site2", "site3"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed")
    ca = certs.init_ca(d)
    issued = {n: certs.issue(d, n) for n in NAMES}
    return ca.cert.read_bytes(), {n: ClientTLS(ca.cert, issued[n].cert, issued[n].key) for n in NAMES}


def _agg(server_key, folder, ca_pem):
    return Aggregator(server_key, folder, ca_pem=ca_pem)


@pytest.mark.parametrize("restart_after", ["advertise", "share", "submit", "confirm"])
def test_restart_at_any_stage_resumes_and_releases_the_exact_sum(restart_after, server_key, client_key, fed, tmp_path,
                                                                 rng):
    ca_pem, tls = fed
    tensors = [{"w": rng.normal(0, 1, 3000).astype(np.float32)} for _ in NAMES]
    spec = ModelSpec.of(tensors[0])
    agg = _agg(server_key, tmp_path / "state", ca_pem)
    status = agg.create_round(RoundConfig("m1", spec, 4, 4, None, max_weight=1.0, value_bound=10.0,
                                          masking=MaskSettings(stage_seconds=60).to_dict()))
    status = type(status)(**{**status.__dict__, "key_id": client_key.key_id})
    q = server_key.parameters.data_prime
    sites = {n: MaskingSite(status.terms(), n, MaskSettings(stage_seconds=60), q, ca_pem, tls[n].cert.read_bytes(),
                            tls[n].key.read_bytes(), min_clients=4) for n in NAMES}

    def restart():
        nonlocal agg
        if agg is not None:
            agg = _agg(server_key, tmp_path / "state", ca_pem)

    for n in NAMES:
        agg.mask_stage("m1", n, "advertise", sites[n].advertise().to_dict())
    if restart_after == "advertise":
        restart()
    for n in NAMES:
        sites[n].join([Advertisement.from_dict(a) for a in agg.mask_stage("m1", n, "advertise")[1]["adverts"]])
        agg.mask_stage("m1", n, "share", {"boxes": {k: v.hex() for k, v in sites[n].shares().items()}})
    if restart_after == "share":
        restart()
    for n, t in zip(NAMES, tensors):
        sites[n].receive({k: bytes.fromhex(v) for k, v in agg.mask_stage("m1", n, "share")[1]["boxes"].items()})
        cts = encrypt_update(client_key, status, flatten(spec, t), 1.0)
        sealed = seal_ciphertexts(client_key, status, n, [(sites[n].mask(i, c0), s) for i, (c0, s) in enumerate(cts)],
                                  tls[n])
        agg.submit(sealed.header, iter(sealed.chunks))
    if restart_after == "submit":
        restart()
    survivors = agg.mask_stage("m1", "site0", "submit")[1]["survivors"]
    assert survivors == NAMES
    for n in NAMES:
        agg.mask_stage("m1", n, "confirm", sites[n].sign_survivors(survivors).to_dict())
    if restart_after == "confirm":
        restart()
    for n in NAMES:
        sigs = [SurvivorsSignature.from_dict(s) for s in agg.mask_stage("m1", n, "confirm")[1]["signatures"]]
        agg.mask_stage("m1", n, "unmask", sites[n].reveal(survivors, sigs))
    final = agg.status("m1")
    assert final.state == "closed", final.reason
    a = agg.aggregate("m1")
    pairs = list(open_chunks(client_key, final, a.header, a.contributions, a.chunks()))
    avg = open_aggregate(client_key, final, spec, list(a.records), pairs)
    want = np.mean([t["w"].astype(np.float64) for t in tensors], axis=0)
    assert np.max(np.abs(avg.vector - want)) < 1e-6
    assert not (tmp_path / "state" / "rounds" / "m1" / "masking.log").exists()


def test_a_torn_last_journal_line_is_dropped_and_a_damaged_one_quarantines(server_key, fed, tmp_path, rng):
    ca_pem, tls = fed
    spec = ModelSpec.of({"w": np.zeros(10, dtype=np.float32)})
    agg = _agg(server_key, tmp_path / "state", ca_pem)
    status = agg.create_round(RoundConfig("m1", spec, 3, 3, None, masking=MaskSettings().to_dict()))
    site = MaskingSite(status.terms(), "site0", MaskSettings(), server_key.parameters.data_prime, ca_pem,
                       tls["site0"].cert.read_bytes(), tls["site0"].key.read_bytes())
    agg.mask_stage("m1", "site0", "advertise", site.advertise().to_dict())
    journal = tmp_path / "state" / "rounds" / "m1" / "masking.log"
    with open(journal, "a") as f:
        f.write('{"post": "advertise", "cli')  # a crash mid-append
    again = _agg(server_key, tmp_path / "state", ca_pem)
    assert again.status("m1").state == "collecting" and again.status("m1").stage == "advertise"
    assert list(again._rounds["m1"].mask.adverts) == ["site0"]
    journal.write_text('{"damaged\n' + journal.read_text())
    third = _agg(server_key, tmp_path / "state", ca_pem)
    s = third.status("m1")
    assert s.state == "failed" and "masking.log is damaged" in s.reason
