"""The federation's privacy ledger (secagg/budget.py): a hash chain verified at every start, rebuilt
from the rounds when it is missing, the rounds' DP settings checked against their charges, rounds
without DP refused under a budget, and the unchained format of earlier versions migrated once."""

from __future__ import annotations

import json
import logging

import pytest

from secagg.budget import GENESIS_PREV, LEDGER_FILE, PrivacyLedger
from secagg.errors import PrivacyBudgetError, PrivacyError
from secagg.privacy.accountant import epsilon
from secagg.privacy.mechanism import DPConfig

DELTA = 1e-5
DP1 = DPConfig(1.0, 1.0, DELTA, "distributed", 3)
DP2 = DPConfig(1.0, 2.0, DELTA, "local", 1)
DP3 = DPConfig(0.5, 3.0, DELTA, "distributed", 4)


def charged_ledger(state, budget: float | None = 20.0) -> PrivacyLedger:
    ledger = PrivacyLedger(state, budget, DELTA)
    for round_id, dp in (("r1", DP1), ("r2", DP2), ("r3", DP3)):
        ledger.charge(round_id, dp.noise_multiplier, dp.delta, dp=dp)
    return ledger


def read(state) -> dict:
    return json.loads((state / LEDGER_FILE).read_text())


def write(state, data: dict) -> None:
    (state / LEDGER_FILE).write_text(json.dumps(data, indent=1))


# -- the chain -------------------------------------------------------------------------------------------


def test_entries_are_chained_and_survive_a_restart(tmp_path):
    ledger = charged_ledger(tmp_path)
    data = read(tmp_path)
    entries = data["entries"]
    assert [e["kind"] for e in entries] == ["genesis", "round", "round", "round"]
    assert entries[0]["prev"] == GENESIS_PREV and entries[0]["epsilon_budget"] == 20.0 and entries[0]["delta"] == DELTA
    for before, after in zip(entries, entries[1:]):
        assert after["prev"] == before["sha256"]
    assert entries[2]["dp"] == DP2.to_dict() and entries[2]["round_id"] == "r2"
    assert data["head"] == {"entries": 4, "sha256": entries[-1]["sha256"]}

    again = PrivacyLedger(tmp_path)
    want = epsilon([1.0, 2.0, 3.0], DELTA)
    assert again.spent() == pytest.approx(want) == ledger.spent()
    assert again.round_epsilon("r2") == pytest.approx(epsilon([2.0], DELTA))
    assert (again.epsilon_budget, again.delta) == (20.0, DELTA)
    assert [c.dp for c in again.charges] == [DP1, DP2, DP3]
    assert read(tmp_path) == data  # opening a sound ledger changes nothing


def test_an_edited_number_is_refused_naming_file_entry_and_fix(tmp_path):
    charged_ledger(tmp_path)
    data = read(tmp_path)
    data["entries"][2]["noise_multiplier"] = 200.0  # the attacker's "r2 spent almost nothing"
    write(tmp_path, data)
    with pytest.raises(PrivacyError) as info:
        PrivacyLedger(tmp_path)
    message = str(info.value)
    assert str(tmp_path / LEDGER_FILE) in message
    assert "entry 2 (round 'r2') was edited" in message
    assert "Restore it from a backup" in message and "will not start" in message


def test_an_edited_budget_is_refused(tmp_path):
    charged_ledger(tmp_path)
    data = read(tmp_path)
    data["entries"][0]["epsilon_budget"] = 1000.0
    write(tmp_path, data)
    with pytest.raises(PrivacyError, match=r"entry 0 \(genesis\) was edited"):
        PrivacyLedger(tmp_path)


def test_an_edit_with_its_hash_recomputed_still_breaks_the_next_link(tmp_path):
    from secagg.budget import _entry_digest

    charged_ledger(tmp_path)
    data = read(tmp_path)
    data["entries"][1]["noise_multiplier"] = data["entries"][1]["dp"]["noise_multiplier"] = 200.0
    data["entries"][1]["sha256"] = _entry_digest(data["entries"][1])
    write(tmp_path, data)
    with pytest.raises(PrivacyError, match=r"entry 2 \(round 'r2'\) does not follow the entry before it"):
        PrivacyLedger(tmp_path)


@pytest.mark.parametrize("index", [1, 2, 3])
def test_a_deleted_entry_is_refused(tmp_path, index):
    charged_ledger(tmp_path)
    data = read(tmp_path)
    del data["entries"][index]
    write(tmp_path, data)
    with pytest.raises(PrivacyError, match="cannot be trusted") as info:
        PrivacyLedger(tmp_path)
    # A middle entry breaks the chain at the one that followed it; the last one, the head.
    expected = "entries were removed from its end" if index == 3 else f"entry {index} "
    assert expected in str(info.value)


def test_a_truncated_file_is_refused(tmp_path):
    charged_ledger(tmp_path)
    path = tmp_path / LEDGER_FILE
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(PrivacyError, match="not valid JSON .* truncated or edited") as info:
        PrivacyLedger(tmp_path)
    assert str(path) in str(info.value) and "Restore it from a backup" in str(info.value)
    path.write_text("")
    with pytest.raises(PrivacyError, match="not valid JSON"):
        PrivacyLedger(tmp_path)


def test_a_refused_ledger_is_left_as_it_was(tmp_path):
    charged_ledger(tmp_path)
    data = read(tmp_path)
    data["entries"][1]["delta"] = 1e-3
    write(tmp_path, data)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(PrivacyError):
        PrivacyLedger(tmp_path, 20.0, DELTA)
    assert (tmp_path / LEDGER_FILE).read_bytes() == before  # the evidence is not overwritten


# -- budget, delta, charges --------------------------------------------------------------------------------


def test_budget_and_delta_cannot_change_and_a_late_budget_is_chained(tmp_path):
    PrivacyLedger(tmp_path).charge("r1", 1.0, DELTA)
    with pytest.raises(PrivacyError, match="already uses delta"):
        PrivacyLedger(tmp_path, 10.0, 1e-6)
    ledger = PrivacyLedger(tmp_path, 10.0)  # a budget may be set once, later; the rounds' delta is the federation's
    assert (ledger.epsilon_budget, ledger.delta) == (10.0, DELTA)
    assert [e["kind"] for e in read(tmp_path)["entries"]] == ["genesis", "round", "settings"]
    with pytest.raises(PrivacyError, match="cannot be changed"):
        PrivacyLedger(tmp_path, 12.0)
    assert PrivacyLedger(tmp_path, 10.0, DELTA).epsilon_budget == 10.0  # the same values are fine, and add nothing
    assert len(read(tmp_path)["entries"]) == 3
    with pytest.raises(PrivacyError, match="needs its delta"):
        PrivacyLedger(tmp_path / "other", 10.0)


def test_charge_refuses_over_budget_and_records_nothing(tmp_path):
    one = epsilon([1.0], DELTA)
    ledger = PrivacyLedger(tmp_path, 1.05 * one, DELTA)
    ledger.charge("r1", 1.0, DELTA, dp=DP1)
    with pytest.raises(PrivacyBudgetError, match="over its budget.*--noise-multiplier"):
        ledger.charge("r2", 1.0, DELTA, dp=DP1)
    with pytest.raises(PrivacyError, match="delta"):
        ledger.charge("r3", 50.0, 1e-6)
    assert [c.round_id for c in PrivacyLedger(tmp_path).charges] == ["r1"]


def test_a_round_id_charged_twice_counts_twice(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    ledger.charge("r1", 1.0, DELTA)
    ledger.charge("r1", 1.0, DELTA)  # re-created after its folder was deleted: a second release
    assert PrivacyLedger(tmp_path).spent() == pytest.approx(epsilon([1.0, 1.0], DELTA))


# -- reconcile: the rounds are the other witness ------------------------------------------------------------


def test_deleted_ledger_is_rebuilt_from_the_rounds(tmp_path, caplog):
    before = charged_ledger(tmp_path).spent()
    (tmp_path / LEDGER_FILE).unlink()
    ledger = PrivacyLedger(tmp_path, 20.0, DELTA)
    assert ledger.spent() == 0.0 and ledger.was_missing
    with caplog.at_level(logging.WARNING, logger="secagg.budget"):
        quarantine = ledger.reconcile({"r1": DP1, "r2": DP2, "r3": DP3, "plain": None})
    assert quarantine == {}
    assert ledger.spent() == pytest.approx(before)
    assert PrivacyLedger(tmp_path).spent() == pytest.approx(before)  # durable
    assert [c.source for c in ledger.charges] == ["reconciled"] * 3
    assert any("was missing; rebuilt from the 4 round(s)" in r.getMessage() and "3 DP round(s) charged again"
               in r.getMessage() for r in caplog.records)
    # The rebuilt ledger knows the full settings: an edit after the rebuild is caught like any other.
    assert ledger.reconcile({"r1": DP1, "r2": DP2, "r3": DP3}) == {}
    assert PrivacyLedger(tmp_path).reconcile({"r2": DPConfig(1.0, 0.05, DELTA, "local", 1)}).keys() == {"r2"}


def test_deleted_ledger_without_the_budget_flag_says_the_budget_is_lost(tmp_path, caplog):
    charged_ledger(tmp_path)
    (tmp_path / LEDGER_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="secagg.budget"):
        PrivacyLedger(tmp_path).reconcile({"r1": DP1})
    assert any("start the aggregator with the same --epsilon-budget and --delta" in r.getMessage()
               for r in caplog.records)


def test_a_round_missing_from_the_ledger_is_charged_even_over_the_budget(tmp_path):
    one = epsilon([1.0], DELTA)
    ledger = PrivacyLedger(tmp_path, 1.05 * one, DELTA)
    ledger.charge("r1", 1.0, DELTA, dp=DP1)
    # A round copied into the state dir: its noisy updates may be out already, so it counts.
    assert ledger.reconcile({"r1": DP1, "copied": DP1}) == {}
    assert ledger.spent() == pytest.approx(epsilon([1.0, 1.0], DELTA))
    assert ledger.spent() > ledger.epsilon_budget
    with pytest.raises(PrivacyBudgetError, match="no noise level fits"):
        ledger.charge("r2", 100.0, DELTA)


def test_edited_round_settings_are_returned_for_quarantine(tmp_path):
    ledger = charged_ledger(tmp_path)
    edited = DPConfig(1.0, 0.05, DELTA, "distributed", 3)  # z 1.0 -> 0.05 after the charge
    more_honest = DPConfig(1.0, 1.0, DELTA, "distributed", 1000)  # each site would add 1/sqrt(1000) of the noise
    quarantine = ledger.reconcile({"r1": edited, "r2": None, "r3": DP3})
    assert set(quarantine) == {"r1", "r2"}
    assert "noise_multiplier 0.05 (charged 1.0)" in quarantine["r1"] and "round.json was edited" in quarantine["r1"]
    assert "no DP settings" in quarantine["r2"] and "charged it as a DP round" in quarantine["r2"]
    assert "min_honest 1000 (charged 3)" in ledger.reconcile({"r1": more_honest})["r1"]
    # Nothing was charged or changed by finding them: the charges are the truth.
    assert [c.dp for c in PrivacyLedger(tmp_path).charges] == [DP1, DP2, DP3]


def test_a_copied_in_round_at_another_delta_is_charged_and_quarantined(tmp_path):
    ledger = charged_ledger(tmp_path)
    foreign = DPConfig(1.0, 1.0, 1e-3, "local", 1)
    quarantine = ledger.reconcile({"foreign": foreign})
    assert "not the federation's" in quarantine["foreign"]
    assert ledger.charges[-1].round_id == "foreign" and ledger.charges[-1].source == "reconciled"


def test_charges_of_deleted_rounds_stay_spent(tmp_path):
    before = charged_ledger(tmp_path).spent()
    ledger = PrivacyLedger(tmp_path)
    assert ledger.reconcile({"r3": DP3}) == {}  # r1 and r2 are gone from the state dir
    assert ledger.spent() == pytest.approx(before)


# -- rounds without DP under a budget ---------------------------------------------------------------------


def test_a_round_without_dp_is_refused_under_a_budget(tmp_path):
    ledger = PrivacyLedger(tmp_path, 8.0, DELTA)
    with pytest.raises(PrivacyBudgetError) as info:
        ledger.check_new_round("plain", None)
    assert "--allow-non-dp-rounds" in str(info.value) and "--noise-multiplier" in str(info.value)
    ledger.check_new_round("noisy", DP1)  # DP rounds pass (and are then charged)
    (tmp_path / "no-budget").mkdir()
    PrivacyLedger(tmp_path / "no-budget").check_new_round("plain", None)  # no budget, nothing to protect


def test_a_round_without_dp_is_allowed_with_the_flag(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="secagg.budget"):
        ledger = PrivacyLedger(tmp_path, 8.0, DELTA, allow_non_dp=True)
        ledger.check_new_round("plain", None)
    assert any("--allow-non-dp-rounds" in r.getMessage() for r in caplog.records)
    assert ledger.spent() == 0.0


# -- the format before the chain -------------------------------------------------------------------------


def test_an_unchained_ledger_is_migrated_once(tmp_path, caplog):
    write(tmp_path, {"epsilon_budget": 10.0, "delta": DELTA, "rounds": {"r1": 1.0, "r2": 2.0}})
    with caplog.at_level(logging.WARNING, logger="secagg.budget"):
        ledger = PrivacyLedger(tmp_path, 10.0, DELTA)
    assert sum("migrated to the hash-chained format" in r.getMessage() for r in caplog.records) == 1
    assert ledger.spent() == pytest.approx(epsilon([1.0, 2.0], DELTA))
    assert (ledger.epsilon_budget, ledger.delta) == (10.0, DELTA)
    data = read(tmp_path)
    assert data["format"] == "secagg-privacy-ledger" and data["entries"][0]["migrated"] is True
    assert [(e.get("round_id"), e.get("source")) for e in data["entries"]] == [
        (None, None), ("r1", "migrated"), ("r2", "migrated")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="secagg.budget"):
        again = PrivacyLedger(tmp_path)
    assert not any("migrated" in r.getMessage() for r in caplog.records)
    assert again.spent() == pytest.approx(ledger.spent())
    # Migrated charges kept only the noise: an edit of it is still found, an edit of the clip norm cannot be.
    assert again.reconcile({"r1": DPConfig(5.0, 1.0, DELTA, "local", 1)}) == {}
    assert "noise_multiplier 0.5 (charged 1.0)" in again.reconcile({"r1": DPConfig(1.0, 0.5, DELTA, "local", 1)})["r1"]


def test_an_unreadable_unchained_ledger_is_refused(tmp_path):
    write(tmp_path, {"epsilon_budget": 10.0, "delta": None, "rounds": {"r1": 1.0}})
    with pytest.raises(PrivacyError, match="before the hash chain.*no delta"):
        PrivacyLedger(tmp_path)
