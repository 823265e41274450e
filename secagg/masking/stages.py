"""The aggregator's side of a masked round, transport-free: it relays, times the stages, and unmasks the sum.

Stages: ``advertise`` (sites post signed keys) -> ``share`` (sites post encrypted shares for their
neighbours; the aggregator only relays them) -> ``submit`` (masked updates, through the ordinary
submit path) -> ``confirm`` (the aggregator announces who submitted; every survivor signs that set)
-> ``unmask`` (survivors post self-mask shares of the survivors and mask-key shares of the sites that
dropped) -> ``done`` (masks removed: the ordinary encrypted sum, which the aggregator still cannot
decrypt). A stage ends as soon as every site it waits for acted, or after the round's stage timeout
if enough did; otherwise the round fails, naming who is missing.

The aggregator checks what it can check (signatures are public-key checkable, sizes, who may post
what) so that a broken site cannot stall the others; it cannot open a share or forge a statement.
"""

from __future__ import annotations

import dataclasses

from secagg.contribution import Terms, check_signature
from secagg.errors import AggregateCheckError, DuplicateSubmissionError, MaskingError, RoundStateError
from secagg.masking import graph, shamir
from secagg.masking.prg import MaskStream
from secagg.masking.settings import MaskSettings
from secagg.masking.site import agree, pair_context, pair_sign, public_of, self_context
from secagg.masking.statements import (
    Advertisement,
    SurvivorsSignature,
    cohort_digest,
    commitment,
    survivors_body,
)

ADVERTISE, SHARE, SUBMIT, CONFIRM, UNMASK, DONE = "advertise", "share", "submit", "confirm", "unmask", "done"
ORDER = (ADVERTISE, SHARE, SUBMIT, CONFIRM, UNMASK, DONE)
#: Largest encrypted box of shares one site may send another (two 66-byte shares as JSON, AEAD): DoS guard.
MAX_BOX_BYTES = 1024


@dataclasses.dataclass
class MaskState:
    """Everything the aggregator holds about a masked round's stages.

    Saved as a header (``masking.json``, written once: :meth:`to_dict`) and a journal of events
    (``masking.log``, one JSON line per accepted message or stage change, appended: :attr:`pending`,
    :meth:`replay`), so that saving costs the size of the message, not of the whole state.
    """

    settings: MaskSettings
    expected: int  # sites the advertise stage waits for
    min_clients: int
    stage: str = ADVERTISE
    stage_started: float = 0.0
    enrolled: list = dataclasses.field(default_factory=list)  # the sites the advertise stage waits for, if named
    adverts: dict = dataclasses.field(default_factory=dict)  # site -> advertisement dict
    boxes: dict = dataclasses.field(default_factory=dict)  # sender -> {receiver: hex}
    survivors: list = dataclasses.field(default_factory=list)
    signatures: dict = dataclasses.field(default_factory=dict)  # site -> survivors signature dict
    reveals: dict = dataclasses.field(default_factory=dict)  # site -> {"b": {site: hex}, "sk": {site: hex}}

    def __post_init__(self) -> None:
        self.pending: list[dict] = []  # events not yet appended to the journal

    # -- persistence ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The header: settings and the state at creation (the journal carries every change since)."""
        return {"settings": self.settings.to_dict(), "expected": self.expected, "min_clients": self.min_clients,
                "stage": ADVERTISE, "stage_started": self.stage_started if self.stage == ADVERTISE else 0.0,
                "enrolled": list(self.enrolled)}

    @classmethod
    def from_dict(cls, d: dict) -> "MaskState":
        state = cls(MaskSettings.from_dict(d["settings"]), int(d["expected"]), int(d["min_clients"]),
                    str(d.get("stage", ADVERTISE)), float(d.get("stage_started", 0.0)), enrolled=list(d.get("enrolled", [])))
        if state.stage not in ORDER:
            raise MaskingError(f"unknown masking stage {state.stage!r}")
        return state

    def replay(self, events: list[dict]) -> None:
        """Apply journal events in order (after a restart)."""
        tables = {ADVERTISE: self.adverts, SHARE: self.boxes, CONFIRM: self.signatures, UNMASK: self.reveals}
        for e in events:
            if "post" in e:
                tables[e["post"]][e["client"]] = e["value"]
            else:
                if e["stage"] not in ORDER:
                    raise MaskingError(f"unknown masking stage {e['stage']!r} in the journal")
                self.stage, self.stage_started = e["stage"], float(e["at"])
                if e.get("survivors") is not None:
                    self.survivors = list(e["survivors"])

    # -- derived ----------------------------------------------------------------------------------

    @property
    def cohort(self) -> list[str]:
        return sorted(self.adverts)

    @property
    def sharers(self) -> list[str]:
        """The sites that posted their shares (U2): the ones allowed to submit."""
        return sorted(self.boxes)

    def need(self) -> int:
        n = len(self.adverts) if self.stage != ADVERTISE else self.expected
        return max(self.settings.threshold_for(max(n, 1)), self.min_clients)

    def neighbours(self) -> dict[str, tuple[str, ...]]:
        """The neighbour graph of the cohort (fixed once the advertise stage is over; computed once)."""
        cached = getattr(self, "_graph", None)
        if cached is not None and cached[0] == len(self.adverts):
            return cached[1]
        g = graph.neighbours(self.cohort, self.settings.degree_for(len(self.adverts)), self._cohort_digest())
        self._graph = (len(self.adverts), g)
        return g

    def deadline(self) -> float:
        return self.stage_started + self.settings.stage_seconds

    # -- posts ------------------------------------------------------------------------------------

    def post(self, stage: str, client: str, payload: dict, terms: Terms, ca_pem: bytes | None) -> None:
        """Record one site's message for ``stage`` after the checks the aggregator can make; idempotent for a resend."""
        if stage != self.stage and self._resent(stage, client, payload):
            return  # a resend after a lost reply; the stage may have ended with it
        if stage != self.stage:
            raise RoundStateError(f"round {terms.round_id!r} is in its {self.stage} stage, not {stage}: "
                                  + ("this site came too late for it" if ORDER.index(stage) < ORDER.index(self.stage)
                                     else "wait for the stage before"))
        if stage == ADVERTISE:
            ad = Advertisement.from_dict(payload)
            if ad.client_id != client:
                raise MaskingError(f"an advertisement for {ad.client_id!r} posted by {client!r}")
            if ca_pem is None:
                raise MaskingError("a masked round needs an aggregator under mutual TLS")
            ad.verify(terms, ca_pem)
            self._once(self.adverts, client, ad.to_dict(), "advertisement")
        elif stage == SHARE:
            if client not in self.adverts:
                raise MaskingError(f"{client!r} did not advertise keys in round {terms.round_id!r}, so it has no shares "
                                   "to send: it joins the next round")
            mine = set(self.neighbours()[client])
            boxes = payload.get("boxes")
            if not isinstance(boxes, dict) or set(boxes) != mine or any(
                    not isinstance(b, str) or len(b) > 2 * MAX_BOX_BYTES for b in boxes.values()):
                raise MaskingError(f"{client!r} must send exactly one box of shares to each of its neighbours "
                                   f"({', '.join(sorted(mine))})")
            try:
                [bytes.fromhex(b) for b in boxes.values()]
            except ValueError:
                raise MaskingError(f"{client!r} sent a box of shares that is not hex") from None
            self._once(self.boxes, client, dict(boxes), "set of shares")
        elif stage == CONFIRM:
            if client not in self.survivors:
                raise MaskingError(f"{client!r} did not submit in round {terms.round_id!r}; only survivors confirm")
            sig = SurvivorsSignature.from_dict(payload)
            if sig.client_id != client:
                raise MaskingError(f"a survivors statement for {sig.client_id!r} posted by {client!r}")
            if ca_pem is not None:
                body = survivors_body(terms, client, self._cohort_digest(), self.survivors)
                try:
                    check_signature(sig, body, ca_pem, what="survivors statement")
                except AggregateCheckError as exc:
                    raise MaskingError(str(exc)) from None
            self._once(self.signatures, client, sig.to_dict(), "survivors statement")
        elif stage == UNMASK:
            if client not in self.signatures:
                raise MaskingError(f"{client!r} did not confirm the survivors of round {terms.round_id!r}")
            self._check_reveal(client, payload)
            self._once(self.reveals, client, {"b": dict(payload["b"]), "sk": dict(payload["sk"])}, "set of shares")
        else:
            raise MaskingError(f"nothing is posted in the {stage} stage")

    def _check_reveal(self, client: str, payload: dict) -> None:
        b, sk = payload.get("b"), payload.get("sk")
        if not isinstance(b, dict) or not isinstance(sk, dict):
            raise MaskingError("an unmask message carries 'b' and 'sk' maps")
        if set(b) & set(sk):
            raise MaskingError(f"{client!r} sent both kinds of share for one site: refused")
        near = set(self.neighbours()[client]) | {client}
        dropped = set(self.sharers) - set(self.survivors)
        for site, share in list(b.items()) + list(sk.items()):
            if site not in near or not isinstance(share, str) or len(share) != 2 * shamir.SHARE_BYTES:
                raise MaskingError(f"{client!r} sent a malformed share or one for a site it holds none of")
            try:
                bytes.fromhex(share)
            except ValueError:
                raise MaskingError(f"{client!r} sent a share that is not hex") from None
        if not set(b) <= set(self.survivors) or not set(sk) <= dropped:
            raise MaskingError(f"{client!r} sent self-mask shares only for survivors and key shares only for sites that "
                               "dropped")

    def _resent(self, stage: str, client: str, payload: dict) -> bool:
        """Whether ``payload`` is exactly what ``client`` already posted for ``stage``."""
        try:
            if stage == ADVERTISE:
                return self.adverts.get(client) == Advertisement.from_dict(payload).to_dict()
            if stage == SHARE:
                return self.boxes.get(client) == payload.get("boxes")
            if stage == CONFIRM:
                return self.signatures.get(client) == SurvivorsSignature.from_dict(payload).to_dict()
            if stage == UNMASK:
                return self.reveals.get(client) == {"b": payload.get("b"), "sk": payload.get("sk")}
        except MaskingError:
            return False
        return False

    def _once(self, table: dict, client: str, value: dict, what: str) -> None:
        prior = table.get(client)
        if prior is not None and prior != value:
            raise DuplicateSubmissionError(f"{client!r} already sent a different {what} in this stage")
        if prior is None:
            table[client] = value
            self.pending.append({"post": self.stage, "client": client, "value": value})

    def _cohort_digest(self) -> bytes:
        cached = getattr(self, "_digest", None)
        if cached is not None and cached[0] == len(self.adverts):
            return cached[1]
        digest = cohort_digest([Advertisement.from_dict(a) for a in self.adverts.values()])
        self._digest = (len(self.adverts), digest)
        return digest

    # -- views ------------------------------------------------------------------------------------

    def view(self, stage: str, client: str) -> dict | None:
        """What ``client`` gets for ``stage`` once that stage is over; None while it is not."""
        past = ORDER.index(self.stage) > ORDER.index(stage)
        if stage == ADVERTISE:
            return {"adverts": [self.adverts[c] for c in self.cohort]} if past else None
        if stage == SHARE:
            if not past:
                return None
            return {"boxes": {s: boxes[client] for s, boxes in self.boxes.items() if client in boxes}}
        if stage == SUBMIT:
            return {"survivors": list(self.survivors)} if past else None
        if stage == CONFIRM:
            return {"signatures": list(self.signatures.values())} if past else None
        if stage == UNMASK:
            return {} if past else None
        raise MaskingError(f"unknown stage {stage!r}")

    # -- stage machine ----------------------------------------------------------------------------

    def advance(self, now: float, accepted: set[str]) -> str | None:
        """Move through every stage that is over; returns why the round must fail, or None.

        ``accepted``: the sites whose masked updates were accepted so far.
        """
        while True:
            late = now >= self.deadline()
            if self.stage == ADVERTISE:
                done, acted, waited = len(self.adverts) >= self.expected, set(self.adverts), self.enrolled or None
            elif self.stage == SHARE:
                done, acted, waited = set(self.boxes) >= set(self.adverts), set(self.boxes), self.cohort
            elif self.stage == SUBMIT:
                done, acted, waited = accepted >= set(self.boxes), accepted, self.sharers
            elif self.stage == CONFIRM:
                done, acted, waited = set(self.signatures) >= set(self.survivors), set(self.signatures), self.survivors
            elif self.stage == UNMASK:
                done, acted, waited = set(self.reveals) >= set(self.signatures), set(self.reveals), sorted(self.signatures)
            else:
                return None
            if not done and not late:
                return None
            if not done and len(acted) < self.need():
                missing = sorted(set(waited) - acted) if waited is not None else []
                return (f"the {self.stage} stage ended after {self.settings.stage_seconds:g} s with {len(acted)} site(s), "
                        f"fewer than the {self.need()} it needs (threshold {self.settings.threshold_for(max(len(self.adverts), 1))}"
                        f", minimum {self.min_clients})" + (f"; missing: {', '.join(missing)}" if missing else ""))
            if self.stage == SUBMIT:
                self.survivors = sorted(accepted)
            self.stage = ORDER[ORDER.index(self.stage) + 1]
            self.stage_started = now
            self.pending.append({"stage": self.stage, "at": now,
                                 "survivors": self.survivors if self.stage == CONFIRM else None})
            if self.stage == DONE:
                return None

    # -- unmasking --------------------------------------------------------------------------------

    def removals(self, terms: Terms, q: int) -> list[tuple[int, MaskStream]]:
        """(+1 or -1, stream) of every mask left in the survivors' sum: subtract sign * stream to remove it.

        Rebuilds each survivor's self-mask seed and each dropped site's mask key from ``t`` shares and
        checks them against the advertised commitment and public key; raises naming what is missing.
        """
        n = len(self.adverts)
        t = self.settings.threshold_for(n)
        index = {m: i + 1 for i, m in enumerate(self.cohort)}
        near = self.neighbours()
        out: list[tuple[int, MaskStream]] = []
        problems = []
        for site in self.survivors:
            seed = self._rebuild(site, "b", t, index, problems)
            if seed is None:
                continue
            if commitment(seed) != bytes.fromhex(self.adverts[site]["commit"]):
                problems.append(f"{site}: its self-mask shares do not match its commitment (a site sent a wrong share)")
                continue
            out.append((1, MaskStream(seed, self_context(terms, site), q)))
        for site in sorted(set(self.sharers) - set(self.survivors)):
            partners = [u for u in near[site] if u in self.survivors and site in self.boxes and u in self.boxes
                        and u in self.boxes[site]]
            if not partners:
                continue
            key = self._rebuild(site, "sk", t, index, problems)
            if key is None:
                continue
            if public_of(key) != bytes.fromhex(self.adverts[site]["mask_pk"]):
                problems.append(f"{site}: its key shares do not rebuild its advertised key (a site sent a wrong share)")
                continue
            for u in partners:
                shared = agree(key, bytes.fromhex(self.adverts[u]["mask_pk"]))
                out.append((pair_sign(u, site), MaskStream(shared, pair_context(terms, u, site), q)))
        if problems:
            raise MaskingError("the masks cannot be removed: " + "; ".join(problems))
        return out

    def _rebuild(self, site: str, kind: str, t: int, index: dict, problems: list) -> bytes | None:
        shares = {index[holder]: bytes.fromhex(r[kind][site]) for holder, r in self.reveals.items() if site in r[kind]}
        if len(shares) < t:
            holders = sorted(set(self.neighbours()[site]) | {site})
            silent = [h for h in holders if h not in self.reveals]
            problems.append(f"{site}: {len(shares)} of the {t} shares needed (silent holders: {', '.join(silent) or 'none'})")
            return None
        size = 32
        try:
            return shamir.combine(shares, t, size)
        except MaskingError as exc:
            problems.append(f"{site}: {exc}")
            return None
