"""The four stages without a network: masks cancel exactly, dropouts at every stage, and what a site refuses."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import MaskingError
from secagg.masking.settings import MaskSettings
from secagg.masking.statements import Advertisement, SurvivorsSignature


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("n", [3, 4, 12])
def test_masks_cancel_to_the_exact_sum(played, n):
    p = played(n)
    p.run()
    assert _equal(p.unmasked_sum(), p.plain_sum(p.names))
    # ...while each masked c0 on its own is unrelated to the real one (uniform mod q).
    for name in p.names:
        real = p.c0[name][0].astype(np.float64)
        seen = np.frombuffer(p.masked[name][0], dtype="<u8").astype(np.float64)
        assert abs(np.corrcoef(real, seen)[0, 1]) < 0.05


def test_large_cohort_uses_a_sparse_graph(played):
    p = played(12, settings=MaskSettings(degree=4, stage_seconds=10))
    p.run()
    assert all(len(s.neighbours) == 4 for s in p.sites.values())
    assert _equal(p.unmasked_sum(), p.plain_sum(p.names))


def test_dropout_before_sharing_and_before_submitting(played):
    p = played(6)  # complete graph, 6 holders, threshold 4: up to 2 sites may drop
    p.advertise(p.names[:5])  # site5 never shows up
    assert p.advance(late=True) is None and p.state.stage == "share"
    p.share(p.names[:5])
    assert p.advance() is None and p.state.stage == "submit"
    p.submit(p.names[:4])  # site4 shared its keys, then dropped: its pairwise masks stay in the others' updates
    assert p.advance(late=True) is None and p.state.stage == "confirm"
    p.confirm(); p.advance(); p.unmask(); p.advance()
    assert p.state.stage == "done"
    assert _equal(p.unmasked_sum(), p.plain_sum(p.names[:4]))


def test_dropout_during_unmasking_is_tolerated_up_to_the_threshold(played):
    p = played(5)  # threshold 3
    p.advertise(); p.advance(); p.share(); p.advance(); p.submit(); p.advance(); p.confirm(); p.advance()
    p.unmask(p.names[:3])  # two survivors go silent after confirming
    assert p.advance(late=True) is None and p.state.stage == "done"
    assert _equal(p.unmasked_sum(), p.plain_sum(p.names))


def test_too_many_dropouts_fail_naming_who_is_missing(played):
    p = played(4)  # threshold 3
    p.advertise(); p.advance(); p.share(); p.advance()
    p.submit(p.names[:2])
    why = p.advance(late=True)
    assert why is not None and "fewer than the 3" in why and "missing: site2, site3" in why


def test_unmask_with_too_few_shares_names_the_silent_holders(played):
    p = played(5)
    p.advertise(); p.advance(); p.share(); p.advance(); p.submit(); p.advance(); p.confirm(); p.advance()
    p.unmask(p.names[:2])
    why = p.advance(late=True)
    assert why is not None and "unmask stage" in why and "missing: site2, site3, site4" in why


def test_a_site_never_reveals_both_shares_of_one_site(played):
    p = played(5)
    p.advertise(); p.advance(); p.share(); p.advance(); p.submit(); p.advance(); p.confirm(); p.advance()
    survivors = list(p.state.survivors)
    sigs = [SurvivorsSignature.from_dict(s) for s in p.state.signatures.values()]
    site0 = p.sites["site0"]
    first = site0.reveal(survivors, sigs)
    assert "site4" in first["b"] and not first["sk"]
    # The aggregator now claims site4 dropped and asks again, with site4's key shares this time.
    fewer = [s for s in survivors if s != "site4"]
    sigs2 = [p.sites[s].sign_survivors(fewer) for s in fewer]
    with pytest.raises(MaskingError, match="site4.*refused"):
        site0.reveal(fewer, sigs2)


def test_different_survivor_sets_for_different_sites_are_caught(played):
    p = played(5)
    p.advertise(); p.advance(); p.share(); p.advance(); p.submit(); p.advance()
    everyone = list(p.state.survivors)
    without4 = [s for s in everyone if s != "site4"]
    # The aggregator tells site0..site2 that everyone submitted, site3 that site4 did not.
    sigs = [p.sites[s].sign_survivors(everyone) for s in ("site0", "site1", "site2")]
    with pytest.raises(MaskingError, match="different sets of survivors"):
        p.sites["site3"].reveal(without4, sigs)
    # ... and a site given too few confirmations reveals nothing.
    with pytest.raises(MaskingError, match="only 2 survivor"):
        p.sites["site3"].reveal(everyone, sigs[:2])
    assert p.sites["site3"].revealed == {}


def test_survivor_sets_too_small_or_without_the_site_are_refused(played):
    p = played(5)
    p.advertise(); p.advance(); p.share(); p.advance(); p.submit(); p.advance()
    with pytest.raises(MaskingError, match="did not submit, but it did"):
        p.sites["site0"].sign_survivors(["site1", "site2", "site3"])
    with pytest.raises(MaskingError, match="only 2 site"):
        p.sites["site0"].sign_survivors(["site0", "site1"])


def test_substituted_advertisement_is_refused(played, site_pki):
    """The aggregator with site1 swaps site2's keys for site1's own: without site2's certificate key, no signature fits."""
    p = played(4)
    p.advertise(); p.advance()
    ads = p.adverts("site0")
    colluder = p.sites["site1"].advertise()
    swapped = [a if a.client_id != "site2" else
               Advertisement("site2", colluder.enc_pk, colluder.mask_pk, colluder.commit, colluder.certificate,
                             colluder.signature) for a in ads]
    with pytest.raises(MaskingError, match="names \\['site1'\\], not 'site2'"):
        p.sites["site0"].join(swapped)
    # A certificate for "site2" from another CA (anyone can make one) does not pass either.
    _, _, forged = site_pki
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    fake = Advertisement("site1", colluder.enc_pk, colluder.mask_pk, colluder.commit, forged.cert.read_bytes())
    key = serialization.load_pem_private_key(forged.key.read_bytes(), None)
    fake = Advertisement(*[getattr(fake, f) for f in ("client_id", "enc_pk", "mask_pk", "commit", "certificate")],
                         key.sign(fake.body(p.terms), ec.ECDSA(hashes.SHA256())))
    with pytest.raises(MaskingError, match="not a valid certificate of the federation's CA"):
        p.sites["site0"].join([a if a.client_id != "site1" else fake for a in ads])
    # and the aggregator's own check refuses to take such an advertisement in the first place
    with pytest.raises(MaskingError):
        p.state.adverts.pop("site1")
        p.state.stage = "advertise"
        p.state.post("advertise", "site1", fake.to_dict(), p.terms, p.ca_pem)


def test_own_keys_replaced_or_relayed_shares_altered_are_refused(played):
    p = played(4)
    p.advertise(); p.advance()
    ads = p.adverts("site0")
    other = p.sites["site3"].advertise()
    with pytest.raises(MaskingError, match="own keys"):
        p.sites["site0"].join([a for a in ads if a.client_id != "site0"])
    p.share(); p.advance()
    boxes = {k: bytearray.fromhex(v) for k, v in p.state.view("share", "site0")["boxes"].items()}
    boxes["site1"][5] ^= 1
    with pytest.raises(MaskingError, match="do not open"):
        p.sites["site0"].receive({k: bytes(v) for k, v in boxes.items()})
    del other
