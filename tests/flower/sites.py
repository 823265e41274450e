"""Sites for the Flower tests: real ClientApps whose train step is known, so the expected mean is too."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from secagg.flower import SecAggMod

NODES = (11, 12, 13)
SHAPES = {"lstm/kernel": (6, 8), "lstm/bias": (8,), "dense/kernel": (8, 1)}


def initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def make_app(node: int, sent: dict, seen: dict, *, weight_key="num-examples", mods=None) -> ClientApp:
    """A site that 'trains' by adding its own step to the global model it receives, and reports what it sent."""
    app = ClientApp(mods=mods if mods is not None else [SecAggMod(min_cohort=3)])

    @app.train()
    def train(msg: Message, context) -> Message:
        arrays = msg.content["arrays"]
        r = msg.content["config"]["server-round"]
        seen[(node, r)] = {k: a.numpy().copy() for k, a in arrays.items()}
        rng = np.random.default_rng(node * 100 + r)
        new = {k: (a.numpy() + rng.normal(scale=0.1, size=a.shape)).astype(np.float32) for k, a in arrays.items()}
        n = 10 * node
        sent[(node, r)] = (new, n)
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                                   "metrics": MetricRecord({weight_key: n, "train-loss": float(node)})}), reply_to=msg)

    @app.query()
    def query(msg: Message, context) -> Message:
        seen[(node, "query")] = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=msg)

    return app


def weighted_mean(sent: dict, r: int, nodes=NODES) -> dict[str, np.ndarray]:
    total = sum(sent[(n, r)][1] for n in nodes)
    return {k: sum(sent[(n, r)][0][k].astype(np.float64) * sent[(n, r)][1] for n in nodes) / total for k in SHAPES}


