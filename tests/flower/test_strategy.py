"""EncryptedFedAvg + secagg_mod with real ClientApps, real TenSEAL and secagg's real aggregator core.

The Grid is in-process (tests/flower/loopback_grid.py); the network path is tests/flower/test_deployment.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from secagg.errors import SecAggError
from secagg.flower import EncryptedFedAvg
from secagg.flower import wire
from tests.flower.loopback_grid import LoopbackGrid
from tests.flower.sites import NODES, SHAPES, initial, make_app, weighted_mean

@pytest.fixture
def federation(keypair):
    sent, seen = {}, {}
    apps = {n: make_app(n, sent, seen) for n in NODES}
    return apps, sent, seen, {"secagg-key": str(keypair.client)}


def strategy(keypair, tmp_path, **kw) -> EncryptedFedAvg:
    return EncryptedFedAvg(keypair.server, tmp_path / "state", max_weight=200, value_bound=10.0, poll_interval=0.01,
                           **kw)


def test_two_encrypted_rounds_give_the_weighted_mean_and_the_server_never_sees_weights(keypair, tmp_path, federation):
    apps, sent, seen, node_config = federation
    grid = LoopbackGrid(apps, node_configs={n: node_config for n in NODES})
    s = strategy(keypair, tmp_path)
    result = s.start(grid, ArrayRecord({k: Array(v) for k, v in initial().items()}), num_rounds=2, timeout=60,
                     train_config=ConfigRecord({"lr": 0.1}))
    # Round 2's sites trained from the decrypted round-1 mean; the query sees the decrypted round-2 mean.
    # At most one reply was alive at a time: the strategy pulls and feeds them one by one.
    assert grid.max_live == 1
    want1, want2 = weighted_mean(sent, 1), weighted_mean(sent, 2)
    for n in NODES:
        for k in SHAPES:
            assert np.abs(seen[(n, 2)][k] - want1[k]).max() <= 1e-6
    replies = s.query(grid, result.arrays)
    assert set(replies) == set(NODES)
    for n in NODES:
        for k in SHAPES:
            assert seen[(n, "query")][k].dtype == np.float32
            assert np.abs(seen[(n, "query")][k] - want2[k]).max() <= 1e-6
    # What the server holds is one opaque packed sum: no float array, no weight.
    assert list(result.arrays) == ["sum"] and result.arrays["sum"].stype == wire.AGGREGATE_STYPE
    assert [h["state"] for h in s.history] == ["closed", "closed"]
    assert [h["accepted"] for h in s.history] == [3, 3]
    assert result.train_metrics_clientapp[2]["train-loss"] == pytest.approx(12.0)
    assert "num-examples" not in result.train_metrics_clientapp[2]


def test_replies_carry_only_ciphertexts(keypair, tmp_path, federation):
    apps, sent, seen, node_config = federation
    captured = []

    def keep(node, reply):
        captured.append(reply.content)
        return reply

    grid = LoopbackGrid(apps, node_configs={n: node_config for n in NODES}, tamper=keep)
    strategy(keypair, tmp_path).start(grid, ArrayRecord({k: Array(v) for k, v in initial().items()}), num_rounds=1,
                                      timeout=60)
    assert len(captured) == 3
    for content in captured:
        assert list(content.array_records) == [wire.UPDATE]
        (array,) = content.array_records[wire.UPDATE].values()
        assert array.stype == wire.UPDATE_STYPE
        with pytest.raises(Exception):
            array.numpy()  # Flower refuses to read it as weights
        assert "num-examples" not in content.metric_records["metrics"]
    # The bytes of a site's float32 weights appear nowhere in what it sent.
    node, r = NODES[0], 1
    raw = sent[(node, r)][0]["lstm/kernel"].tobytes()
    assert all(raw not in c.array_records[wire.UPDATE]["update"].data for c in captured)


def test_a_silent_node_closes_the_round_at_its_deadline_with_the_others(keypair, tmp_path, keypair_nodes4):
    apps, sent, seen, node_config = keypair_nodes4
    now = [1000.0]
    grid = LoopbackGrid(apps, node_configs={n: node_config for n in apps}, silent={14})
    s = strategy(keypair, tmp_path, min_train_nodes=4, min_available_nodes=4, min_clients=3, clock=lambda: now[0])
    ticks = iter(range(10**6))
    grid_pull = grid.pull_messages

    def pull(ids):  # time passes while the strategy waits for the silent node
        next(ticks)
        now[0] += 5.0
        return grid_pull(ids)

    grid.pull_messages = pull
    result = s.start(grid, ArrayRecord({k: Array(v) for k, v in initial().items()}), num_rounds=1, timeout=60)
    assert s.history[0]["state"] == "closed" and s.history[0]["accepted"] == 3
    assert s.history[0]["sampled"] == 4
    assert s.query(grid, result.arrays, timeout=30)  # the three others can open it
    want = weighted_mean(sent, 1)
    for n in NODES:
        assert np.abs(seen[(n, "query")]["lstm/bias"] - want["lstm/bias"]).max() <= 1e-6


@pytest.fixture
def keypair_nodes4(keypair):
    sent, seen = {}, {}
    apps = {n: make_app(n, sent, seen) for n in (*NODES, 14)}
    return apps, sent, seen, {"secagg-key": str(keypair.client)}


def test_too_few_updates_fail_the_round_and_keep_the_previous_global_model(keypair, tmp_path, federation):
    apps, sent, seen, node_config = federation
    broken = {12, 13}
    grid = LoopbackGrid(apps, node_configs={n: node_config for n in NODES})
    pull = grid.pull_messages

    def pull_and_break(ids):
        out = []
        for reply in pull(ids):
            if s.history and reply.metadata.src_node_id in broken:  # round 2: two sites send no update
                reply.content = RecordDict({"metrics": MetricRecord({"x": 1})})
            out.append(reply)
        return out

    grid.pull_messages = pull_and_break
    s = strategy(keypair, tmp_path)
    result = s.start(grid, ArrayRecord({k: Array(v) for k, v in initial().items()}), num_rounds=2, timeout=60)
    assert [h["state"] for h in s.history] == ["closed", "failed"]
    assert "fewer than the minimum 3" in s.history[1]["reason"]
    assert len(s.history[1]["refused"]) == 2 and "no secagg update" in s.history[1]["refused"][0][1]
    grid.pull_messages = pull
    s.query(grid, result.arrays)
    want1 = weighted_mean(sent, 1)  # the global model is still round 1's
    assert np.abs(seen[(11, "query")]["dense/kernel"] - want1["dense/kernel"]).max() <= 1e-6


def test_an_update_that_claims_another_node_is_refused(keypair, tmp_path, federation):
    apps, sent, seen, node_config = federation

    def swap_sender(node, reply):
        if node == 13:
            reply.metadata.__dict__["_src_node_id"] = 12  # node 13's update arriving as node 12's
        return reply

    grid = LoopbackGrid(apps, node_configs={n: node_config for n in NODES}, tamper=swap_sender)
    s = strategy(keypair, tmp_path, min_clients=2, min_cohort=2)
    s.start(grid, ArrayRecord({k: Array(v) for k, v in initial().items()}), num_rounds=1, timeout=60)
    refused = s.history[0]["refused"]
    assert len(refused) == 1 and "came from node 12" in refused[0][1]
    assert s.history[0]["accepted"] == 2


def test_a_tampered_global_model_is_refused_before_the_users_code_runs(keypair, tmp_path, federation):
    apps, sent, seen, node_config = federation
    grid = LoopbackGrid(apps, node_configs={n: node_config for n in NODES})
    s = strategy(keypair, tmp_path)
    result = s.start(grid, ArrayRecord({k: Array(v) for k, v in initial().items()}), num_rounds=1, timeout=60)
    packed = result.arrays["sum"]
    data = bytearray(packed.data)
    data[len(data) // 2] ^= 0x01  # one bit of one summed polynomial
    forged = ArrayRecord({"sum": Array(dtype=packed.dtype, shape=packed.shape, stype=packed.stype, data=bytes(data))})
    seen.clear()
    errors = []
    apps_call = {n: apps[n] for n in NODES}
    for n in NODES:
        msg = s._messages([n], forged, ConfigRecord(), "query", "q")[0]
        msg.metadata.__dict__["_message_id"] = f"x{n}"
        with pytest.raises(SecAggError) as info:
            apps_call[n](msg, grid.contexts[n])
        errors.append(str(info.value))
    assert not seen, "the user's query function ran on a forged global model"
    assert all(errors)


def test_a_restarted_strategy_resumes_the_round_and_keeps_the_ledger(keypair, tmp_path, federation):
    from secagg.privacy.mechanism import DPConfig

    apps, sent, seen, node_config = federation
    dp = DPConfig(clip_norm=5.0, noise_multiplier=0.8, delta=1e-5, mode="distributed", min_honest=3)
    grid = LoopbackGrid(apps, node_configs={n: node_config for n in NODES})
    s = strategy(keypair, tmp_path, dp=dp, epsilon_budget=50.0, delta=1e-5)
    s.start(grid, ArrayRecord({k: Array(v) for k, v in initial().items()}), num_rounds=1, timeout=60)
    spent = s.core.status("flwr-7-1").epsilon_spent
    assert spent > 0
    # A new ServerApp process on the same state dir: the ledger remembers what round 1 cost.
    again = strategy(keypair, tmp_path, dp=dp, epsilon_budget=50.0, delta=1e-5)
    assert again.core.status("flwr-7-1").epsilon_spent == pytest.approx(spent)
    assert again.core.status("flwr-7-1").state == "closed"
