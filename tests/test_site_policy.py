"""Sites guard their own privacy (secagg/site_policy.py): each rule refuses and allows, the round's
epsilon is recomputed from its settings (never taken from the aggregator), the site's own ledger
composes its rounds once each and refuses tampering, and the CLI options build the policy."""

from __future__ import annotations

import json
import math
import threading

import pytest

import secagg
from secagg import cli as secagg_cli
from secagg.errors import PrivacyBudgetError, PrivacyError, SecAggError
from secagg.privacy.accountant import epsilon
from secagg.privacy.mechanism import DPConfig
from secagg.rounds import RoundStatus
from secagg.site_policy import SITE_LEDGER_FILE, SitePolicy

DELTA = 1e-5
KEY = "f" * 16
DP = DPConfig(1.0, 1.0, DELTA, "distributed", 3)


def status(round_id: str = "r1", dp: DPConfig | None = DP, epsilon_round: float | None = None,
           min_clients: int = 3) -> RoundStatus:
    """A round as an (honest, unless told otherwise) aggregator serves it."""
    if epsilon_round is None:
        epsilon_round = epsilon([dp.noise_multiplier], dp.delta) if dp else 0.0
    return RoundStatus(round_id, "collecting", 0, 5, min_clients, (), None, "spec", KEY, 1e5, 100.0, 10,
                       dp=dp.to_dict() if dp else None, epsilon_round=epsilon_round, delta=DELTA)


def dp(z: float, mode: str = "distributed", min_honest: int = 3) -> DPConfig:
    return DPConfig(1.0, z, DELTA, mode, min_honest)


# -- each rule refuses and allows ----------------------------------------------------------------------------


def test_require_dp():
    policy = SitePolicy(require_dp=True)
    with pytest.raises(PrivacyError, match=r"site policy \(--require-dp\) refuses round 'plain': it has no DP"):
        policy.check(status("plain", None), KEY)
    policy.check(status("r1", DP), KEY)
    # The site's own local DP makes a round without DP settings acceptable.
    policy.check(status("plain", None), KEY, local_dp=dp(1.0, "local", 1))
    SitePolicy().check(status("plain", None), KEY)  # no rule, no refusal


def test_every_limit_refuses_a_round_without_dp(tmp_path):
    for policy, flag in ((SitePolicy(max_epsilon=10.0), "--max-epsilon"),
                         (SitePolicy(min_noise_multiplier=0.1), "--min-noise-multiplier"),
                         (SitePolicy(budget=10.0, ledger=tmp_path / "l.json"), "--site-budget")):
        with pytest.raises(PrivacyError, match=f"site policy \\({flag}\\) refuses round 'plain'.*unbounded epsilon"):
            policy.check(status("plain", None), KEY)


def test_max_epsilon_is_recomputed_from_the_settings_not_the_reported_epsilon():
    policy = SitePolicy(max_epsilon=4.0)
    policy.check(status("ok", dp(1.5)), KEY)
    assert epsilon([1.5], DELTA) <= 4.0 < epsilon([1.0], DELTA)
    with pytest.raises(PrivacyError, match=r"--max-epsilon 4\) refuses round 'r1': its settings give epsilon 4\.7"):
        policy.check(status("r1", dp(1.0)), KEY)
    # Issue 10: round.json edited to z = 0.05 after the charge; the aggregator still reports epsilon 2.
    lying = status("r1", dp(0.05), epsilon_round=2.0)
    with pytest.raises(PrivacyError) as info:
        SitePolicy(max_epsilon=1000.0).check(lying, KEY)  # even a lax limit: the records disagree
    assert "reports its epsilon as 2" in str(info.value) and "give 294.9" in str(info.value)
    with pytest.raises(PrivacyError, match="noise multiplier 0.05"):
        SitePolicy(max_epsilon=4.0).check(status("r1", dp(0.05)), KEY)  # and honestly reported, it is too much


def test_min_noise_multiplier():
    policy = SitePolicy(min_noise_multiplier=0.8)
    policy.check(status("r1", dp(0.8)), KEY)
    with pytest.raises(PrivacyError, match=r"--min-noise-multiplier 0.8\) refuses round 'r1': its noise multiplier "
                                           r"0.5 is lower \(noise multiplier 0.5, delta 1e-05, clip norm 1, mode "
                                           r"distributed, min honest 3\)"):
        policy.check(status("r1", dp(0.5)), KEY)


def test_distributed_noise_counting_on_more_sites_than_may_close_is_refused():
    # Each site would add 1/sqrt(1000) of the noise, but the round may close with 3 contributions.
    inflated = status("r1", dp(1.0, "distributed", 1000), min_clients=3)
    with pytest.raises(PrivacyError, match="counts on 1000 honest contributions, but it may close with 3"):
        SitePolicy(require_dp=True).check(inflated, KEY)
    SitePolicy(require_dp=True).check(status("r1", dp(1.0, "distributed", 3), min_clients=3), KEY)


def test_invalid_settings_from_the_aggregator_are_refused():
    bad = status("r1", DP)
    bad = RoundStatus(**{**bad.__dict__, "dp": {**DP.to_dict(), "noise_multiplier": 0.0}})
    with pytest.raises(PrivacyError, match="DP settings this site cannot accept"):
        SitePolicy(require_dp=True).check(bad, KEY)


def test_options_are_validated():
    for options, flag in (({"max_epsilon": 0.0}, "--max-epsilon"), ({"min_noise_multiplier": -1.0},
                          "--min-noise-multiplier"), ({"budget": math.inf, "ledger": "x"}, "--site-budget")):
        with pytest.raises(PrivacyError, match=f"{flag} must be a positive number"):
            SitePolicy(**options)
    with pytest.raises(PrivacyError, match="kept in the site's own ledger"):
        SitePolicy(budget=4.0)


# -- the site's own ledger ------------------------------------------------------------------------------------


def test_for_key_keeps_the_ledger_next_to_the_key(tmp_path):
    key = tmp_path / "keys" / "client.key"
    assert SitePolicy.for_key(key, budget=4.0).ledger == (tmp_path / "keys" / SITE_LEDGER_FILE).resolve()
    assert SitePolicy.for_key(key, budget=4.0, ledger=tmp_path / "mine.json").ledger == tmp_path / "mine.json"
    assert SitePolicy.for_key(key, require_dp=True).ledger is None


def test_budget_composes_the_sites_rounds(tmp_path):
    one = epsilon([1.0], DELTA)
    policy = SitePolicy.for_key(tmp_path / "client.key", budget=epsilon([1.0, 1.0], DELTA) * 1.01)
    for round_id in ("r1", "r2"):
        policy.check(status(round_id), KEY)
        spent = policy.record(status(round_id), KEY)
    assert spent == pytest.approx(epsilon([1.0, 1.0], DELTA)) and spent > one
    assert policy.spent(KEY, DELTA) == pytest.approx(spent)
    with pytest.raises(PrivacyBudgetError) as info:
        policy.check(status("r3"), KEY)
    message = str(info.value)
    assert "--site-budget" in message and "refuses round 'r3'" in message
    assert f"from {spent:.4g} to {epsilon([1.0] * 3, DELTA):.4g}" in message and "2 earlier round(s)" in message
    with pytest.raises(PrivacyBudgetError):  # record checks too: it is the last gate before the update leaves
        policy.record(status("r3"), KEY)
    # Much more noise still fits in what is left.
    policy.check(status("r3", dp(50.0)), KEY)
    # Another federation (key id) has its own account in the same file.
    assert policy.record(status("r1"), "0" * 16) == pytest.approx(one)


def test_record_is_idempotent_per_key_and_round(tmp_path):
    policy = SitePolicy(budget=100.0, ledger=tmp_path / "ledger.json")
    first = policy.record(status("r1"), KEY)
    assert policy.record(status("r1"), KEY) == first  # a retry of the same submission
    policy.check(status("r1"), KEY)
    entries = json.loads((tmp_path / "ledger.json").read_text())["entries"]
    assert [(e["kind"], e.get("round_id")) for e in entries] == [("genesis", None), ("round", "r1")]
    assert entries[1]["dp"] == DP.to_dict() and entries[1]["key_id"] == KEY


def test_a_round_whose_settings_changed_since_the_site_sent_to_it_is_refused(tmp_path):
    policy = SitePolicy(ledger=tmp_path / "ledger.json", require_dp=True)
    policy.record(status("r1", dp(1.0)), KEY)
    with pytest.raises(PrivacyError, match="already sent it an update with other DP settings .*noise multiplier 1,"):
        policy.check(status("r1", dp(0.5), epsilon_round=epsilon([0.5], DELTA)), KEY)


def test_a_ledger_only_policy_logs_even_an_update_without_dp(tmp_path):
    policy = SitePolicy(ledger=tmp_path / "ledger.json")
    assert policy.record(status("r1"), KEY) == pytest.approx(epsilon([1.0], DELTA))
    assert policy.record(status("plain", None), KEY) == math.inf
    # From then on no budget can hold for that federation, and the message says why.
    strict = SitePolicy(budget=1000.0, ledger=tmp_path / "ledger.json")
    with pytest.raises(PrivacyBudgetError, match="already sent updates without DP to this federation"):
        strict.check(status("r2"), KEY)


def test_record_without_a_ledger_returns_the_rounds_epsilon():
    assert SitePolicy(max_epsilon=10.0).record(status("r1"), KEY) == pytest.approx(epsilon([1.0], DELTA))


def test_concurrent_submissions_cannot_both_take_the_last_of_the_budget(tmp_path):
    policy = SitePolicy(budget=epsilon([1.0], DELTA) * 1.01, ledger=tmp_path / "ledger.json")
    results: list[str] = []

    def submit(round_id: str) -> None:
        try:
            policy.record(status(round_id), KEY)
            results.append("recorded")
        except PrivacyBudgetError:
            results.append("refused")

    threads = [threading.Thread(target=submit, args=(f"r{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["recorded"] + ["refused"] * 7


@pytest.mark.parametrize("attack", ["edit", "delete", "truncate"])
def test_a_tampered_site_ledger_is_refused(tmp_path, attack):
    path = tmp_path / "ledger.json"
    policy = SitePolicy(budget=100.0, ledger=path)
    for round_id in ("r1", "r2"):
        policy.record(status(round_id), KEY)
    data = json.loads(path.read_text())
    if attack == "edit":
        data["entries"][1]["dp"]["noise_multiplier"] = 1000.0
        path.write_text(json.dumps(data))
    elif attack == "delete":
        del data["entries"][2]
        path.write_text(json.dumps(data))
    else:
        path.write_text(path.read_text()[:200])
    for call in (policy.check, policy.record):
        with pytest.raises(PrivacyError) as info:
            call(status("r3"), KEY)
        assert str(path) in str(info.value) and "cannot be trusted" in str(info.value)
        assert "Restore it from a backup" in str(info.value)


# -- with a real aggregator's round -----------------------------------------------------------------------------


def test_check_a_real_rounds_status(server, client_key, npz_models):
    paths, _ = npz_models(1)
    secagg.create_round(server.address, "r1", template=paths[0], clients=3, dp=dp(1.0))
    secagg.create_round(server.address, "plain", template=paths[0], clients=3)
    real = secagg.round_status(server.address, "r1")
    SitePolicy(require_dp=True, max_epsilon=5.0, min_noise_multiplier=1.0).check(real, client_key.key_id)
    with pytest.raises(PrivacyError, match="--max-epsilon 4"):
        SitePolicy(max_epsilon=4.0).check(real, client_key.key_id)
    with pytest.raises(PrivacyError, match="--require-dp"):
        SitePolicy(require_dp=True).check(secagg.round_status(server.address, "plain"), client_key.key_id)


# -- the CLI options --------------------------------------------------------------------------------------------


def parse(*args: str):
    return secagg_cli._parser().parse_args(list(args))


def test_cli_options_build_the_policy(tmp_path):
    key = tmp_path / "client.key"
    submit = ("submit", "--server", "h:1", "--round", "r1", "--key", str(key), "--client-id", "a", "--model", "m.npz")
    assert secagg_cli._site_policy(parse(*submit)) is None
    policy = secagg_cli._site_policy(parse(*submit, "--require-dp", "--max-epsilon", "4", "--min-noise-multiplier",
                                           "0.7", "--site-budget", "10"))
    assert policy == SitePolicy(True, 4.0, 0.7, 10.0, (tmp_path / SITE_LEDGER_FILE).resolve())
    merge = ("merge", "--server", "h:1", "--round", "m", "--key", str(key), "--client-id", "a", "--model", "m.keras",
             "--data", "d.npz", "--method", "mean", "--clients", "3", "--out", "g.keras")
    policy = secagg_cli._site_policy(parse(*merge, "--site-budget", "3", "--site-ledger", str(tmp_path / "l.json")))
    assert policy == SitePolicy(budget=3.0, ledger=tmp_path / "l.json")
    assert secagg_cli._site_policy(parse(*merge, "--require-dp")) == SitePolicy(require_dp=True)
    with pytest.raises(SecAggError, match="--max-epsilon must be a positive number"):
        secagg_cli._site_policy(parse(*submit, "--max-epsilon", "-1"))


def test_cli_refuses_a_bad_policy_before_contacting_anyone(cli, tmp_path):
    proc = cli("submit", "--server", "127.0.0.1:1", "--round", "r1", "--key", str(tmp_path / "client.key"),
               "--client-id", "a", "--model", str(tmp_path / "m.npz"), "--site-budget", "0", "--retry-for", "0")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "secagg: error: --site-budget must be a positive number, got 0.0"
