"""What sites sign in a masked round, and how every site checks it.

Two statements, both signed with the site's own certificate key from the federation's CA (ECDSA
P-256, as contributions are): an **advertisement** of its two X25519 public keys (one to encrypt
shares to it, one to agree masks) and a commitment to its self-mask seed; and its view of the
**survivors** (who submitted) together with the digest of the cohort's advertisements. ``client.key``
cannot authenticate these: every site holds it, so a colluding site could forge an advertisement for
another site and, with the aggregator, learn all of that site's masks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from secagg.contribution import Terms, check_signature
from secagg.errors import AggregateCheckError, MaskingError

ADVERT_VERSION = "secagg-mask-advert-v1"
SURVIVORS_VERSION = "secagg-mask-survivors-v1"
KEY_BYTES = 32


def commitment(seed: bytes) -> bytes:
    """The public commitment to a self-mask seed, checked after the seed is rebuilt from shares."""
    return hashlib.sha256(b"secagg-mask-seed" + seed).digest()


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class Advertisement:
    """A site's public keys for one masked round, signed with its certificate key."""

    client_id: str
    enc_pk: bytes  # X25519: shares sent to this site are encrypted to it
    mask_pk: bytes  # X25519: pairwise masks are agreed with it
    commit: bytes  # commitment to the self-mask seed
    certificate: bytes = b""
    signature: bytes = b""

    def body(self, terms: Terms) -> bytes:
        return _canonical({"v": ADVERT_VERSION, "key_id": terms.key_id, "round_id": terms.round_id,
                           "settings": terms.settings, "spec_hash": terms.spec_hash, "client_id": self.client_id,
                           "enc_pk": self.enc_pk.hex(), "mask_pk": self.mask_pk.hex(), "commit": self.commit.hex()})

    def to_dict(self) -> dict:
        return {"client_id": self.client_id, "enc_pk": self.enc_pk.hex(), "mask_pk": self.mask_pk.hex(),
                "commit": self.commit.hex(), "certificate": self.certificate.decode(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, d: dict) -> "Advertisement":
        try:
            ad = cls(str(d["client_id"]), bytes.fromhex(d["enc_pk"]), bytes.fromhex(d["mask_pk"]),
                     bytes.fromhex(d["commit"]), str(d["certificate"]).encode(), bytes.fromhex(d["signature"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MaskingError(f"a malformed advertisement ({type(exc).__name__}: {exc})") from None
        if len(ad.enc_pk) != KEY_BYTES or len(ad.mask_pk) != KEY_BYTES or len(ad.commit) != 32:
            raise MaskingError(f"the advertisement of {ad.client_id!r} has keys of the wrong size")
        return ad

    def verify(self, terms: Terms, ca_pem: bytes) -> None:
        """Raises :class:`MaskingError` unless a certificate of ``ca_pem`` naming this site signed it."""
        try:
            check_signature(self, self.body(terms), ca_pem, what="advertisement")
        except AggregateCheckError as exc:
            raise MaskingError(f"{exc}: the masked round stops here, nothing of this site was revealed") from None


def cohort_digest(adverts: list[Advertisement]) -> bytes:
    """Digest of the cohort's advertised keys: the neighbour graph's seed, and part of every survivors statement."""
    h = hashlib.sha256(b"secagg-mask-cohort")
    for ad in sorted(adverts, key=lambda a: a.client_id):
        for part in (ad.client_id.encode(), ad.enc_pk, ad.mask_pk, ad.commit):
            h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def survivors_body(terms: Terms, signer: str, cohort: bytes, survivors: list[str]) -> bytes:
    """What a site signs before it reveals any share: who it was told submitted, in which cohort."""
    return _canonical({"v": SURVIVORS_VERSION, "key_id": terms.key_id, "round_id": terms.round_id, "signer": signer,
                       "cohort": cohort.hex(), "survivors": sorted(survivors)})


@dataclasses.dataclass(frozen=True)
class SurvivorsSignature:
    client_id: str
    certificate: bytes
    signature: bytes

    def to_dict(self) -> dict:
        return {"client_id": self.client_id, "certificate": self.certificate.decode(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, d: dict) -> "SurvivorsSignature":
        try:
            return cls(str(d["client_id"]), str(d["certificate"]).encode(), bytes.fromhex(d["signature"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MaskingError(f"a malformed survivors signature ({type(exc).__name__}: {exc})") from None
