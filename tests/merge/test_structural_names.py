"""Merging sites whose layers are named differently (Keras numbers them ``lstm``, ``lstm_1``, ...).

Sites match by structure (``secagg.packing``): every site gets each average under its own tensor
names, an existing step round is checked by structure, and a real difference is named on both sides.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

import secagg
from secagg.errors import ModelFormatError, SecAggError
from secagg.merge.protocol import Exchange, Federation
from secagg.merge.remote import run_protocol

LAYOUT = {"lstm/kernel": (4, 8), "lstm/bias": (8,), "dense/kernel": (8, 1)}


def _site_tensors(rng, prefix: str) -> dict[str, np.ndarray]:
    return {name.replace("lstm", f"lstm{prefix}").replace("dense", f"dense{prefix}"):
            rng.standard_normal(shape).astype(np.float32) for name, shape in LAYOUT.items()}


def _one_exchange(tensors, weight):
    """A protocol that contributes ``tensors`` once and returns the average it receives."""
    average = yield Exchange("mean", tensors, weight, privacy="weights")
    return average


def test_every_site_gets_the_average_under_its_own_names(tmp_path):
    rng = np.random.default_rng(1)
    sites = {"a": _site_tensors(rng, ""), "b": _site_tensors(rng, "_1"), "c": _site_tensors(rng, "_2")}
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    with Federation(tmp_path / "federation") as federation:
        results = federation.run({s: _one_exchange(t, weights[s]) for s, t in sites.items()})
    total = sum(weights.values())
    expected = [sum(weights[s] * list(sites[s].values())[k].astype(np.float64) for s in sites) / total
                for k in range(len(LAYOUT))]
    for site, tensors in sites.items():
        assert list(results[site]) == list(tensors)  # lstm_1/kernel for b, lstm_2/kernel for c, ...
        for got, want in zip(results[site].values(), expected):
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_existing_step_round_is_checked_by_structure(tmp_path):
    paths = secagg.keygen(tmp_path / "keys")
    key = secagg.load_client_key(paths.client)
    server = secagg.serve(paths.server, "127.0.0.1:0", tmp_path / "state", min_cohort=1)
    rng = np.random.default_rng(2)
    sites = [_site_tensors(rng, ""), _site_tensors(rng, "_1")]
    results: dict[int, object] = {}
    errors: list[Exception] = []

    def site(i: int) -> None:
        try:
            # Two sites: this test is about names, so the sites' own minimum cohort is lowered to 2.
            results[i] = run_protocol(server.address, "m1", key, f"site{i}", _one_exchange(sites[i], 1.0), 2, wait=60,
                                      min_cohort=2)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    try:
        # Whichever site creates the step's round, the other finds it and accepts it: names differ, structure agrees.
        threads = [threading.Thread(target=site, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        for i in range(2):
            assert list(results[i]) == list(sites[i])
        # A site whose model has another size finds the round, is told what differs and what to do.
        secagg.create_round(server.address, "m2.0.mean", template=sites[0], clients=2, value_bound=100.0,
                            max_weight=1e5)
        wider = dict(sites[1], **{"lstm_1/bias": np.zeros(16, np.float32)})
        with pytest.raises(SecAggError) as info:
            run_protocol(server.address, "m2", key, "site1", _one_exchange(wider, 1.0), 2, wait=5, min_cohort=2)
        message = str(info.value)
        assert ("round 'm2.0.mean' exists but does not match this step: its exchange differs at tensor 2 of 3: the "
                "round has 'lstm/bias' (8,) float32, this site has 'lstm_1/bias' (16,) float32") in message
        assert "cancel it ('secagg round cancel') or start again with a new --round" in message
        with pytest.raises(SecAggError, match=r"it expects 2 sites, this site runs with --clients 3"):
            run_protocol(server.address, "m2", key, "site1", _one_exchange(sites[1], 1.0), 3, wait=5)
    finally:
        server.stop(0)


def test_simulate_checks_architectures_by_structure():
    from secagg.merge.simulate import _check_same_architecture

    rng = np.random.default_rng(3)

    def state(tensors):
        return types.SimpleNamespace(network=types.SimpleNamespace(to_tensors=lambda: tensors),
                                     x=np.zeros((2, 5, 1)))

    a, b = _site_tensors(rng, ""), _site_tensors(rng, "_1")
    paths = ["site0.keras", "site1.keras"]
    _check_same_architecture([state(a), state(b)], paths)  # only the names differ
    other = dict(b, **{"dense_1/kernel": np.zeros((8, 2), np.float32)})
    with pytest.raises(ModelFormatError) as info:
        _check_same_architecture([state(a), state(other)], paths)
    assert str(info.value) == (
        "site1.keras does not match site0.keras at tensor 3 of 3: site0.keras has 'dense/kernel' (8, 1) float32, "
        "site1.keras has 'dense_1/kernel' (8, 2) float32. Names may differ; the layers must be the same kinds and "
        "sizes in the same order: build every site's model with the same code")
    assert "fixed names" not in str(info.value)
