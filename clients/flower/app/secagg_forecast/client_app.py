"""The sites' ClientApp: train the forecaster on this site's sensor; secagg encrypts the update.

``secagg_mod`` is the first (outermost) mod: it decrypts the global model before ``train`` and
``query`` see it, and encrypts ``train``'s reply (its ``"arrays"``, weighted by the metric
``"num-examples"``, which it removes from the metrics) before the reply leaves the site. The
functions below are ordinary Flower code.

The site's key: in a deployment, the SuperNode's ``--node-config 'secagg-key="/path/client.key"'``;
in simulation (whose nodes have no node config of their own), the run config's ``secagg-key``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from secagg.flower import secagg_mod
from secagg_forecast import task

app = ClientApp(mods=[secagg_mod])


def _site(context: Context) -> task.SiteData:
    partition_id = int(context.node_config.get("partition-id", 0))
    return task.load_site(partition_id, int(context.run_config["train-windows"]))


def _model(arrays: ArrayRecord) -> task.Forecaster:
    model = task.Forecaster()
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: start from the (decrypted) global model, train, reply with the new weights."""
    config = msg.content["config"]
    server_round = int(config["server-round"])
    data = _site(context)
    model = _model(msg.content["arrays"])
    loss = task.train(model, data, epochs=int(config["local-epochs"]), lr=float(config["lr"]),
                      batch_size=int(config["batch-size"]), seed=server_round * 1000 + context.node_id % 1000)
    arrays = ArrayRecord(model.state_dict())
    _write_reference(context, server_round, arrays, len(data.x_train))
    metrics = MetricRecord({"num-examples": len(data.x_train), "train-loss": loss})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """After the last round: the site's validation loss of the (decrypted) global model, and
    ``max-error``, its largest distance to the plaintext weighted mean of the updates that
    round ``reference-round`` averaged (the demo's check that encryption changed nothing)."""
    arrays = msg.content["arrays"]
    metrics: dict[str, float | int] = {"val-loss": task.evaluate(_model(arrays), _site(context))}
    config = msg.content["config"]
    if "reference-round" in config and context.run_config.get("reference-dir"):
        reference, count = _reference_mean(context, int(config["reference-round"]))
        got = arrays.to_numpy_ndarrays()
        metrics["max-error"] = max(float(np.max(np.abs(g.astype(np.float64) - r)))
                                   for g, r in zip(got, reference, strict=True))
        metrics["reference-updates"] = count
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# ── the demo's plaintext reference ───────────────────────────────────────────────────────────
# DEMO ONLY. To show that the encrypted average equals the plaintext one, every site also writes
# its update in the clear to the run config's ``reference-dir``, and each site's query reads all
# of them back. That works only because the demo's sites share one disk (simulation, or
# SuperNodes on one machine); it is exactly what secagg exists to avoid, so a real site must not.


def _write_reference(context: Context, server_round: int, arrays: ArrayRecord, num_examples: int) -> None:
    reference_dir = str(context.run_config.get("reference-dir", ""))
    if not reference_dir:
        return
    round_dir = Path(reference_dir) / f"round-{server_round}"
    round_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"t{i:03d}": a.astype(np.float64) for i, a in enumerate(arrays.to_numpy_ndarrays())}
    path = round_dir / f"node-{context.node_id}.npz"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, num_examples=np.float64(num_examples), **tensors)
    os.replace(tmp, path)  # readers never see half a file


def _reference_mean(context: Context, server_round: int) -> tuple[list[np.ndarray], int]:
    """The weighted mean (by num-examples) of the updates written for ``server_round``."""
    round_dir = Path(str(context.run_config["reference-dir"])) / f"round-{server_round}"
    total: list[np.ndarray] | None = None
    weight_sum = 0.0
    paths = sorted(round_dir.glob("node-*.npz"))
    if not paths:
        raise FileNotFoundError(f"no reference updates in {round_dir}")
    for path in paths:
        with np.load(path) as z:
            weight = float(z["num_examples"])
            tensors = [z[name] for name in sorted(n for n in z.files if n != "num_examples")]
        weighted = [weight * t for t in tensors]
        total = weighted if total is None else [a + b for a, b in zip(total, weighted, strict=True)]
        weight_sum += weight
    assert total is not None
    return [t / weight_sum for t in total], len(paths)
