"""Sites guard their own privacy: each site's own limits on the DP of the rounds it submits to.

A round's DP settings come from the aggregator, and sites apply whatever it serves. An aggregator
that is the adversary can serve a round without DP, a tiny noise multiplier, or an epsilon that its
settings do not give. A :class:`SitePolicy` is checked at the site before anything is encrypted: it
recomputes the round's epsilon from the settings themselves (never from the epsilon the aggregator
reports), applies the site's rules, and keeps the site's own ledger of the epsilon it spent, per
federation key id, so that the site's budget holds whatever the aggregator's ledger says.

The site's ledger is a hash-chained file (:class:`secagg.budget.ChainedLog`); by default
``site-ledger.json`` next to the site's ``client.key``. A round counts as spent once its noisy
update leaves the site (:meth:`SitePolicy.record`), once per (key id, round id).

What a site cannot check alone: in distributed mode its own noise is only 1/sqrt(k) of the round's,
and the round's epsilon holds only if k honest sites are in the sum. A site that trusts no other
site should take part in ``local`` rounds only (every site adds the full noise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import numbers
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secagg.budget import ChainedLog, read_json_file
from secagg.errors import PrivacyBudgetError, PrivacyError
from secagg.privacy.accountant import epsilon
from secagg.privacy.mechanism import DPConfig

if TYPE_CHECKING:
    from secagg.rounds import RoundStatus

SITE_LEDGER_FILE = "site-ledger.json"
SITE_LEDGER_FORMAT = "secagg-site-ledger"
_FIX = ("Restore it from a backup. This site submits to no round while its ledger cannot be trusted: it could "
        "under-count the privacy this site has spent")


@dataclasses.dataclass(frozen=True)
class SiteCharge:
    """One round this site sent an update to, as its ledger records it."""

    key_id: str
    round_id: str
    dp: DPConfig | None  # None: the update carried no DP noise (its epsilon is unbounded)
    time: float
    update: str = ""  # SHA-256 of the update before encryption and noise ("" in entries of older versions)


@dataclasses.dataclass(frozen=True)
class SitePolicy:
    """This site's limits on the rounds it submits to; see the module's docstring.

    ``require_dp``: refuse rounds without DP. ``max_epsilon``: refuse a round whose own epsilon (at
    its delta) exceeds this. ``min_noise_multiplier``: refuse a round with less noise.
    ``budget``: this site's total epsilon across the rounds of a federation, kept in ``ledger``.
    Every rule refuses a round without DP: it has no noise and an unbounded epsilon.
    """

    require_dp: bool = False
    max_epsilon: float | None = None
    min_noise_multiplier: float | None = None
    budget: float | None = None
    ledger: Path | None = None
    #: Accept row-level DP rounds (merge statistics, secagg.privacy.statistics: one training window is the unit).
    #: Off by default: a site that asks for DP is refused them unless it says a row-level promise is enough.
    allow_row_dp: bool = False

    def __post_init__(self) -> None:
        for flag, value in (("--max-epsilon", self.max_epsilon), ("--min-noise-multiplier", self.min_noise_multiplier),
                            ("--site-budget", self.budget)):
            if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                                          and math.isfinite(value) and value > 0):
                raise PrivacyError(f"{flag} must be a positive number, got {value!r}")
        if self.ledger is not None:
            object.__setattr__(self, "ledger", Path(self.ledger))
        if self.budget is not None and self.ledger is None:
            raise PrivacyError("a site budget (--site-budget) is kept in the site's own ledger: give --site-ledger "
                               "PATH, or build the policy with SitePolicy.for_key(client_key_path, ...)")

    @classmethod
    def for_key(cls, key_path: str | os.PathLike, **options: Any) -> SitePolicy:
        """The policy of the site whose ``client.key`` is ``key_path``: with a ``budget`` and no ``ledger``,
        the ledger is ``site-ledger.json`` next to the key file."""
        if options.get("budget") is not None and options.get("ledger") is None:
            options["ledger"] = Path(key_path).resolve().parent / SITE_LEDGER_FILE
        return cls(**options)

    @property
    def refuses_non_dp(self) -> bool:
        """Whether a round without DP is refused (``require_dp`` or any limit on epsilon or noise)."""
        return self.require_dp or any(v is not None for v in (self.max_epsilon, self.min_noise_multiplier, self.budget))

    # -- the public checks --------------------------------------------------------------------------

    def check(self, status: RoundStatus, key_id: str, *, local_dp: DPConfig | None = None,
              update: str = "") -> None:
        """Raise :class:`PrivacyError` (:class:`PrivacyBudgetError` for the budget) unless this site may submit.

        ``status``: the round as the aggregator serves it; ``key_id``: this site's federation key id.
        ``local_dp``: the site's own local DP for a round without DP settings (``secagg submit
        --clip-norm ... --noise-multiplier ...``). The message names the rule and the round's settings.
        """
        dp = _effective_dp(status, local_dp)
        self._check(status, key_id, dp, self._charges(), update)

    def record(self, status: RoundStatus, key_id: str, *, local_dp: DPConfig | None = None,
               update: str = "") -> float:
        """Record in the site's ledger that this site's update to the round leaves now; returns the epsilon spent.

        Call right before sending: the epsilon counts as spent once a noisy update leaves the site.
        Checks again first (under a lock on the ledger, so two submissions at once cannot both fit
        in the last of the budget). Once per (key id, round id): recording the same round with the
        same settings again adds nothing. ``update``: a digest of the update before encryption and
        noise; with a ledger, a second, different update to a round this site already sent one to is
        refused (an aggregator that re-creates a round id could otherwise difference the two sums).
        Returns this site's epsilon over every round of the
        federation in its ledger, at this round's delta (this round's alone without a ledger);
        ``math.inf`` once an update without DP was sent.
        """
        dp = _effective_dp(status, local_dp)
        if self.ledger is None:
            self._check(status, key_id, dp, [], update)
            return math.inf if dp is None else epsilon([dp.noise_multiplier], dp.delta)
        with _locked(self.ledger):
            chain, charges = self._open()
            self._check(status, key_id, dp, charges, update)
            if _find(charges, key_id, status.round_id) is None:
                now = time.time()
                chain.append({"kind": "round", "key_id": key_id, "round_id": status.round_id,
                              "dp": dp.to_dict() if dp is not None else None, "time": now, "update": update})
                charges.append(SiteCharge(key_id, status.round_id, dp, now, update))
            return _spent(charges, key_id, dp.delta if dp is not None else None)

    def spent(self, key_id: str, delta: float) -> float:
        """This site's epsilon at ``delta`` over the rounds of federation ``key_id`` in its ledger (0 without a ledger)."""
        return _spent(self._charges(), key_id, delta)

    # -- internals ---------------------------------------------------------------------------------------

    def _check(self, status: RoundStatus, key_id: str, dp: DPConfig | None, charges: list[SiteCharge],
               update: str = "") -> None:
        round_id = status.round_id
        prior = _find(charges, key_id, round_id)
        if prior is not None and update and prior.update and (prior.update != update or prior.dp is not None):
            why = ("a second noisy copy (fresh noise) of" if prior.dp is not None and prior.update == update else
                   "a different")
            raise PrivacyError(
                f"site policy refuses round {round_id!r}: this site's ledger says it already sent that round an "
                f"update, and this would be {why} update. An aggregator that re-creates a round id could subtract "
                "the two sums and read this site's change. Submit to a new round id"
            )
        if dp is not None and dp.unit == "row" and self.refuses_non_dp and not self.allow_row_dp:
            raise PrivacyError(
                f"site policy refuses round {round_id!r}: its DP is row-level (it protects one training window, not "
                "this site's whole contribution). If a row-level promise is enough for this site, add --allow-row-dp "
                "(SitePolicy(allow_row_dp=True))")
        if dp is None:
            if self.refuses_non_dp:
                rule = ("--require-dp" if self.require_dp else
                        next(flag for flag, v in (("--max-epsilon", self.max_epsilon),
                                                  ("--min-noise-multiplier", self.min_noise_multiplier),
                                                  ("--site-budget", self.budget)) if v is not None))
                raise PrivacyError(
                    f"site policy ({rule}) refuses round {round_id!r}: it has no DP settings, so this site's update "
                    "would carry no noise (unbounded epsilon). Ask for a round with DP, or add this site's own "
                    "--clip-norm and --noise-multiplier"
                )
            return
        settings = _describe(dp)
        round_eps = epsilon([dp.noise_multiplier], dp.delta)
        if self.refuses_non_dp and status.dp is not None:
            reported = float(status.epsilon_round)
            if not math.isclose(reported, round_eps, rel_tol=1e-9, abs_tol=1e-12):
                raise PrivacyError(
                    f"site policy refuses round {round_id!r}: the aggregator reports its epsilon as {reported:.4g}, but "
                    f"its DP settings ({settings}) give {round_eps:.4g}: the aggregator's records disagree (an edited "
                    "round?). Ask the aggregator's operator to check the round"
                )
        if dp.mode == "distributed" and dp.min_honest > status.min_clients:
            raise PrivacyError(
                f"site policy refuses round {round_id!r}: its distributed noise counts on {dp.min_honest} honest "
                f"contributions, but it may close with {status.min_clients} ({settings}); each site would add too "
                "little noise. An aggregator never creates such a round: ask its operator to check it"
            )
        if self.min_noise_multiplier is not None and dp.noise_multiplier < self.min_noise_multiplier:
            raise PrivacyError(
                f"site policy (--min-noise-multiplier {self.min_noise_multiplier:g}) refuses round {round_id!r}: its "
                f"noise multiplier {dp.noise_multiplier:g} is lower ({settings})"
            )
        if self.max_epsilon is not None and round_eps > self.max_epsilon:
            raise PrivacyError(
                f"site policy (--max-epsilon {self.max_epsilon:g}) refuses round {round_id!r}: its settings give "
                f"epsilon {round_eps:.4g} at delta {dp.delta:g} ({settings})"
            )
        prior = _find(charges, key_id, round_id)
        if prior is not None and prior.dp != dp:
            before = _describe(prior.dp) if prior.dp is not None else "no DP"
            raise PrivacyError(
                f"site policy refuses round {round_id!r}: this site already sent it an update with other DP settings "
                f"({before}); the round now has {settings}. The aggregator changed the round's settings: a second "
                "update would release a second noisy copy. Ask its operator why"
            )
        if self.budget is not None:
            others = [c for c in charges if c.key_id == key_id and c.round_id != round_id]
            before = _spent(others, key_id, dp.delta)
            after = _spent([*others, SiteCharge(key_id, round_id, dp, 0.0)], key_id, dp.delta)
            if after > self.budget:
                if math.isinf(before):
                    why = "this site already sent updates without DP to this federation, so its epsilon is unbounded"
                else:
                    why = f"it would bring this site's epsilon from {before:.4g} to {after:.4g}"
                raise PrivacyBudgetError(
                    f"site policy (--site-budget {self.budget:g}) refuses round {round_id!r}: {why} at delta "
                    f"{dp.delta:g} over {len(others)} earlier round(s) of federation {key_id} ({settings}; ledger "
                    f"{self.ledger})"
                )

    def _open(self) -> tuple[ChainedLog, list[SiteCharge]]:
        chain = ChainedLog(self.ledger, SITE_LEDGER_FORMAT, _FIX)
        data = read_json_file(self.ledger, _FIX)
        if data is None:
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            chain.append({"kind": "genesis", "time": time.time()})
            return chain, []
        chain.load(data)
        charges = []
        for entry in chain.entries[1:]:
            try:
                if entry["kind"] != "round":
                    raise ValueError(f"unknown kind {entry['kind']!r}")
                dp = DPConfig.from_dict(entry["dp"]) if entry["dp"] is not None else None
                charges.append(SiteCharge(str(entry["key_id"]), str(entry["round_id"]), dp, float(entry["time"]),
                                          str(entry.get("update", ""))))
            except (KeyError, TypeError, ValueError, PrivacyError) as exc:
                raise PrivacyError(f"privacy ledger {self.ledger} cannot be trusted: entry {entry.get('seq')} is not "
                                   f"a valid site ledger entry ({exc}). {_FIX}") from None
        return chain, charges

    def _charges(self) -> list[SiteCharge]:
        """The ledger's charges, verified; none without a ledger or before the first record."""
        if self.ledger is None or not self.ledger.exists():
            return []
        return self._open()[1]


def _effective_dp(status: RoundStatus, local_dp: DPConfig | None) -> DPConfig | None:
    """The DP the site's update gets: the round's (validated here, not trusted) or the site's own local DP."""
    if status.dp:
        try:
            return DPConfig.from_dict(status.dp)
        except (KeyError, TypeError, ValueError, PrivacyError) as exc:
            raise PrivacyError(f"round {status.round_id!r} has DP settings this site cannot accept ({exc}); "
                               "refusing to submit") from None
    return local_dp.validate() if local_dp is not None else None


def _find(charges: list[SiteCharge], key_id: str, round_id: str) -> SiteCharge | None:
    return next((c for c in charges if c.key_id == key_id and c.round_id == round_id), None)


def _spent(charges: list[SiteCharge], key_id: str, delta: float | None) -> float:
    mine = [c for c in charges if c.key_id == key_id]
    if any(c.dp is None for c in mine):
        return math.inf
    if not mine:
        return 0.0
    return epsilon([c.dp.noise_multiplier for c in mine], delta if delta is not None else mine[-1].dp.delta)


def _describe(dp: DPConfig) -> str:
    text = (f"noise multiplier {dp.noise_multiplier:g}, delta {dp.delta:g}, clip norm {dp.clip_norm:g}, "
            f"mode {dp.mode}")
    return text + (f", min honest {dp.min_honest}" if dp.mode == "distributed" else "")


@contextlib.contextmanager
def _locked(ledger: Path) -> Iterator[None]:
    """An exclusive lock on the site's ledger, across processes (two submissions at once)."""
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger.with_name(ledger.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
