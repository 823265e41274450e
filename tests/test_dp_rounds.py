"""Client-level DP rounds end to end: options, noise on the decrypted average, the federation's
budget (persisted, enforced), epsilon in the round status, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import secagg
from secagg.errors import PrivacyBudgetError, PrivacyError
from secagg.privacy.accountant import epsilon
from secagg.privacy.mechanism import DPConfig

LAYOUT = {"w": ((4000,), "float64")}


def _models(npz_models):
    return npz_models(3, layout=LAYOUT)


def test_distributed_dp_round_noise_and_status(server, client_key, npz_models):
    paths, tensors = _models(npz_models)
    dp = DPConfig(clip_norm=1.0, noise_multiplier=2.0, delta=1e-5, mode="distributed", min_honest=3)
    status = secagg.create_round(server.address, "r1", template=paths[0], clients=3, dp=dp)
    assert status.dp == dp.to_dict()
    assert status.epsilon_round == pytest.approx(epsilon([2.0], 1e-5))
    assert status.epsilon_spent == pytest.approx(status.epsilon_round) and status.delta == 1e-5
    for i, p in enumerate(paths):
        receipt = secagg.submit(server.address, "r1", client_key, f"s{i}", p)
        assert receipt.dp == dp
    avg = secagg.fetch_average(server.address, "r1", client_key, wait=30).vector
    # Each site clipped its whole vector (norm ~63) to 1 and added std z*C/sqrt(k): the mean of 3
    # carries std z*C/3 = 0.667 around the mean of the clipped vectors.
    clipped = [t["w"] / np.linalg.norm(t["w"]) for t in tensors]
    residual = avg - np.mean(clipped, axis=0)
    assert np.std(residual) == pytest.approx(2.0 / 3, rel=0.05)
    assert abs(np.mean(residual)) < 0.05


def test_local_mode_adds_the_full_noise_at_every_site(server, client_key, npz_models):
    paths, tensors = _models(npz_models)
    dp = DPConfig(1.0, 0.5, 1e-5, "local", 1)
    secagg.create_round(server.address, "r1", template=paths[0], clients=3, dp=dp)
    for i, p in enumerate(paths):
        secagg.submit(server.address, "r1", client_key, f"s{i}", p)
    avg = secagg.fetch_average(server.address, "r1", client_key, wait=30).vector
    clipped = [t["w"] / np.linalg.norm(t["w"]) for t in tensors]
    # Three independent std-0.5 noises, averaged: std 0.5 / sqrt(3).
    assert np.std(avg - np.mean(clipped, axis=0)) == pytest.approx(0.5 / math.sqrt(3), rel=0.05)


def test_reference_is_what_gets_clipped(server, client_key, npz_models):
    paths, tensors = _models(npz_models)
    reference = {"w": np.mean([t["w"] for t in tensors], axis=0)}
    dp = DPConfig(clip_norm=1.0, noise_multiplier=1e-4, delta=1e-5, mode="distributed", min_honest=3)
    secagg.create_round(server.address, "r1", template=paths[0], clients=3, dp=dp)
    for i, p in enumerate(paths):
        secagg.submit(server.address, "r1", client_key, f"s{i}", p, dp_reference=reference)
    avg = secagg.fetch_average(server.address, "r1", client_key, wait=30).vector
    updates = [t["w"] - reference["w"] for t in tensors]
    want = reference["w"] + np.mean([u / np.linalg.norm(u) for u in updates], axis=0)
    assert float(np.max(np.abs(avg - want))) < 1e-3


def test_budget_is_enforced_persisted_and_reported(keypair, client_key, npz_models, tmp_path):
    paths, _ = _models(npz_models)
    state = tmp_path / "state"
    dp = DPConfig(1.0, 1.0, 1e-5, "distributed", 3)
    one = epsilon([1.0], 1e-5)
    budget = 1.05 * one  # room for one such round, not two
    srv = secagg.serve(keypair.server, "127.0.0.1:0", state, epsilon_budget=budget, delta=1e-5)
    try:
        s = secagg.create_round(srv.address, "r1", template=paths[0], clients=3, dp=dp)
        assert s.epsilon_spent == pytest.approx(one) and s.epsilon_budget == budget
        with pytest.raises(PrivacyBudgetError, match="over its budget") as info:
            secagg.create_round(srv.address, "r2", template=paths[0], clients=3, dp=dp)
        assert "--noise-multiplier" in str(info.value)  # names the fix
        with pytest.raises(secagg.errors.RoundNotFoundError):  # nothing was created or charged
            secagg.round_status(srv.address, "r2")
        with pytest.raises(PrivacyError, match="delta"):
            secagg.create_round(srv.address, "r3", template=paths[0], clients=3, dp=DPConfig(1.0, 50.0, 1e-6, "local", 1))
    finally:
        srv.stop(grace=0)
    # The ledger survives a restart: the budget is the federation's, and cannot be changed.
    srv = secagg.serve(keypair.server, "127.0.0.1:0", state)
    try:
        assert secagg.round_status(srv.address, "r1").epsilon_spent == pytest.approx(one)
        with pytest.raises(PrivacyBudgetError):
            secagg.create_round(srv.address, "r2", template=paths[0], clients=3, dp=dp)
        # Enough noise fits in what is left.
        s = secagg.create_round(srv.address, "r2", template=paths[0], clients=3, dp=DPConfig(1.0, 5.0, 1e-5, "distributed", 3))
        assert one < s.epsilon_spent <= budget
    finally:
        srv.stop(grace=0)
    with pytest.raises(PrivacyError, match="cannot be changed"):
        secagg.serve(keypair.server, "127.0.0.1:0", state, epsilon_budget=budget * 2, delta=1e-5)


def test_dp_submission_errors(server, client_key, npz_models):
    paths, _ = _models(npz_models)
    dp = DPConfig(1.0, 1.0, 1e-5, "distributed", 3)
    secagg.create_round(server.address, "r1", template=paths[0], clients=3, dp=dp)
    with pytest.raises(PrivacyError, match="equal weights"):
        secagg.submit(server.address, "r1", client_key, "a", paths[0], weight=5.0)
    with pytest.raises(PrivacyError, match="its own DP settings"):
        secagg.submit(server.address, "r1", client_key, "a", paths[0], local_dp=DPConfig(1.0, 2.0, 1e-5, "local", 1))
    secagg.create_round(server.address, "r2", template=paths[0], clients=3)
    with pytest.raises(PrivacyError, match="local"):
        secagg.submit(server.address, "r2", client_key, "a", paths[0], local_dp=dp)
    with pytest.raises(PrivacyError, match="min-honest"):  # distributed noise counting on more sites than may close
        secagg.create_round(server.address, "r3", template=paths[0], clients=3, dp=DPConfig(1.0, 1.0, 1e-5, "distributed", 5))
    # Nothing was accepted by the refused submissions.
    assert secagg.round_status(server.address, "r1").submitted == 0


def test_cli_dp_round(cli, serve_process, keypair, npz_models):
    keydir = keypair.client.parent
    paths, _ = _models(npz_models)
    srv = serve_process(extra=("--epsilon-budget", "10", "--delta", "1e-5"))
    a = srv.address
    proc = cli("round", "create", "--server", a, "--round", "r1", "--clients", "3", "--template", str(paths[0]),
               "--clip-norm", "1", "--target-epsilon", "4")
    assert proc.returncode == 0, proc.stderr
    created = json.loads(proc.stdout)
    assert created["dp"]["mode"] == "distributed" and created["dp"]["min_honest"] == 3
    assert 3.99 <= created["epsilon_round"] <= 4.0 and created["epsilon_budget"] == 10
    for i in range(3):
        proc = cli("submit", "--server", a, "--round", "r1", "--key", str(keydir / "client.key"),
                   "--client-id", f"s{i}", "--model", str(paths[i]), "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["dp"]["clip_norm"] == 1.0
    status = json.loads(cli("round", "status", "--server", a, "--round", "r1").stdout)
    assert status["state"] == "closed" and status["epsilon_spent"] == pytest.approx(created["epsilon_round"])
    proc = cli("round", "create", "--server", a, "--round", "r2", "--clients", "3", "--template", str(paths[0]),
               "--clip-norm", "1", "--target-epsilon", "9.5")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "over its budget" in proc.stderr
    proc = cli("round", "create", "--server", a, "--round", "r3", "--clients", "3", "--template", str(paths[0]),
               "--noise-multiplier", "1")
    assert proc.returncode == 1 and "--clip-norm" in proc.stderr
