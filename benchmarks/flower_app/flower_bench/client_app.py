"""ClientApp of the benchmark: one app object that hands each message to the ClientApp of the run's
method (run config "method"), every one wrapped in the counting Mod.

* fedavg: Flower's Message API (@app.train);
* secaggplus: the legacy NumPyClient path that Flower's secaggplus_mod needs;
* secagg: @app.train and @app.query under secagg's own Mod (first of the secagg-side Mods), which
  decrypts the global before the handlers and encrypts the reply after them.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from flower_bench.task import BenchConfig, client_arrays, count_payload, max_abs_error, num_examples, weighted_mean


def _train_reply(msg: Message, context: Context) -> Message:
    cfg = BenchConfig.from_context(context)
    server_round = int(msg.content["config"]["server-round"])
    arrays = client_arrays(context.node_id, server_round, cfg.num_params, cfg.num_tensors)
    metrics = MetricRecord({"num-examples": num_examples(context.node_id)})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


def _fedavg_app() -> ClientApp:
    app = ClientApp(mods=[count_payload])
    app.train()(_train_reply)
    return app


class _LegacyClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.node_id = context.node_id
        self.cfg = BenchConfig.from_context(context)

    def fit(self, parameters, config):  # noqa: ANN001, ANN201 (NumPyClient's signature)
        server_round = int(config["server-round"])
        arrays = client_arrays(self.node_id, server_round, self.cfg.num_params, self.cfg.num_tensors)
        return arrays, num_examples(self.node_id), {}


def _secaggplus_app() -> ClientApp:
    return ClientApp(client_fn=lambda context: _LegacyClient(context).to_client(),
                     mods=[count_payload, secaggplus_mod])


def _query_reply(msg: Message, context: Context) -> Message:
    """secagg: the error of the decrypted global against the plaintext weighted mean of the nodes
    the server names (the contributors of the last round)."""
    cfg = BenchConfig.from_context(context)
    query = msg.content["config"]
    node_ids = [int(n) for n in query["reference-nodes"]]
    server_round = int(query["reference-round"])
    got = msg.content["arrays"].to_numpy_ndarrays()
    want = weighted_mean(node_ids, server_round, cfg.num_params, cfg.num_tensors)
    error = max_abs_error(got, want)
    return Message(RecordDict({"metrics": MetricRecord({"max-error": error})}), reply_to=msg)


def _secagg_app() -> ClientApp:
    from secagg.flower import secagg_mod  # only the secagg runs need TenSEAL

    app = ClientApp(mods=[count_payload, secagg_mod])
    app.train()(_train_reply)
    app.query()(_query_reply)
    return app


_BUILDERS = {"fedavg": _fedavg_app, "secaggplus": _secaggplus_app, "secagg": _secagg_app}


class _ClientAppByMethod(ClientApp):
    """The ClientApp Flower loads: builds the method's app on first use and delegates to it."""

    def __init__(self) -> None:
        super().__init__()
        self._apps: dict[str, ClientApp] = {}

    def __call__(self, message: Message, context: Context) -> Message:
        method = BenchConfig.from_context(context).method
        if method not in self._apps:
            self._apps[method] = _BUILDERS[method]()
        return self._apps[method](message, context)


app = _ClientAppByMethod()
