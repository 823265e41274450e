"""The aggregator's state dir is edited between restarts (issue 10, attacks 4 and 6).

Whoever can write the state dir plays the aggregator: it copies an accepted update under another
client id, flips a byte of an accepted update or of a closed round's sum, damages a round's files,
or swaps in another federation's key. A real aggregator (``secagg.serve`` on 127.0.0.1) is stopped,
its files are edited, and it is started again. Damage the aggregator can detect without a key
(digests, file names, key ids, signatures under mutual TLS) quarantines the round at start, and
every other round is still served. Edits made consistently, as an attacker would (digests
recomputed), get past the aggregator, which holds no key; then every fetching site refuses.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest

import secagg
from secagg import store
from secagg.errors import AggregateCheckError, KeyFileError, RoundStateError
from secagg.rounds import QUARANTINE_FILE

N = 8192
SITES = ("site0", "site1", "site2")


@pytest.fixture
def sites(tmp_path, helpers, rng):
    """Three sites' model files (the conftest's small layout: one ciphertext)."""
    return [helpers.save_npz(tmp_path / f"{s}.npz", helpers.random_tensors(rng)) for s in SITES]


class Aggregator:
    """A real aggregator on a fixed state dir that can be stopped and started again."""

    def __init__(self, key_path, state: Path, **options) -> None:
        self.key_path, self.state, self.options = key_path, state, options
        self.server = None

    def start(self, key_path=None) -> str:
        self.server = secagg.serve(key_path or self.key_path, "127.0.0.1:0", self.state, **self.options)
        return self.server.address

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0)
            self.server = None

    def round_dir(self, round_id: str) -> Path:
        return self.state / "rounds" / round_id


@pytest.fixture
def aggregator(keypair, tmp_path):
    agg = Aggregator(keypair.server, tmp_path / "state")
    yield agg
    agg.stop()


def submit(address, round_id, key, paths, sites=SITES, clients=3, create=True, tls=None, admin=None):
    if create:
        secagg.create_round(address, round_id, template=paths[0], clients=clients, tls=admin)
    for site, path in zip(sites, paths):
        secagg.submit(address, round_id, key, site, path, weight=2.0, tls=tls(site) if tls else None)


def rewrite(path: Path, change) -> None:
    """Rewrite a blob file's JSON header with ``change(header)``, keeping its ciphertexts."""
    header = store.read_blob_header(path)
    blobs = list(store.iter_blobs(path))
    change(header)
    writer = store.BlobWriter(path.with_name(path.name + ".edit"), header)
    writer.write(blobs)
    writer.commit(path)


def flip(path: Path, blob: int, offset: int) -> None:
    """Flip one bit of byte ``offset`` of blob number ``blob`` of a blob file, in place."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack(">I", data[:4])
    pos = 4 + n
    for _ in range(blob):
        pos += 4 + struct.unpack(">I", data[pos:pos + 4])[0]
    data[pos + 4 + offset] ^= 0x01
    path.write_bytes(bytes(data))


def assert_refused(address, round_id, key, paths, tmp_path, match, error=AggregateCheckError, tls=None):
    for site, path in zip(SITES, paths):
        out = tmp_path / f"out-{round_id}-{site}.npz"
        with pytest.raises(error, match=match):
            secagg.fetch(address, round_id, key, path, out, tls=tls(site) if tls else None)
        assert not out.exists()


def assert_quarantined(address, agg, round_id, why, key, paths, tmp_path, tls=None):
    """The round is failed with ``why``, its files kept; asking for its status or sum says so."""
    status = agg.server.core.status(round_id)
    assert status.state == "failed" and re.search(f"quarantined at start: .*{why}", status.reason), status.reason
    assert (agg.round_dir(round_id) / QUARANTINE_FILE).exists()
    # `secagg round status` shows the round as failed, with the reason (it does not error out).
    served = secagg.round_status(address, round_id, tls=tls("admin") if tls else None)
    assert served.state == "failed" and re.search(f"quarantined at start: .*{why}", served.reason)
    assert_refused(address, round_id, key, paths, tmp_path, f"failed: quarantined at start: .*{why}",
                   error=RoundStateError, tls=tls)


def assert_healthy_round_still_served(address, key, paths, tmp_path):
    """The round 'healthy' (2 of 3 submitted before the restart) takes its last update and releases its sum."""
    secagg.submit(address, "healthy", key, "site2", paths[2], weight=2.0)
    out = secagg.fetch(address, "healthy", key, paths[0], tmp_path / "healthy.npz")
    assert out.exists()


def two_rounds_of_two(address, key, paths) -> None:
    """'victim' and 'healthy': 3 expected, site0 and site1 submitted."""
    for round_id in ("victim", "healthy"):
        submit(address, round_id, key, paths[:2], sites=SITES[:2])


def _rename_to_site9(header: dict) -> None:
    header["client_id"] = header["contribution"]["client_id"] = "site9"


# -- attack 4: a forged cohort ---------------------------------------------------------------------


def test_an_update_copied_under_another_id_is_quarantined(aggregator, keypair, sites, tmp_path):
    """cp accepted/site1 accepted/site9: the third contribution the round waits for, made up."""
    address = aggregator.start()
    two_rounds_of_two(address, keypair.client, sites)
    aggregator.stop()
    accepted = aggregator.round_dir("victim") / "accepted"
    shutil.copy(accepted / "site1", accepted / "site9")

    address = aggregator.start()
    assert_quarantined(address, aggregator, "victim", "accepted update 'site9' names client 'site1'", keypair.client,
                       sites, tmp_path)
    assert (accepted / "site9").exists()  # kept for inspection
    assert_healthy_round_still_served(address, keypair.client, sites, tmp_path)


def test_a_doctored_copy_is_refused_by_every_site(aggregator, keypair, sites, tmp_path):
    """The copy's header and record are rewritten to say site9: the aggregator (no key) closes the round
    with it; every site finds that site9's tag was made for site1."""
    address = aggregator.start()
    two_rounds_of_two(address, keypair.client, sites)
    aggregator.stop()
    accepted = aggregator.round_dir("victim") / "accepted"
    shutil.copy(accepted / "site1", accepted / "site9")

    rewrite(accepted / "site9", _rename_to_site9)
    address = aggregator.start()
    status = secagg.round_status(address, "victim")
    assert (status.state, status.clients) == ("closed", ("site0", "site1", "site9"))
    assert_refused(address, "victim", keypair.client, sites, tmp_path,
                   "contribution of 'site9' does not carry a valid tag for round 'victim'")


def test_under_mutual_tls_a_doctored_copy_is_quarantined(keypair, pki, sites, tmp_path):
    """Under mutual TLS each record carries its site's signature, re-checked at start: the doctored copy
    still carries site1's certificate, so the aggregator itself sets the round aside."""
    agg = Aggregator(keypair.server, tmp_path / "state", tls=pki.server_tls())
    try:
        address = agg.start()
        for round_id in ("victim", "healthy"):
            submit(address, round_id, keypair.client, sites[:2], sites=("site0", "site1"), tls=pki.client,
                   admin=pki.client("admin"))
        agg.stop()
        accepted = agg.round_dir("victim") / "accepted"
        shutil.copy(accepted / "site1", accepted / "site9")
        rewrite(accepted / "site9", _rename_to_site9)
        address = agg.start()
        assert_quarantined(address, agg, "victim", re.escape("the certificate on 'site9''s contribution names "
                                                             "['site1'], not 'site9'"),
                           keypair.client, sites, tmp_path, tls=pki.client)
        secagg.submit(address, "healthy", keypair.client, "site2", sites[2], weight=2.0, tls=pki.client("site2"))
        avg = secagg.fetch_average(address, "healthy", keypair.client, tls=pki.client("site0"))
        assert avg.clients == SITES
    finally:
        agg.stop()


# -- attack 6: integrity of what is stored ---------------------------------------------------------


@pytest.mark.parametrize("where", ["c0", "seed"])
def test_a_flipped_byte_in_an_accepted_update_is_quarantined(aggregator, keypair, sites, tmp_path, where):
    """The OLD format kept a flipped byte through a restart and clients accepted a wrong sum. Now every
    accepted update's digest is recomputed at start."""
    address = aggregator.start()
    two_rounds_of_two(address, keypair.client, sites)
    aggregator.stop()
    flip(aggregator.round_dir("victim") / "accepted" / "site0", 0, 1000 if where == "c0" else N * 8 + 5)

    address = aggregator.start()
    assert_quarantined(address, aggregator, "victim", "accepted update 'site0' no longer matches its digest",
                       keypair.client, sites, tmp_path)
    assert_healthy_round_still_served(address, keypair.client, sites, tmp_path)


def test_a_flipped_bit_in_a_tag_is_refused_by_every_site(aggregator, keypair, sites, tmp_path):
    """The tag is not the aggregator's to check (it has no key): the round is served, and refused."""
    address = aggregator.start()
    two_rounds_of_two(address, keypair.client, sites)
    aggregator.stop()

    def damage(header):
        tag = bytearray(bytes.fromhex(header["contribution"]["tag"]))
        tag[0] ^= 0x01
        header["contribution"]["tag"] = tag.hex()

    rewrite(aggregator.round_dir("victim") / "accepted" / "site0", damage)
    address = aggregator.start()
    secagg.submit(address, "victim", keypair.client, "site2", sites[2], weight=2.0)
    assert_refused(address, "victim", keypair.client, sites, tmp_path,
                   "contribution of 'site0' does not carry a valid tag")


@pytest.mark.parametrize("where, match", [
    ("c0", "ciphertext 0 of the sum counts .* contributions but the round lists 3"),
    ("seed", "the seeds served for 'site1' are not the ones it sent"),
])
def test_a_flipped_byte_in_a_closed_sum(aggregator, keypair, sites, tmp_path, where, match):
    """Damage alone is quarantined (the sum's digest is in round.json). An attacker who also rewrites that
    digest gets the sum served, and every site refuses it."""
    address = aggregator.start()
    submit(address, "victim", keypair.client, sites)
    submit(address, "healthy", keypair.client, sites[:2], sites=SITES[:2])
    aggregator.stop()
    folder = aggregator.round_dir("victim")
    flip(folder / "aggregate", 0, 777 if where == "c0" else N * 8 + 64 + 9)  # the seed: site1's

    address = aggregator.start()
    assert_quarantined(address, aggregator, "victim", "the stored encrypted sum no longer matches its digest",
                       keypair.client, sites, tmp_path)
    assert_healthy_round_still_served(address, keypair.client, sites, tmp_path)
    aggregator.stop()

    # The attacker's version: the digest in round.json recomputed, the quarantine removed.
    from secagg.rounds import _aggregate_digest

    meta = json.loads((folder / "round.json").read_text())
    meta["aggregate_digest"] = _aggregate_digest(folder / "aggregate", 3).hex()
    (folder / "round.json").write_text(json.dumps(meta))
    (folder / QUARANTINE_FILE).unlink()
    address = aggregator.start()
    assert secagg.round_status(address, "victim").state == "closed"
    assert_refused(address, "victim", keypair.client, sites, tmp_path, match)


def test_a_damaged_round_does_not_stop_the_aggregator(aggregator, keypair, sites, tmp_path):
    """The OLD aggregator refused to start over one damaged round. Now it is set aside and the rest served."""
    address = aggregator.start()
    two_rounds_of_two(address, keypair.client, sites)
    aggregator.stop()
    meta = aggregator.round_dir("victim") / "round.json"
    meta.write_bytes(meta.read_bytes()[:40])  # truncated

    address = aggregator.start()
    assert_quarantined(address, aggregator, "victim", "JSONDecodeError", keypair.client, sites, tmp_path)
    assert_healthy_round_still_served(address, keypair.client, sites, tmp_path)


def test_another_federations_key_over_old_rounds(aggregator, keypair, other_keypair, other_client_key, sites,
                                                 tmp_path):
    """Deleting the state dir's key_id marker let the OLD aggregator start with another federation's
    key over the old updates. Now every round records its key id: such rounds are quarantined. An
    attacker who also rewrites the key id in round.json gets them served, and the other federation's
    sites refuse them (tags are keyed by the federation's secret)."""
    address = aggregator.start()
    two_rounds_of_two(address, keypair.client, sites)
    aggregator.stop()
    (aggregator.state / "key_id").unlink()

    address = aggregator.start(other_keypair.server)
    other_id = secagg.load_server_key(other_keypair.server).key_id
    for round_id in ("victim", "healthy"):
        assert_quarantined(address, aggregator, round_id, f"the round belongs to federation key .*, not this "
                           f"aggregator's {other_id}", other_client_key, sites, tmp_path)
    aggregator.stop()

    folder = aggregator.round_dir("victim")
    meta = json.loads((folder / "round.json").read_text())
    meta["config"]["key_id"] = other_id
    (folder / "round.json").write_text(json.dumps(meta))
    (folder / QUARANTINE_FILE).unlink()
    address = aggregator.start(other_keypair.server)
    secagg.submit(address, "victim", other_client_key, "site2", sites[2], weight=2.0)
    assert secagg.round_status(address, "victim").state == "closed"
    assert_refused(address, "victim", other_client_key, sites, tmp_path,
                   "contribution of 'site0' does not carry a valid tag")
    # The first federation's sites do not even get that far: the aggregator now serves another key.
    with pytest.raises(KeyFileError, match="uses key"):
        secagg.fetch_average(address, "victim", keypair.client)
