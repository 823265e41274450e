"""A site's side of a masked round, transport-free: keys, shares, masks, and what it agrees to reveal.

One :class:`MaskingSite` lives for one round in the process that submits (its secrets never touch
disk: a site that restarts mid-round counts as dropped, and the others' shares recover what is
needed). Every input from the aggregator is checked before it is used:

* the cohort's advertisements: each signed by a certificate of the federation's CA naming its site,
  this site's own unchanged, enough of them for the threshold;
* shares: AEAD-encrypted to this site, bound to the round, sender and receiver;
* the survivors: signed by at least ``t`` survivors for the same set and the same cohort (so every
  honest site sees the same set), at least the round's minimum and this site's ``min_cohort``.

It never reveals, for one site, both its self-mask share and its mask-key share, whatever the
aggregator asks (:meth:`MaskingSite.reveal` remembers what it revealed).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.contribution import Terms, check_signature
from secagg.errors import AggregateCheckError, MaskingError
from secagg.masking import graph, shamir
from secagg.masking.prg import MaskStream, add_mod, sub_mod
from secagg.masking.settings import MaskSettings
from secagg.masking.statements import (
    Advertisement,
    SurvivorsSignature,
    cohort_digest,
    commitment,
    survivors_body,
)

SEED_BYTES = 32


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _secret(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())


def box_key(shared: bytes, terms: Terms, sender: str, receiver: str) -> bytes:
    """The AEAD key of the shares ``sender`` sends ``receiver`` in this round."""
    info = json.dumps(["secagg-share-v1", terms.key_id, terms.round_id, sender, receiver]).encode()
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(shared)


def pair_context(terms: Terms, a: str, b: str) -> bytes:
    """Binds a pairwise mask to the federation, the round and the (unordered) pair."""
    lo, hi = sorted((a, b))
    return json.dumps(["pair", terms.key_id, terms.round_id, lo, hi]).encode()


def self_context(terms: Terms, site: str) -> bytes:
    return json.dumps(["self", terms.key_id, terms.round_id, site]).encode()


def pair_sign(me: str, other: str) -> int:
    """The lower id adds the pairwise mask, the higher one subtracts it."""
    return 1 if me < other else -1


def public_of(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key (the aggregator checks a rebuilt key with it)."""
    return _raw(X25519PrivateKey.from_private_bytes(private).public_key())


def agree(private: bytes, public: bytes) -> bytes:
    """X25519 agreement from raw keys (the aggregator uses it on a dropped site's rebuilt key)."""
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


class MaskingSite:
    """One site in one masked round (see the module docstring)."""

    def __init__(self, terms: Terms, client_id: str, settings: MaskSettings, q: int, ca_pem: bytes,
                 cert_pem: bytes, key_pem: bytes, *, min_clients: int = 1, min_cohort: int = 3,
                 enrolled: tuple[str, ...] = ()) -> None:
        self.terms = terms
        self.me = client_id
        self.settings = settings
        self.q = q
        self.ca_pem = ca_pem
        self.cert_pem = cert_pem
        self._signer = serialization.load_pem_private_key(key_pem, password=None)
        self.min_clients = min_clients
        self.min_cohort = min_cohort
        self.enrolled = enrolled
        self._enc = X25519PrivateKey.generate()
        self._mask = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(SEED_BYTES)
        self.adverts: dict[str, Advertisement] = {}
        self.cohort = b""
        self.neighbours: tuple[str, ...] = ()
        self.index: dict[str, int] = {}  # site -> its Shamir x coordinate (1-based position in the cohort)
        self.held: dict[str, dict[str, bytes]] = {}  # sender -> {"b": share, "sk": share} it sent this site
        self.maskers: tuple[str, ...] = ()  # neighbours this site masks with (they sent it their shares)
        self._streams: list[tuple[int, MaskStream]] | None = None
        self.revealed: dict[str, str] = {}  # site -> "b" or "sk": what this site revealed about it

    # -- stage 1: advertise -----------------------------------------------------------------------

    def advertise(self) -> Advertisement:
        ad = Advertisement(self.me, _raw(self._enc.public_key()), _raw(self._mask.public_key()),
                           commitment(self._seed), self.cert_pem)
        return Advertisement(ad.client_id, ad.enc_pk, ad.mask_pk, ad.commit, ad.certificate,
                             self._sign(ad.body(self.terms)))

    def join(self, adverts: list[Advertisement]) -> None:
        """Accept the cohort the aggregator announced, after checking every advertisement in it."""
        ids = [a.client_id for a in adverts]
        if len(set(ids)) != len(ids):
            raise MaskingError("the aggregator announced a cohort that lists a site twice; nothing was revealed")
        mine = (_raw(self._enc.public_key()), _raw(self._mask.public_key()), commitment(self._seed))
        own = next((a for a in adverts if a.client_id == self.me), None)
        if own is None or (own.enc_pk, own.mask_pk, own.commit) != mine:
            raise MaskingError(f"the aggregator's cohort does not carry this site's ({self.me!r}) own keys: it "
                               "replaced or dropped them; nothing was revealed")
        stray = sorted(set(ids) - set(self.enrolled)) if self.enrolled else []
        if stray:
            raise MaskingError(f"the cohort includes {', '.join(stray)}, not enrolled in round "
                               f"{self.terms.round_id!r}; nothing was revealed")
        for ad in adverts:
            ad.verify(self.terms, self.ca_pem)
        need = self.need(len(adverts))
        if len(adverts) < need:
            raise MaskingError(f"the cohort has {len(adverts)} site(s); a masked round needs at least {need} (threshold, "
                               "the round's minimum and this site's --min-cohort); nothing was revealed")
        self.adverts = {a.client_id: a for a in adverts}
        self.cohort = cohort_digest(adverts)
        members = sorted(self.adverts)
        self.index = {m: i + 1 for i, m in enumerate(members)}
        self.neighbours = graph.neighbours(members, self.settings.degree_for(len(members)), self.cohort)[self.me]

    def need(self, n: int) -> int:
        """The fewest sites any stage of this round may continue with."""
        return max(self.settings.threshold_for(n), self.min_clients, self.min_cohort)

    # -- stage 2: share ---------------------------------------------------------------------------

    def shares(self) -> dict[str, bytes]:
        """Encrypted shares of this site's self-mask seed and mask key, one box per neighbour."""
        holders = [self.me, *self.neighbours]
        t = self.settings.threshold_for(len(self.adverts))
        xs = [self.index[h] for h in holders]
        b_shares = shamir.split(self._seed, xs, t)
        sk_shares = shamir.split(_secret(self._mask), xs, t)
        boxes = {}
        for h in holders:
            x = self.index[h]
            plain = json.dumps({"b": b_shares[x].hex(), "sk": sk_shares[x].hex()}).encode()
            if h == self.me:
                self.held[self.me] = {"b": b_shares[x], "sk": sk_shares[x]}  # kept here, never sent
                continue
            key = box_key(self._enc.exchange(X25519PublicKey.from_public_bytes(self.adverts[h].enc_pk)),
                          self.terms, self.me, h)
            boxes[h] = AESGCM(key).encrypt(bytes(12), plain, self._aad(self.me, h))
        return boxes

    def _aad(self, sender: str, receiver: str) -> bytes:
        return json.dumps([self.terms.key_id, self.terms.round_id, sender, receiver]).encode()

    def receive(self, boxes: Mapping[str, bytes]) -> None:
        """Open the shares neighbours sent; this site masks with exactly those neighbours."""
        for sender, box in boxes.items():
            if sender not in self.neighbours:
                raise MaskingError(f"the aggregator relayed shares from {sender!r}, not a neighbour of this site in "
                                   "this round; nothing was revealed")
            key = box_key(self._enc.exchange(X25519PublicKey.from_public_bytes(self.adverts[sender].enc_pk)),
                          self.terms, sender, self.me)
            try:
                plain = json.loads(AESGCM(key).decrypt(bytes(12), box, self._aad(sender, self.me)))
                self.held[sender] = {"b": bytes.fromhex(plain["b"]), "sk": bytes.fromhex(plain["sk"])}
            except (InvalidTag, ValueError, KeyError, TypeError):
                raise MaskingError(f"the shares relayed from {sender!r} do not open for this site: altered or not "
                                   "meant for it; nothing was revealed") from None
        self.maskers = tuple(sorted(s for s in self.held if s != self.me))
        self._streams = None

    # -- stage 3: masked submission ---------------------------------------------------------------

    def streams(self) -> list[tuple[int, MaskStream]]:
        """(+1 or -1, stream) of every mask this site adds: its self mask and one per neighbour that shared."""
        if self._streams is None:
            out = [(1, MaskStream(self._seed, self_context(self.terms, self.me), self.q))]
            for other in self.maskers:
                shared = self._mask.exchange(X25519PublicKey.from_public_bytes(self.adverts[other].mask_pk))
                out.append((pair_sign(self.me, other), MaskStream(shared, pair_context(self.terms, self.me, other),
                                                                  self.q)))
            self._streams = out
        return self._streams

    def mask(self, index: int, c0: bytes) -> bytes:
        """Ciphertext ``index``'s first polynomial with every mask of this site added modulo q."""
        if not self.held:
            raise MaskingError("masking before the shares were exchanged")
        q = np.uint64(self.q)
        row = np.frombuffer(c0, dtype="<u8").copy()
        for sign, stream in self.streams():
            (add_mod if sign > 0 else sub_mod)(row, stream.words(index, row.size), q)
        return row.astype("<u8", copy=False).tobytes()

    # -- stage 4: unmask --------------------------------------------------------------------------

    def sign_survivors(self, survivors: list[str]) -> SurvivorsSignature:
        """Sign the survivors the aggregator announced, after checking they can be: this site among them, enough."""
        self._check_survivors(survivors)
        return SurvivorsSignature(self.me, self.cert_pem,
                                  self._sign(survivors_body(self.terms, self.me, self.cohort, survivors)))

    def _check_survivors(self, survivors: list[str]) -> None:
        if len(set(survivors)) != len(survivors) or not set(survivors) <= set(self.adverts):
            raise MaskingError("the aggregator's list of sites that submitted names a site twice or outside the cohort; "
                               "nothing was revealed")
        if self.me not in survivors:
            raise MaskingError(f"the aggregator says this site ({self.me!r}) did not submit, but it did; nothing was "
                               "revealed")
        need = self.need(len(self.adverts))
        if len(survivors) < need:
            raise MaskingError(f"only {len(survivors)} site(s) submitted; this site reveals shares only for sums of at "
                               f"least {need} (threshold, the round's minimum, --min-cohort): with fewer, single "
                               "updates could be read; nothing was revealed")

    def reveal(self, survivors: list[str], signatures: list[SurvivorsSignature]) -> dict[str, dict[str, str]]:
        """The shares the aggregator needs: self-mask shares of survivors, mask-key shares of neighbours that dropped.

        Only after at least ``t`` survivors signed exactly this set of survivors in this cohort (an
        aggregator telling sites different sets is caught here), and never both kinds for one site.
        """
        self._check_survivors(survivors)
        t = self.settings.threshold_for(len(self.adverts))
        body_for = {}
        good = set()
        for sig in signatures:
            if sig.client_id not in survivors or sig.client_id in good:
                continue
            body_for[sig.client_id] = survivors_body(self.terms, sig.client_id, self.cohort, survivors)
            try:
                check_signature(sig, body_for[sig.client_id], self.ca_pem, what="survivors statement")
            except AggregateCheckError as exc:
                raise MaskingError(f"{exc}. Sites were told different sets of survivors (or cohorts): the aggregator "
                                   "is inconsistent; nothing was revealed") from None
            good.add(sig.client_id)
        if len(good) < t:
            raise MaskingError(f"only {len(good)} survivor(s) confirmed this set of survivors; {t} must before any "
                               "share is revealed; nothing was revealed")
        plan: dict[str, str] = {}
        for site in self.held:
            plan[site] = "b" if site in survivors else "sk"
        clash = sorted(s for s, kind in plan.items() if self.revealed.get(s, kind) != kind)
        if clash:
            raise MaskingError(f"asked for the mask-key share of {', '.join(clash)} after revealing its self-mask share "
                               "(or the reverse): with both, the aggregator could read its update; refused")
        self.revealed.update(plan)
        return {kind: {site: self.held[site][kind].hex() for site, k in plan.items() if k == kind} for kind in ("b", "sk")}

    def _sign(self, body: bytes) -> bytes:
        return self._signer.sign(body, ec.ECDSA(hashes.SHA256()))
