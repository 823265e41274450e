"""Issue 10: the aggregator is the adversary. Each test is an attack on the privacy budget as the
aggregator's operator would try it, on a real state directory: edit or delete files, then restart.

* Under a nearly spent budget, create a round *without* DP instead.
* Delete (or replace) ``privacy.json`` so that "spent" starts again from 0.
* Edit or truncate ``privacy.json``.
* Edit a round's ``round.json`` after it was charged (noise multiplier 1.0 -> 0.05) so that sites
  apply the edited settings while the status still reports the charged epsilon.
* Forget everything (a new state dir) and start over.

Until the core calls :meth:`PrivacyLedger.reconcile` and :meth:`PrivacyLedger.check_new_round`
itself, "restart" is what it will do: open the ledger and reconcile it with every round's
``round.json``. The same attacks against a restarted :class:`secagg.rounds.Aggregator` are written
below and skipped until that integration lands.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from secagg.budget import LEDGER_FILE, PrivacyLedger
from secagg.errors import PrivacyBudgetError, PrivacyError
from secagg.packing import ModelSpec
from secagg.privacy.accountant import epsilon
from secagg.privacy.mechanism import DPConfig
from secagg.rounds import Aggregator, RoundConfig, RoundStatus
from secagg.site_policy import SitePolicy

DELTA = 1e-5
DP = DPConfig(1.0, 1.0, DELTA, "distributed", 3)
BUDGET = 1.01 * epsilon([1.0, 1.0], DELTA)  # room for two rounds of DP, not three
SPEC = ModelSpec.of({"w": np.zeros(16, dtype=np.float32)})


# -- the state dir, as the aggregator leaves it ------------------------------------------------------------


def create_round(state: Path, ledger: PrivacyLedger, round_id: str, dp: DPConfig | None) -> RoundConfig:
    """What Aggregator.create_round does to the state dir: check, charge, then write round.json."""
    config = RoundConfig(round_id, SPEC, 3, 3, None, dp=dp)
    ledger.check_new_round(round_id, dp)
    if dp is not None:
        ledger.charge(round_id, dp.noise_multiplier, dp.delta, dp=dp)
    folder = state / "rounds" / round_id
    (folder / "accepted").mkdir(parents=True)
    (folder / "incoming").mkdir()
    (folder / "round.json").write_text(json.dumps({
        "config": config.to_dict(), "state": "collecting", "reason": "", "clients_at_close": [],
        "aggregate_digest": "", "accepted_digests": {}, "created_unix": 1.0}))
    return config


def restart(state: Path, epsilon_budget: float | None = BUDGET) -> tuple[PrivacyLedger, dict[str, str]]:
    """What the aggregator does at start: open the ledger, square it with every round.json."""
    ledger = PrivacyLedger(state, epsilon_budget, DELTA if epsilon_budget is not None else None)
    rounds = {}
    for path in sorted((state / "rounds").glob("*/round.json")):
        config = json.loads(path.read_text())["config"]
        rounds[config["round_id"]] = DPConfig.from_dict(config["dp"]) if config.get("dp") else None
    return ledger, ledger.reconcile(rounds)


def served_status(state: Path, ledger: PrivacyLedger, round_id: str) -> RoundStatus:
    """The status a site gets: DP settings from round.json, epsilons from the ledger (as Aggregator._status)."""
    config = RoundConfig.from_dict(json.loads((state / "rounds" / round_id / "round.json").read_text())["config"])
    return RoundStatus(round_id, "collecting", 0, 3, 3, (), None, SPEC.hash, "k" * 16, 1e5, 100.0, SPEC.num_params,
                       dp=config.dp.to_dict() if config.dp else None, epsilon_round=ledger.round_epsilon(round_id),
                       epsilon_spent=ledger.spent(), epsilon_budget=ledger.epsilon_budget, delta=ledger.delta)


@pytest.fixture
def state(tmp_path) -> Path:
    """A federation with a budget for two DP rounds, both created: the budget is nearly spent."""
    state = tmp_path / "state"
    state.mkdir()
    ledger = PrivacyLedger(state, BUDGET, DELTA)
    create_round(state, ledger, "r1", DP)
    create_round(state, ledger, "r2", DP)
    with pytest.raises(PrivacyBudgetError):
        create_round(state, ledger, "r3", DP)
    return state


def edit_round_json(state: Path, round_id: str, **dp_changes) -> None:
    path = state / "rounds" / round_id / "round.json"
    meta = json.loads(path.read_text())
    meta["config"]["dp"] = {**meta["config"]["dp"], **dp_changes} if dp_changes else None
    path.write_text(json.dumps(meta))


# -- the attacks, against the ledger --------------------------------------------------------------------------


def test_a_round_without_dp_under_a_nearly_spent_budget_is_refused(state):
    ledger, _ = restart(state)
    with pytest.raises(PrivacyBudgetError, match="no DP settings.*--allow-non-dp-rounds"):
        create_round(state, ledger, "plain", None)
    assert not (state / "rounds" / "plain").exists()


def test_deleting_privacy_json_does_not_reset_what_was_spent(state):
    spent = restart(state)[0].spent()
    (state / LEDGER_FILE).unlink()
    ledger, quarantine = restart(state)
    assert quarantine == {}
    assert ledger.spent() == pytest.approx(spent) == pytest.approx(epsilon([1.0, 1.0], DELTA))
    with pytest.raises(PrivacyBudgetError, match="over its budget"):
        create_round(state, ledger, "r3", DP)


def test_replacing_privacy_json_with_a_fresh_valid_chain_does_not_reset_it_either(state, tmp_path):
    spent = restart(state)[0].spent()
    blank = tmp_path / "blank"
    blank.mkdir()
    PrivacyLedger(blank, BUDGET, DELTA)  # a well-formed ledger that has charged nothing
    shutil.copy(blank / LEDGER_FILE, state / LEDGER_FILE)
    ledger, quarantine = restart(state)
    assert quarantine == {}
    assert ledger.spent() == pytest.approx(spent)  # the rounds are the other witness


@pytest.mark.parametrize("attack", ["edit the noise", "edit the budget", "delete an entry", "truncate"])
def test_a_tampered_privacy_json_stops_the_start(state, attack):
    path = state / LEDGER_FILE
    data = json.loads(path.read_text())
    if attack == "edit the noise":
        data["entries"][1]["noise_multiplier"] = data["entries"][1]["dp"]["noise_multiplier"] = 1000.0
    elif attack == "edit the budget":
        data["entries"][0]["epsilon_budget"] = 1000.0
    elif attack == "delete an entry":
        del data["entries"][2]
    text = json.dumps(data) if attack != "truncate" else path.read_text()[:-40]
    path.write_text(text)
    with pytest.raises(PrivacyError) as info:
        restart(state)
    assert str(path) in str(info.value) and "will not start" in str(info.value)


def test_editing_round_json_after_the_charge_is_caught_by_the_ledger_and_by_the_sites(state):
    edit_round_json(state, "r1", noise_multiplier=0.05)  # epsilon ~295 instead of ~4.7
    ledger, quarantine = restart(state)
    assert list(quarantine) == ["r1"]
    assert "noise_multiplier 0.05 (charged 1.0)" in quarantine["r1"]
    # A site that trusts nothing the aggregator says catches it too: the status serves z = 0.05 while
    # reporting the charged epsilon.
    status = served_status(state, ledger, "r1")
    assert status.dp["noise_multiplier"] == 0.05 and status.epsilon_round == pytest.approx(epsilon([1.0], DELTA))
    with pytest.raises(PrivacyError, match="records disagree"):
        SitePolicy(require_dp=True).check(status, "k" * 16)
    consistent_liar = RoundStatus(**{**status.__dict__, "epsilon_round": epsilon([0.05], DELTA)})
    with pytest.raises(PrivacyError, match="--max-epsilon 8.*epsilon 294.9"):
        SitePolicy(max_epsilon=8.0).check(consistent_liar, "k" * 16)


def test_removing_a_rounds_dp_after_the_charge_is_caught(state):
    edit_round_json(state, "r2")  # round.json without DP: sites would send exact updates
    _, quarantine = restart(state)
    assert list(quarantine) == ["r2"] and "no DP settings" in quarantine["r2"]


def test_a_round_copied_in_from_elsewhere_is_charged(state, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    create_round(other, PrivacyLedger(other, None, DELTA), "copied", DP)
    shutil.copytree(other / "rounds" / "copied", state / "rounds" / "copied")
    ledger, quarantine = restart(state)
    assert quarantine == {}
    assert ledger.spent() == pytest.approx(epsilon([1.0] * 3, DELTA)) and ledger.spent() > BUDGET


def test_an_aggregator_that_forgets_everything_meets_the_sites_own_budget(tmp_path):
    """The chain cannot stop whoever owns the state dir from starting over; the sites' ledgers can."""
    site = SitePolicy.for_key(tmp_path / "site" / "client.key", budget=BUDGET)
    for attempt in range(2):  # a fresh state dir each time: the aggregator's ledger is empty again
        state = tmp_path / f"state{attempt}"
        state.mkdir()
        ledger = PrivacyLedger(state, BUDGET, DELTA)
        create_round(state, ledger, f"a{attempt}", DP)
        site.check(served_status(state, ledger, f"a{attempt}"), "k" * 16)
        site.record(served_status(state, ledger, f"a{attempt}"), "k" * 16)
    state = tmp_path / "state2"
    state.mkdir()
    ledger = PrivacyLedger(state, BUDGET, DELTA)
    create_round(state, ledger, "a2", DP)
    assert ledger.spent() == pytest.approx(epsilon([1.0], DELTA))  # the aggregator's books look fine
    with pytest.raises(PrivacyBudgetError, match="--site-budget"):
        site.check(served_status(state, ledger, "a2"), "k" * 16)


# -- the same attacks against a restarted Aggregator ---------------------------------------------------------


def aggregator(server_key, state: Path, **options) -> Aggregator:
    return Aggregator(server_key, state, epsilon_budget=BUDGET, delta=DELTA, **options)


@pytest.fixture
def served_state(server_key, tmp_path) -> Path:
    """A real aggregator's state dir with two DP rounds: the budget is nearly spent."""
    state = tmp_path / "served"
    agg = aggregator(server_key, state)
    agg.create_round(RoundConfig("r1", SPEC, 3, 3, None, dp=DP))
    agg.create_round(RoundConfig("r2", SPEC, 3, 3, None, dp=DP))
    return state


def test_a_real_aggregator_refuses_to_start_on_an_edited_ledger(server_key, served_state):
    path = served_state / LEDGER_FILE
    data = json.loads(path.read_text())
    data["entries"][1]["noise_multiplier"] = 1000.0
    path.write_text(json.dumps(data))
    with pytest.raises(PrivacyError, match="entry 1 \\(round 'r1'\\) was edited"):
        aggregator(server_key, served_state)


def test_a_real_aggregator_refuses_a_round_without_dp_under_a_budget(server_key, served_state):
    agg = aggregator(server_key, served_state)
    with pytest.raises(PrivacyBudgetError, match="--allow-non-dp-rounds"):
        agg.create_round(RoundConfig("plain", SPEC, 3, 3, None))
    assert not (served_state / "rounds" / "plain").exists()
    allowed = aggregator(server_key, served_state, allow_non_dp=True)
    assert allowed.create_round(RoundConfig("plain", SPEC, 3, 3, None)).dp is None


def test_a_real_aggregator_rebuilds_a_deleted_ledger(server_key, served_state):
    spent = aggregator(server_key, served_state).status("r1").epsilon_spent
    (served_state / LEDGER_FILE).unlink()
    agg = aggregator(server_key, served_state)
    assert agg.status("r1").epsilon_spent == pytest.approx(spent)
    with pytest.raises(PrivacyBudgetError):
        agg.create_round(RoundConfig("r3", SPEC, 3, 3, None, dp=DP))


def test_a_real_aggregator_quarantines_an_edited_round(server_key, served_state):
    edit_round_json(served_state, "r1", noise_multiplier=0.05)
    agg = aggregator(server_key, served_state)
    status = agg.status("r1")
    assert status.state == "failed" and "round.json was edited" in status.reason
    assert agg.status("r2").state == "collecting"
    # Failed is durable: the next start does not revive it.
    assert aggregator(server_key, served_state).status("r1").state == "failed"
