"""The federation's privacy budget: an append-only, hash-chained ledger of every differentially private round.

Client-level DP composes across rounds: every DP round releases one more noisy sum about every
site. The aggregator keeps the ledger (``privacy.json`` in its state directory), so the budget
belongs to the federation, not to one command line, and survives restarts. A round is charged
when it is created, whether or not it later closes: conservative, and it cannot be gamed by
letting a round fail after sites submitted noisy updates.

The ledger is a :class:`ChainedLog`: entries are only ever appended, and each carries the SHA-256
of the one before it, so an edited, reordered, removed or truncated entry is found when the file is
loaded, and the aggregator refuses to start on it. The budget and delta are in its first (genesis)
entry. The rounds themselves are the other witness: at start the core passes every round's DP
settings to :meth:`PrivacyLedger.reconcile`, which charges any DP round the ledger lacks (so
deleting ``privacy.json`` does not reset the epsilon spent) and names every round whose settings
differ from what was charged (an edited ``round.json``), for the core to fail.

A hash chain without a secret does not stop whoever controls the state directory from writing a
new, consistent history (deleting rounds and their entries together, or recomputing every hash):
it makes accidents and edits of single files evident. Against an aggregator that is the adversary,
the guarantee is at the sites, which check every round's settings themselves and keep their own
ledger (:mod:`secagg.site_policy`).

The accountant (:mod:`secagg.privacy.accountant`) is plain numpy: the aggregator needs no torch
or opacus to enforce the budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from secagg import store
from secagg.errors import PrivacyBudgetError, PrivacyError
from secagg.privacy.accountant import check_delta, epsilon, noise_multiplier_for
from secagg.privacy.mechanism import DPConfig

log = logging.getLogger("secagg.budget")

LEDGER_FILE = "privacy.json"
LEDGER_FORMAT = "secagg-privacy-ledger"
#: The ``prev`` of a chain's first entry.
GENESIS_PREV = "0" * 64
_CHAIN_VERSION = 1
_OLD_FORMAT_KEYS = {"epsilon_budget", "delta", "rounds"}


def _entry_digest(entry: Mapping[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON, its own ``sha256`` field left out."""
    body = {k: v for k, v in entry.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ChainedLog:
    """An append-only JSON file of hash-chained entries; what both privacy ledgers are made of.

    The file is ``{"format", "version", "entries", "head"}``. Entry ``i`` has ``seq`` i, ``prev``
    (the ``sha256`` of entry ``i-1``; :data:`GENESIS_PREV` for the first) and ``sha256`` (of its own
    canonical JSON without that field); ``head`` repeats the number of entries and the last hash,
    so removing entries from the end is found too. Appending rewrites the file atomically
    (:func:`secagg.store.write_json_atomic`): a crash leaves the old or the new chain, never a torn one.

    ``fix`` ends every error message: what the reader should do about a ledger that fails to verify.
    """

    def __init__(self, path: Path, format_name: str, fix: str) -> None:
        self.path = Path(path)
        self.format_name = format_name
        self.fix = fix
        self.entries: list[dict[str, Any]] = []

    def _broken(self, what: str) -> PrivacyError:
        return PrivacyError(f"privacy ledger {self.path} cannot be trusted: {what}. {self.fix}")

    def load(self, data: Mapping[str, Any]) -> None:
        """Verify ``data`` (the file's parsed JSON) and keep its entries; raises naming the first bad entry."""
        if data.get("format") != self.format_name:
            raise self._broken(f"it is not a {self.format_name} file (format {data.get('format')!r})")
        if data.get("version") != _CHAIN_VERSION:
            raise self._broken(f"its version {data.get('version')!r} is not {_CHAIN_VERSION}; upgrade secagg")
        entries = data.get("entries")
        if not isinstance(entries, list) or not entries:
            raise self._broken("it has no entries (not even its genesis entry)")
        prev = GENESIS_PREV
        for i, entry in enumerate(entries):
            label = self._label(i, entry)
            if not isinstance(entry, dict):
                raise self._broken(f"{label} is not a JSON object")
            if entry.get("seq") != i:
                raise self._broken(f"{label} says it is entry {entry.get('seq')!r}: entries were removed or reordered")
            if entry.get("prev") != prev:
                raise self._broken(f"{label} does not follow the entry before it (its prev hash differs): an entry "
                                   "before it was removed, reordered or edited")
            try:
                digest = _entry_digest(entry)
            except (TypeError, ValueError):
                raise self._broken(f"{label} holds a value that is not plain JSON (NaN or infinity?)") from None
            if entry.get("sha256") != digest:
                raise self._broken(f"{label} was edited after it was written (its SHA-256 does not match its content)")
            prev = digest
        if entries[0].get("kind") != "genesis":
            raise self._broken(f"{self._label(0, entries[0])} is not the genesis entry")
        head = data.get("head")
        if not isinstance(head, dict) or head.get("entries") != len(entries) or head.get("sha256") != prev:
            count = head.get("entries") if isinstance(head, dict) else None
            raise self._broken(f"its head records {count!r} entries but the chain ends after entry {len(entries) - 1}: "
                               "entries were removed from its end, or the head was edited")
        self.entries = [dict(e) for e in entries]

    @staticmethod
    def _label(i: int, entry: object) -> str:
        if isinstance(entry, dict) and entry.get("round_id"):
            return f"entry {i} (round {entry['round_id']!r})"
        if isinstance(entry, dict) and entry.get("kind"):
            return f"entry {i} ({entry['kind']})"
        return f"entry {i}"

    def append(self, *entries: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Chain ``entries`` after the last one, write the file durably (once), and return the stored entries."""
        chain = list(self.entries)
        for entry in entries:
            new = dict(entry)
            new["seq"] = len(chain)
            new["prev"] = chain[-1]["sha256"] if chain else GENESIS_PREV
            new["sha256"] = _entry_digest(new)
            chain.append(new)
        self._write(chain)
        added = chain[len(self.entries):]
        self.entries = chain
        return added

    def _write(self, entries: list[dict[str, Any]]) -> None:
        data = {"format": self.format_name, "version": _CHAIN_VERSION, "entries": entries,
                "head": {"entries": len(entries), "sha256": entries[-1]["sha256"]}}
        store.write_json_atomic(self.path, data)


def read_json_file(path: Path, fix: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if there is no file; a clear :class:`PrivacyError` if it does not parse."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrivacyError(f"privacy ledger {path} cannot be trusted: it is not valid JSON ({exc.msg} at line "
                           f"{exc.lineno}): truncated or edited. {fix}") from None
    if not isinstance(data, dict):
        raise PrivacyError(f"privacy ledger {path} cannot be trusted: it is not a JSON object. {fix}")
    return data


@dataclasses.dataclass(frozen=True)
class Charge:
    """One DP round charged to the federation's ledger."""

    round_id: str
    noise_multiplier: float
    delta: float
    dp: DPConfig | None  # None: charged without its full settings (migrated from the unchained format)
    time: float
    source: str  # "created", "reconciled" (found in the state dir) or "migrated"

    def settings_differ(self, dp: DPConfig) -> str:
        """How ``dp`` differs from what was charged ("" if it does not)."""
        if self.dp is not None:
            charged, given = self.dp.to_dict(), dp.to_dict()
        else:
            charged = {"noise_multiplier": self.noise_multiplier, "delta": self.delta}
            given = {"noise_multiplier": float(dp.noise_multiplier), "delta": float(dp.delta)}
        return ", ".join(f"{k} {given[k]!r} (charged {charged[k]!r})" for k in charged if charged[k] != given[k])


class PrivacyLedger:
    """Epsilon spent by the federation's DP rounds, and the budget that caps it.

    ``epsilon_budget`` None: no cap (rounds are still accounted and reported). The delta of every
    DP round must equal the federation's delta: epsilons at different deltas do not compose.
    ``allow_non_dp``: with a budget, rounds without DP are refused unless this is True
    (``secagg serve --allow-non-dp-rounds``). ``clock`` stamps the entries.

    Raises :class:`PrivacyError` if ``privacy.json`` fails to verify: the aggregator must not start.
    """

    def __init__(self, state_dir: str | Path, epsilon_budget: float | None = None, delta: float | None = None,
                 *, allow_non_dp: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.allow_non_dp = bool(allow_non_dp)
        self._clock = clock
        self._lock = threading.Lock()
        fix = ("Restore it from a backup: the aggregator will not start on a privacy ledger it cannot trust. (Without "
               "a backup, moving it aside makes the aggregator rebuild the charges of the rounds still in the state "
               "dir; the budget, and the charges of rounds deleted since, are lost)")
        self._chain = ChainedLog(self.path, LEDGER_FORMAT, fix)
        self.epsilon_budget: float | None = None
        self.delta: float | None = None
        self._charges: list[Charge] = []
        self.was_missing = False  # privacy.json did not exist when this ledger was opened
        stored = read_json_file(self.path, fix)
        if stored is None:
            self.was_missing = True
        elif "format" not in stored and set(stored) <= _OLD_FORMAT_KEYS:
            self._migrate(stored)
        else:
            self._chain.load(stored)
            for entry in self._chain.entries:
                self._apply(entry)
        self._settle(epsilon_budget, delta)
        if self.allow_non_dp and self.epsilon_budget is not None:
            log.warning("rounds without DP are allowed under the privacy budget (--allow-non-dp-rounds): their sums "
                        "carry no noise, and the epsilon of the sites in them is unbounded")

    # -- what was spent ---------------------------------------------------------------------------

    @property
    def charges(self) -> tuple[Charge, ...]:
        """Every charge, oldest first; a round id charged twice (re-created) appears twice."""
        return tuple(self._charges)

    def spent(self) -> float:
        """Epsilon of all DP rounds so far, at the federation's delta (0 without any)."""
        if not self._charges or self.delta is None:
            return 0.0
        return epsilon([c.noise_multiplier for c in self._charges], self.delta)

    def round_epsilon(self, round_id: str) -> float:
        """Epsilon of one round alone, from its charge (0 if it has no DP)."""
        charge = self._latest(round_id)
        return 0.0 if charge is None or self.delta is None else epsilon([charge.noise_multiplier], self.delta)

    # -- what may be spent ------------------------------------------------------------------------

    def check_new_round(self, round_id: str, dp: DPConfig | None) -> None:
        """Refuse a round without DP while a budget is set, unless non-DP rounds were allowed.

        Call before creating any round; DP rounds are then charged with :meth:`charge`.
        """
        if dp is not None or self.epsilon_budget is None:
            return
        if not self.allow_non_dp:
            raise PrivacyBudgetError(
                f"round {round_id!r} has no DP settings, but this federation has a privacy budget (epsilon "
                f"{self.epsilon_budget:g}, {self.spent():.4g} spent): a round without noise releases the sites' exact "
                "sum. Give the round --clip-norm and --noise-multiplier (or --target-epsilon), or start the "
                "aggregator with --allow-non-dp-rounds to allow rounds without DP"
            )
        log.warning("round without DP under the privacy budget (allowed by --allow-non-dp-rounds)",
                    extra={"round": round_id})

    def charge(self, round_id: str, noise_multiplier: float, delta: float, dp: DPConfig | None = None) -> float:
        """Record a new DP round; returns the federation's epsilon including it.

        Refuses (and records nothing) if the round's delta is not the federation's or if the
        composed epsilon would exceed the budget. ``dp``: the round's full settings, recorded so that
        :meth:`reconcile` can tell an edited ``round.json`` (without them only the noise and delta are).
        """
        if dp is not None and (float(dp.noise_multiplier) != float(noise_multiplier) or float(dp.delta) != float(delta)):
            raise PrivacyError(f"round {round_id!r}: the noise multiplier and delta charged differ from its DP settings")
        with self._lock:
            if self.delta is not None and float(delta) != float(self.delta):
                raise PrivacyError(
                    f"the round's --delta {delta} differs from the federation's delta {self.delta}; use --delta {self.delta}"
                )
            fed_delta = float(self.delta if self.delta is not None else delta)
            zs = [c.noise_multiplier for c in self._charges]
            after = epsilon([*zs, noise_multiplier], fed_delta)
            if self.epsilon_budget is not None and after > self.epsilon_budget:
                spent = epsilon(zs, fed_delta) if zs else 0.0
                try:
                    need = noise_multiplier_for(self.epsilon_budget, fed_delta, 1, zs)
                    fix = f"use --noise-multiplier {need:.4g} or more"
                except PrivacyError:
                    fix = "no noise level fits: the budget is used up"
                raise PrivacyBudgetError(
                    f"round {round_id!r} would bring the federation's epsilon from {spent:.4g} to {after:.4g}, over its "
                    f"budget of {self.epsilon_budget:g} (delta {fed_delta:g}); {fix}"
                )
            self._append_charge(round_id, float(noise_multiplier), float(delta), dp, "created")
            return after

    # -- the rounds are the other witness ---------------------------------------------------------

    def reconcile(self, rounds: Mapping[str, DPConfig | None]) -> dict[str, str]:
        """Square the ledger with the rounds in the state dir; returns ``{round_id: reason}`` to quarantine.

        ``rounds``: every round's DP settings as its ``round.json`` holds them (None: no DP), oldest
        first. A DP round the ledger lacks (``privacy.json`` deleted or replaced, a round copied in) is
        charged now, even over the budget: its noisy updates may already have been released. A round
        whose settings differ from its charge (an edited ``round.json``), a round charged as DP whose
        ``round.json`` has no DP, and a round at another delta than the federation's are returned with
        the reason the core fails them with. Charges of rounds that no longer exist stay: they were spent.
        """
        quarantine: dict[str, str] = {}
        recharged: list[str] = []
        with self._lock:
            for round_id, dp in rounds.items():
                charge = self._latest(round_id)
                if dp is None:
                    if charge is not None:
                        quarantine[round_id] = (
                            f"its round.json has no DP settings, but the privacy ledger charged it as a DP round "
                            f"(noise multiplier {charge.noise_multiplier:g}, delta {charge.delta:g}) when it was "
                            "created: round.json was edited, so the round is failed and no site applies its settings"
                        )
                    continue
                if charge is None:
                    self._append_charge(round_id, float(dp.noise_multiplier), float(dp.delta), dp, "reconciled")
                    recharged.append(round_id)
                    log.warning("DP round missing from the privacy ledger: charged now",
                                extra={"round": round_id, "noise_multiplier": float(dp.noise_multiplier)})
                    if float(dp.delta) != self.delta:
                        quarantine[round_id] = (
                            f"it was not charged when created and its delta {dp.delta:g} is not the federation's "
                            f"{self.delta:g}: it was not created by this aggregator (copied in, or round.json edited); "
                            "it is now charged, and failed"
                        )
                    continue
                differ = charge.settings_differ(dp)
                if differ:
                    quarantine[round_id] = (
                        f"its DP settings in round.json differ from those charged to the privacy ledger when it was "
                        f"created: {differ}. round.json was edited, so the round is failed and no site applies the "
                        "edited settings"
                    )
        if self.was_missing and rounds:
            budget_note = ("" if self.epsilon_budget is not None else
                           " The federation's budget and delta were in it too: start the aggregator with the same "
                           "--epsilon-budget and --delta as before.")
            log.warning(f"privacy ledger {self.path} was missing; rebuilt from the {len(rounds)} round(s) in the state "
                        f"dir ({len(recharged)} DP round(s) charged again). Charges of rounds deleted since are "
                        f"lost.{budget_note}", extra={"recharged": len(recharged)})
        if recharged and self.epsilon_budget is not None and self.spent() > self.epsilon_budget:
            log.warning("after charging rounds missing from the privacy ledger, the federation's epsilon %.4g is over "
                        "its budget %g: no more DP rounds fit", self.spent(), self.epsilon_budget)
        for round_id, reason in quarantine.items():
            log.warning("round to quarantine: %s", reason, extra={"round": round_id})
        return quarantine

    # -- internals --------------------------------------------------------------------------------

    def _latest(self, round_id: str) -> Charge | None:
        for charge in reversed(self._charges):
            if charge.round_id == round_id:
                return charge
        return None

    def _append_charge(self, round_id: str, z: float, delta: float, dp: DPConfig | None, source: str) -> None:
        self._append(self._charge_entry(round_id, z, delta, dp, source))

    def _charge_entry(self, round_id: str, z: float, delta: float, dp: DPConfig | None, source: str) -> dict[str, Any]:
        return {"kind": "round", "round_id": round_id, "noise_multiplier": z, "delta": delta,
                "dp": dp.to_dict() if dp is not None else None, "time": self._clock(), "source": source}

    def _append(self, *entries: Mapping[str, Any]) -> None:
        for entry in self._chain.append(*entries):
            self._apply(entry)

    def _apply(self, entry: Mapping[str, Any]) -> None:
        """Replay one verified entry into the ledger's state."""
        kind = entry.get("kind")
        try:
            if kind in ("genesis", "settings"):
                if entry.get("epsilon_budget") is not None and self.epsilon_budget is None:
                    self.epsilon_budget = float(entry["epsilon_budget"])
                if entry.get("delta") is not None and self.delta is None:
                    self.delta = float(entry["delta"])
            elif kind == "round":
                dp = DPConfig.from_dict(entry["dp"]) if entry.get("dp") is not None else None
                charge = Charge(str(entry["round_id"]), float(entry["noise_multiplier"]), float(entry["delta"]), dp,
                                float(entry["time"]), str(entry["source"]))
                epsilon([charge.noise_multiplier], charge.delta)  # validates z and delta
                self._charges.append(charge)
                if self.delta is None:
                    self.delta = charge.delta
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (KeyError, TypeError, ValueError, PrivacyError) as exc:
            raise self._chain._broken(f"{ChainedLog._label(int(entry.get('seq', -1)), entry)} is not a valid "
                                      f"ledger entry ({exc})") from None

    def _settle(self, epsilon_budget: float | None, delta: float | None) -> None:
        """Check the command line's budget and delta against the ledger's; record them if new."""
        if epsilon_budget is not None:
            if not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
                raise PrivacyError(f"--epsilon-budget must be a positive number, got {epsilon_budget}")
            if self.epsilon_budget is not None and float(self.epsilon_budget) != float(epsilon_budget):
                raise PrivacyError(
                    f"this state dir's federation already has the privacy budget epsilon={self.epsilon_budget}; "
                    f"--epsilon-budget {epsilon_budget} differs. A budget cannot be changed once set (rounds were "
                    "charged against it); start the aggregator without --epsilon-budget or with the same value"
                )
        if delta is not None:
            check_delta(delta)
            if self.delta is not None and float(self.delta) != float(delta):
                raise PrivacyError(
                    f"this state dir's federation already uses delta={self.delta}; --delta {delta} differs. "
                    "Epsilons at different deltas do not compose: keep the federation's delta"
                )
        budget = self.epsilon_budget if self.epsilon_budget is not None else epsilon_budget
        if budget is not None and (self.delta if self.delta is not None else delta) is None:
            raise PrivacyError("a privacy budget needs its delta: give --delta (e.g. 1e-5) with --epsilon-budget")
        new = {}
        if epsilon_budget is not None and self.epsilon_budget is None:
            new["epsilon_budget"] = float(epsilon_budget)
        if delta is not None and self.delta is None:
            new["delta"] = float(delta)
        if not self._chain.entries:
            self._append({"kind": "genesis", "epsilon_budget": new.get("epsilon_budget"), "delta": new.get("delta"),
                          "time": self._clock()})
        elif new:
            self._append({"kind": "settings", **new, "time": self._clock()})

    def _migrate(self, stored: Mapping[str, Any]) -> None:
        """Turn an unchained ``privacy.json`` (secagg before the hash chain) into a chain, once."""
        try:
            budget = None if stored.get("epsilon_budget") is None else float(stored["epsilon_budget"])
            delta = None if stored.get("delta") is None else float(stored["delta"])
            rounds = {str(k): float(v) for k, v in dict(stored.get("rounds") or {}).items()}
            if rounds and delta is None:
                raise ValueError("it has rounds but no delta")
            for z in rounds.values():
                epsilon([z], delta)
        except (TypeError, ValueError, PrivacyError) as exc:
            raise PrivacyError(f"privacy ledger {self.path} (the format before the hash chain) cannot be read: {exc}. "
                               f"{self._chain.fix}") from None
        # One write: a crash leaves the old file or the whole chain.
        self._append({"kind": "genesis", "epsilon_budget": budget, "delta": delta, "time": self._clock(),
                      "migrated": True},
                     *(self._charge_entry(round_id, z, delta, None, "migrated") for round_id, z in rounds.items()))
        log.warning(f"privacy ledger {self.path} migrated to the hash-chained format ({len(rounds)} DP round(s)); "
                    "the rounds' full DP settings were not kept before, so only their noise and delta are checked")
