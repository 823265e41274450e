"""The federation's privacy budget: a persisted ledger of every differentially private round.

Client-level DP composes across rounds: every DP round releases one more noisy sum about every
site. The aggregator keeps the ledger (``privacy.json`` in its state directory), so the budget
belongs to the federation, not to one command line, and survives restarts. A round is charged
when it is created, whether or not it later closes: conservative, and it cannot be gamed by
letting a round fail after sites submitted noisy updates.

The accountant (:mod:`secagg.privacy.accountant`) is plain numpy: the aggregator needs no torch
or opacus to enforce the budget.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

from secagg import store
from secagg.errors import PrivacyBudgetError, PrivacyError
from secagg.privacy.accountant import check_delta, epsilon, noise_multiplier_for

LEDGER_FILE = "privacy.json"


class PrivacyLedger:
    """Epsilon spent by the federation's DP rounds, and the budget that caps it.

    ``epsilon_budget`` None: no cap (rounds are still accounted and reported). The delta of every
    DP round must equal the federation's delta: epsilons at different deltas do not compose.
    """

    def __init__(self, state_dir: str | Path, epsilon_budget: float | None = None, delta: float | None = None) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self._lock = threading.Lock()
        stored = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.rounds: dict[str, float] = {str(k): float(v) for k, v in stored.get("rounds", {}).items()}
        self.epsilon_budget = stored.get("epsilon_budget")
        self.delta = stored.get("delta")
        if epsilon_budget is not None:
            if not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
                raise PrivacyError(f"--epsilon-budget must be a positive number, got {epsilon_budget}")
            if self.epsilon_budget is not None and float(self.epsilon_budget) != float(epsilon_budget):
                raise PrivacyError(
                    f"this state dir's federation already has the privacy budget epsilon={self.epsilon_budget}; "
                    f"--epsilon-budget {epsilon_budget} differs. A budget cannot be changed once set (rounds were "
                    "charged against it); start the aggregator without --epsilon-budget or with the same value"
                )
            self.epsilon_budget = float(epsilon_budget)
        if delta is not None:
            check_delta(delta)
            if self.delta is not None and float(self.delta) != float(delta):
                raise PrivacyError(
                    f"this state dir's federation already uses delta={self.delta}; --delta {delta} differs. "
                    "Epsilons at different deltas do not compose: keep the federation's delta"
                )
            self.delta = float(delta)
        if self.epsilon_budget is not None and self.delta is None:
            raise PrivacyError("a privacy budget needs its delta: give --delta (e.g. 1e-5) with --epsilon-budget")
        self._save()

    def spent(self) -> float:
        """Epsilon of all DP rounds so far, at the federation's delta (0 without any)."""
        if not self.rounds or self.delta is None:
            return 0.0
        return epsilon(list(self.rounds.values()), self.delta)

    def round_epsilon(self, round_id: str) -> float:
        """Epsilon of one round alone (0 if it has no DP)."""
        z = self.rounds.get(round_id)
        return 0.0 if z is None or self.delta is None else epsilon([z], self.delta)

    def charge(self, round_id: str, noise_multiplier: float, delta: float) -> float:
        """Record a new DP round; returns the federation's epsilon including it.

        Refuses (and records nothing) if the round's delta is not the federation's or if the
        composed epsilon would exceed the budget.
        """
        with self._lock:
            if self.delta is not None and float(delta) != float(self.delta):
                raise PrivacyError(
                    f"the round's --delta {delta} differs from the federation's delta {self.delta}; use --delta {self.delta}"
                )
            fed_delta = float(self.delta if self.delta is not None else delta)
            after = epsilon([*self.rounds.values(), noise_multiplier], fed_delta)
            if self.epsilon_budget is not None and after > self.epsilon_budget:
                spent = epsilon(list(self.rounds.values()), fed_delta) if self.rounds else 0.0
                try:
                    need = noise_multiplier_for(self.epsilon_budget, fed_delta, 1, list(self.rounds.values()))
                    fix = f"use --noise-multiplier {need:.4g} or more"
                except PrivacyError:
                    fix = "no noise level fits: the budget is used up"
                raise PrivacyBudgetError(
                    f"round {round_id!r} would bring the federation's epsilon from {spent:.4g} to {after:.4g}, over its "
                    f"budget of {self.epsilon_budget:g} (delta {fed_delta:g}); {fix}"
                )
            self.rounds[round_id] = float(noise_multiplier)
            self.delta = fed_delta
            self._save()
            return after

    def _save(self) -> None:
        data = {"epsilon_budget": self.epsilon_budget, "delta": self.delta, "rounds": self.rounds}
        store.write_json_atomic(self.path, data)

