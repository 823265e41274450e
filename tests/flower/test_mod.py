"""secagg_mod at a site: what it lets through, what it refuses, and that it composes with Flower's own mods."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod

from secagg.flower import EncryptedFedAvg, SecAggMod, secagg_mod
from secagg.privacy.mechanism import DPConfig
from secagg.site_policy import SitePolicy
from tests.flower.loopback_grid import LoopbackGrid
from tests.flower.sites import NODES, SHAPES, initial, make_app, weighted_mean


def start(keypair, tmp_path, apps, node_configs=None, rounds=1, **kw):
    grid = LoopbackGrid(apps, node_configs=node_configs or {n: {"secagg-key": str(keypair.client)} for n in apps})
    s = EncryptedFedAvg(keypair.server, tmp_path / "state", max_weight=200, value_bound=10.0, poll_interval=0.01, **kw)
    result = s.start(grid, ArrayRecord({k: Array(v) for k, v in initial().items()}), num_rounds=rounds, timeout=60)
    return s, grid, result


def test_messages_without_secagg_terms_pass_through_untouched():
    seen = {}
    app = ClientApp(mods=[secagg_mod])  # no key anywhere: it is not needed for a plain message

    @app.train()
    def train(msg, context):
        seen["arrays"] = msg.content["arrays"]
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 5})}),
                       reply_to=msg)

    LoopbackGrid({1: app})  # sets Flower's task identity for Message()
    arrays = ArrayRecord({k: Array(v) for k, v in initial().items()})
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                  message_type=MessageType.TRAIN, ttl=60)
    msg.metadata.__dict__["_message_id"] = "m"
    reply = app(msg, Context(7, 1, {}, RecordDict(), {}))
    assert seen["arrays"] is arrays
    assert reply.content["metrics"]["num-examples"] == 5
    assert np.array_equal(reply.content["arrays"]["lstm/bias"].numpy(), initial()["lstm/bias"])


def test_a_site_without_a_key_or_with_another_federations_key_is_refused_with_a_clear_reason(
        keypair, other_keypair, tmp_path):
    sent, seen = {}, {}
    apps = {n: make_app(n, sent, seen) for n in (*NODES, 14)}
    configs = {n: {"secagg-key": str(keypair.client)} for n in NODES}
    configs[14] = {}
    s, grid, _ = start(keypair, tmp_path, apps, configs, min_train_nodes=4, min_available_nodes=4, min_clients=3)
    (node, reason), = s.history[0]["refused"]
    assert node == 14 and "secagg-key" in reason and "--node-config" in reason
    assert s.history[0]["state"] == "closed" and s.history[0]["accepted"] == 3

    configs[14] = {"secagg-key": str(other_keypair.client)}
    s, grid, _ = start(keypair, tmp_path / "b", apps, configs, min_train_nodes=4, min_available_nodes=4,
                       min_clients=3)
    (node, reason), = s.history[0]["refused"]
    assert node == 14 and "KeyFileError" in reason and "same 'secagg keygen'" in reason
    assert (14, 1) not in seen, "the site trained for a round whose key it does not hold"


def test_a_reply_without_its_sample_weight_is_refused(keypair, tmp_path):
    sent, seen = {}, {}
    apps = {n: make_app(n, sent, seen, weight_key="examples" if n == 13 else "num-examples") for n in NODES}
    s, grid, _ = start(keypair, tmp_path, apps, min_clients=2, min_cohort=2)
    (node, reason), = s.history[0]["refused"]
    assert node == 13 and "'num-examples'" in reason


def test_the_site_policy_refuses_a_round_before_the_site_trains(keypair, tmp_path):
    sent, seen = {}, {}
    strict = SecAggMod(policy=SitePolicy(require_dp=True))
    apps = {n: make_app(n, sent, seen, mods=[strict] if n == 13 else None) for n in NODES}
    s, grid, _ = start(keypair, tmp_path, apps, min_clients=2, min_cohort=2)
    (node, reason), = s.history[0]["refused"]
    assert node == 13 and "PrivacyError" in reason
    assert (13, 1) not in seen and (11, 1) in seen


def test_a_dp_round_averages_with_equal_weights_whatever_the_sites_report(keypair, tmp_path):
    sent, seen = {}, {}
    apps = {n: make_app(n, sent, seen) for n in NODES}
    tiny_noise = DPConfig(clip_norm=10.0, noise_multiplier=1e-6, delta=1e-5, mode="distributed", min_honest=3)
    s, grid, result = start(keypair, tmp_path, apps, dp=tiny_noise)
    s.query(grid, result.arrays)
    for k in SHAPES:
        unweighted = sum(sent[(n, 1)][0][k].astype(np.float64) for n in NODES) / 3
        assert np.abs(seen[(11, "query")][k] - unweighted).max() <= 1e-4
        assert np.abs(unweighted - weighted_mean(sent, 1)[k]).max() > 1e-3  # the test can tell them apart


def test_flowers_local_dp_mod_runs_inside_on_plaintext(keypair, tmp_path):
    sent, seen = {}, {}
    local = LocalDpMod(clipping_norm=1e3, sensitivity=1.0, epsilon=1e6, delta=1e-5)  # noise ~5e-6
    apps = {n: make_app(n, sent, seen, mods=[secagg_mod, local]) for n in NODES}
    s, grid, result = start(keypair, tmp_path, apps)
    assert s.history[0]["state"] == "closed" and s.history[0]["accepted"] == 3
    s.query(grid, result.arrays)
    want = weighted_mean(sent, 1)
    diff = max(np.abs(seen[(11, "query")][k] - want[k]).max() for k in SHAPES)
    assert 1e-7 < diff < 1e-3  # LocalDpMod's noise went in, under the encryption


@pytest.mark.parametrize("field", ["round-status", "format"])
def test_terms_the_mod_cannot_read_stop_the_users_code(keypair, tmp_path, field):
    sent, seen = {}, {}
    apps = {n: make_app(n, sent, seen) for n in NODES}
    s, grid, result = start(keypair, tmp_path, apps)
    msg = s._messages([11], result.arrays, ConfigRecord(), MessageType.QUERY, "q")[0]
    terms = msg.content.config_records["secagg"]
    if field == "format":
        terms["format"] = 1
    else:
        terms["round-status"] = b"\x08\x01garbage"
    msg.metadata.__dict__["_message_id"] = "q1"
    seen.clear()
    with pytest.raises(Exception, match="secagg"):
        apps[11](msg, grid.contexts[11])
    assert not seen


def test_a_plaintext_model_after_an_encrypted_one_is_refused(keypair, tmp_path):
    """A deviating ServerApp that sends a model of its own choosing once the sites run on encrypted sums."""
    sent, seen = {}, {}
    apps = {n: make_app(n, sent, seen) for n in NODES}
    s, grid, result = start(keypair, tmp_path, apps, rounds=2)
    s._global = None  # the ServerApp "forgets" the encrypted global model: plaintext arrays of its choosing
    forged = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in initial().items()})
    msg = s.configure_train(3, forged, ConfigRecord(), grid)[0]
    msg.metadata.__dict__["_message_id"] = "t3"
    seen.clear()
    with pytest.raises(Exception, match="plaintext model after"):
        apps[msg.metadata.dst_node_id](msg, grid.contexts[msg.metadata.dst_node_id])
    assert not seen
