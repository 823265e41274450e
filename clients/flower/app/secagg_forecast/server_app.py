"""The ServerApp: federated averaging of the sites' forecasters, encrypted end to end.

``EncryptedFedAvg`` holds only secagg's ``server.key`` (no secret key): it adds the sites'
encrypted updates and sends the encrypted sum back, so the global model exists in the clear only
at the sites. After the last round it asks every site (a QUERY message carrying the final
encrypted global) for its validation loss and, in the demo, for ``max-error`` against the
plaintext reference (see ``client_app.py``). The result is written as JSON to ``result-path``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from secagg.flower import EncryptedFedAvg
from secagg_forecast import task

app = ServerApp()



class _StdoutHandler(logging.Handler):
    """Writes to whatever ``sys.stdout`` is at the time: Flower redirects it into the run's log stream."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)


# secagg logs each round (closed with how many updates, or why it failed) through the standard
# logging module, which Flower does not configure; show those lines in the run's log stream.
_secagg_log = logging.getLogger("secagg")
if not any(isinstance(h, _StdoutHandler) for h in _secagg_log.handlers):
    _handler = _StdoutHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)-8s: %(name)s: %(message)s"))
    _secagg_log.addHandler(_handler)
    _secagg_log.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` encrypted rounds, query the sites, write ``result-path``."""
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    strategy = EncryptedFedAvg(
        server_key=str(cfg["secagg-server-key"]),
        state_dir=str(cfg["secagg-state-dir"]),
        min_train_nodes=int(cfg["min-nodes"]),
        max_weight=float(cfg["max-weight"]),
        value_bound=float(cfg["value-bound"]),
    )
    initial = ArrayRecord(task.initial_model(int(cfg["seed"])).state_dict())
    train_config = ConfigRecord({"lr": float(cfg["lr"]), "local-epochs": int(cfg["local-epochs"]),
                                 "batch-size": int(cfg["batch-size"])})
    started = time.monotonic()
    result = strategy.start(grid, initial_arrays=initial, num_rounds=num_rounds, timeout=float(cfg["round-timeout"]),
                            train_config=train_config)
    history = [dict(entry) for entry in strategy.history]
    # The global the sites hold is the last closed round's average (a failed round keeps the previous one).
    closed = [int(h["round"]) for h in history if h.get("state") == "closed"]
    query_config = ConfigRecord({"reference-round": closed[-1]}) if closed else ConfigRecord({})
    replies = strategy.query(grid, result.arrays, query_config)
    sites = {str(node_id): dict(metrics) for node_id, metrics in replies.items()}
    errors = [float(m["max-error"]) for m in sites.values() if "max-error" in m]
    summary = {
        "rounds": num_rounds,
        "closed-rounds": closed,
        "history": history,
        "train-metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "sites": sites,
        "max-error": max(errors) if errors else None,
        "seconds": time.monotonic() - started,
    }
    print(json.dumps(summary, default=str))
    if cfg["result-path"]:
        _write_json(Path(str(cfg["result-path"])), summary)


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
