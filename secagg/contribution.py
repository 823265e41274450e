"""Contributions the aggregator cannot forge, replay or move: tags and signatures over what a client sent.

Every update is bound to exactly one (federation key, round, client, architecture, round settings
including DP, ciphertext seeds, ciphertext digest) by

* a **tag**: HMAC-SHA256 under a key derived from ``client.key`` (HKDF, label ``contribution-tag``).
  The aggregator does not hold ``client.key``, so it cannot compute a tag: it cannot invent a
  contribution, replay one into another round or under another client id, count one twice, or
  serve different sites different round settings without the tags failing;
* under mutual TLS, also a **signature** with the site's own certificate key (ECDSA P-256), and the
  certificate: a site cannot impersonate another site either (every site knows ``client.key``, so
  the tag alone cannot tell sites apart). The aggregator checks the signature at submit (it is
  public-key checkable); clients check it against the federation's CA.

A fetching client receives every contributor's record (client id, digest, seeds digest, tag,
certificate, signature) and all their seeds; it recomputes the seeds' digest and checks every tag
and signature before it decrypts (:func:`verify`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json

from secagg.errors import AggregateCheckError
from secagg.keys import ClientKey

TAG_LABEL = "contribution-tag"
CHECK_LABEL = "integrity-check"
MESSAGE_VERSION = "secagg-contribution-v2"


@dataclasses.dataclass(frozen=True)
class Terms:
    """What every contribution of a round is bound to: the same for every site of an honest round."""

    key_id: str
    round_id: str
    spec_hash: str
    num_ciphertexts: int
    settings: dict  # expected/min clients, bounds, DP, enrollment: what a site was told about the round


def round_settings(expected_clients: int, min_clients: int, max_weight: float, value_bound: float,
                   dp: dict | None, enrolled, masking: dict | None = None) -> dict:
    """The round settings a contribution is bound to, in one canonical form (aggregator and clients alike).

    ``masking``: a masked round's settings (:mod:`secagg.masking`); unmasked rounds leave the key out.
    """
    settings = {"expected_clients": int(expected_clients), "min_clients": int(min_clients),
                "max_weight": float(max_weight), "value_bound": float(value_bound),
                "dp": {k: dp[k] for k in sorted(dp)} if dp else None, "enrolled": sorted(enrolled)}
    if masking is not None:
        settings["masking"] = {k: masking[k] for k in sorted(masking)}
    return settings


@dataclasses.dataclass(frozen=True)
class Contribution:
    """One client's record: who, which bytes, and the proof it made them."""

    client_id: str
    digest: bytes  # of every c0 and seed the client sent (secagg.envelope)
    seeds_digest: bytes  # of its seeds alone, which fetching clients receive and can recompute
    tag: bytes
    certificate: bytes = b""  # PEM, under mutual TLS
    signature: bytes = b""

    def to_dict(self) -> dict:
        return {"client_id": self.client_id, "digest": self.digest.hex(), "seeds_digest": self.seeds_digest.hex(),
                "tag": self.tag.hex(), "certificate": self.certificate.decode(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, d: dict) -> "Contribution":
        return cls(str(d["client_id"]), bytes.fromhex(d["digest"]), bytes.fromhex(d["seeds_digest"]),
                   bytes.fromhex(d["tag"]), str(d.get("certificate", "")).encode(), bytes.fromhex(d.get("signature", "")))


def seeds_digest(seeds) -> bytes:
    """SHA-256 (domain-prefixed) of a contribution's seeds in order."""
    from secagg.envelope import _sha256

    h = _sha256(b"secagg-seeds")
    for s in seeds:
        h.update(s)
    return h.digest()


def message(terms: Terms, client_id: str, digest: bytes, seeds_dig: bytes) -> bytes:
    """The bytes a tag and a signature cover (canonical JSON)."""
    body = {"v": MESSAGE_VERSION, "key_id": terms.key_id, "round_id": terms.round_id, "client_id": client_id,
            "spec_hash": terms.spec_hash, "num_ciphertexts": terms.num_ciphertexts, "settings": terms.settings,
            "digest": digest.hex(), "seeds_digest": seeds_dig.hex()}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def make(key: ClientKey, terms: Terms, client_id: str, digest: bytes, seeds_dig: bytes, tls=None) -> Contribution:
    """This client's record; signed with its TLS key when ``tls`` has a client certificate."""
    msg = message(terms, client_id, digest, seeds_dig)
    tag = hmac.new(key.derive(TAG_LABEL), msg, hashlib.sha256).digest()
    cert = sig = b""
    if tls is not None and tls.cert is not None:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        cert = tls.cert.read_bytes()
        private = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
        sig = private.sign(msg, ec.ECDSA(hashes.SHA256()))
    return Contribution(client_id, digest, seeds_dig, tag, cert, sig)


def verify(key: ClientKey, terms: Terms, records: list[Contribution], seeds_per_client: list[bytes],
           ca_pem: bytes | None = None, enrolled: tuple[str, ...] = (), min_cohort: int = 3) -> None:
    """Check a sum's contributors before decrypting it; raises :class:`AggregateCheckError` naming the problem.

    Distinct client ids, enrollment, at least ``min_cohort`` contributors (the fetching site's own
    minimum, whatever the aggregator says), every seeds digest, every tag, and with ``ca_pem`` every
    certificate (issued by that CA, naming the client) and signature.
    """
    ids = [r.client_id for r in records]
    if len(set(ids)) != len(ids):
        raise AggregateCheckError(f"the sum lists a contributor twice ({', '.join(sorted(ids))}): the aggregator counted "
                                  "one update more than once; nothing was written")
    if len(records) < min_cohort:
        raise AggregateCheckError(
            f"the sum has {len(records)} contribution(s), fewer than this site's minimum cohort {min_cohort}: with so "
            "few, the others' updates could be read off it; nothing was decrypted")
    if len(records) < int(terms.settings.get("min_clients", 0)):  # the round's own minimum, bound by every tag
        raise AggregateCheckError(
            f"the sum has {len(records)} contribution(s), fewer than the round's minimum of "
            f"{terms.settings['min_clients']}: the aggregator left contributions out; nothing was decrypted")
    stray = [i for i in ids if enrolled and i not in enrolled]
    if stray:
        raise AggregateCheckError(f"the sum includes {', '.join(stray)}, not enrolled in round {terms.round_id!r}; "
                                  "nothing was written")
    tag_key = key.derive(TAG_LABEL)
    for record, seeds in zip(records, seeds_per_client):
        if seeds_digest(_split(seeds)) != record.seeds_digest:
            raise AggregateCheckError(f"the seeds served for {record.client_id!r} are not the ones it sent; the "
                                      "aggregator altered the sum's second polynomials; nothing was written")
        msg = message(terms, record.client_id, record.digest, record.seeds_digest)
        if not hmac.compare_digest(hmac.new(tag_key, msg, hashlib.sha256).digest(), record.tag):
            raise AggregateCheckError(
                f"the contribution of {record.client_id!r} does not carry a valid tag for round {terms.round_id!r} "
                "with these settings: it was made for another round, client or settings, or forged; nothing was "
                "written")
        if ca_pem is not None:
            check_signature(record, msg, ca_pem)


def check_signature(record, msg: bytes, ca_pem: bytes | None = None, peer_pem: bytes | None = None,
                    what: str = "contribution") -> None:
    """``record``'s certificate names its client and signed ``msg``; issued by ``ca_pem`` or equal to ``peer_pem``.

    ``record``: anything with ``client_id``, ``certificate`` and ``signature`` (a :class:`Contribution`,
    a masked round's statements); ``what`` names it in errors.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    who = record.client_id
    if not record.certificate or not record.signature:
        raise AggregateCheckError(f"the {what} of {who!r} is not signed; under mutual TLS every site signs its "
                                  "statements with its certificate key")
    try:
        cert = x509.load_pem_x509_certificate(record.certificate)
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [who]:
            raise AggregateCheckError(f"the certificate on {who!r}'s {what} names {names}, not {who!r}")
        if peer_pem is not None and cert != x509.load_pem_x509_certificate(peer_pem):
            raise AggregateCheckError(f"the {what} of {who!r} carries another certificate than the one its "
                                      "connection presented")
        if ca_pem is not None:
            ca = x509.load_pem_x509_certificate(ca_pem)
            now = datetime.datetime.now(datetime.timezone.utc)
            if cert.issuer != ca.subject or not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise AggregateCheckError(f"the certificate on {who!r}'s {what} is not a valid certificate of "
                                          "the federation's CA")
            try:
                ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
            except InvalidSignature:
                raise AggregateCheckError(f"the certificate on {who!r}'s {what} is not a valid certificate of the "
                                          "federation's CA (another CA issued it)") from None
        cert.public_key().verify(record.signature, msg, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AggregateCheckError(f"the signature on {who!r}'s {what} does not verify: it was altered or made by "
                                  "another site; nothing was written") from None
    except (ValueError, TypeError) as exc:
        raise AggregateCheckError(f"the certificate or signature on {who!r}'s {what} is malformed ({exc})") from None


def _split(seeds: bytes) -> list[bytes]:
    from secagg.polys import SEED_BYTES

    return [seeds[i:i + SEED_BYTES] for i in range(0, len(seeds), SEED_BYTES)]
