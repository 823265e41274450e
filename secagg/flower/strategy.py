"""The server side of secagg inside Flower: a Strategy that hosts secagg's aggregator core.

:class:`EncryptedFedAvg` runs FedAvg rounds whose updates and global model stay encrypted end to
end. It holds only ``server.key`` (no secret key, no TenSEAL: this module imports neither), and the
aggregator core of secagg's own server (:class:`secagg.rounds.Aggregator`), so every round keeps its
durable write-ahead log (accepted updates are on disk before they count), quorum, deadline,
minimum cohort, enrollment and DP ledger. Per round it

1. samples nodes and creates a secagg round for exactly them (client ids ``node-<node id>``);
2. sends each a TRAIN message with the round's public terms, the training config and the current
   global model (encrypted after the first round; round 1 sends the public initial arrays);
3. pulls the replies one message id at a time and feeds each to the core as it arrives, so memory
   stays O(model) however many sites reply (Flower's ``send_and_receive`` would hold them all);
   a reply must come from the node its client id names;
4. closes the round when every node answered (with at least ``min_clients``) or at the deadline, and
   the encrypted sum becomes the next global model. A failed round keeps the previous one.

The server never sees an update, nor the sum: :attr:`Result.arrays` is the encrypted global model
(one packed Array), which only the sites can open (:mod:`secagg.flower.mod`). Metrics that sites
report in plaintext are averaged without weights (the sample weights are encrypted).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from secagg.errors import RoundExistsError, SecAggError
from secagg.flower import wire
from secagg.keys import ServerKey, load_server_key
from secagg.packing import ModelSpec
from secagg.privacy.mechanism import DPConfig
from secagg.rounds import (CLOSED, COLLECTING, DEFAULT_MAX_WEIGHT, DEFAULT_MIN_COHORT, DEFAULT_VALUE_BOUND, Aggregator,
                           RoundConfig, RoundStatus)

log = logging.getLogger("secagg.flower")
#: The entry of the global model's ArrayRecord that holds the packed encrypted sum.
SUM = "sum"


class EncryptedFedAvg(Strategy):
    """Federated averaging over secagg's encrypted sums (see the module docstring).

    ``server_key``/``state_dir``: as for ``secagg serve`` (a restart on the same state dir resumes a
    round that was collecting, and keeps the privacy ledger). ``fraction_train``/``min_train_nodes``/
    ``min_available_nodes``: which nodes a round asks, as in Flower's FedAvg. ``min_clients``: the
    quorum with which a round closes (default: every sampled node; never below ``min_cohort``).
    ``max_weight``: the largest sample weight a site may send (set it near the largest site's
    number of examples: the precision is ~1.5e-9 x max_weight / weight); ``value_bound``: the largest
    absolute parameter value. ``dp``: client-level DP for every round (sites clip and noise before
    encrypting; the ledger charges each round against ``epsilon_budget``). ``poll_interval``: seconds
    between pulls when no reply is waiting. ``clock``: injectable for tests of deadlines.
    """

    def __init__(self, server_key: str | os.PathLike | ServerKey, state_dir: str | os.PathLike, *,
                 fraction_train: float = 1.0, min_train_nodes: int = 3, min_available_nodes: int = 3,
                 fraction_evaluate: float = 0.0, min_evaluate_nodes: int = 3, min_clients: int | None = None,
                 min_cohort: int = DEFAULT_MIN_COHORT, max_weight: float = DEFAULT_MAX_WEIGHT,
                 value_bound: float = DEFAULT_VALUE_BOUND, dp: DPConfig | None = None,
                 epsilon_budget: float | None = None, delta: float | None = None, allow_non_dp: bool = False,
                 poll_interval: float = 0.2, clock: Callable[[], float] = time.time) -> None:
        key = server_key if isinstance(server_key, ServerKey) else load_server_key(server_key)
        if dp is not None:
            dp.validate()
        self.core = Aggregator(key, Path(state_dir), clock=clock, min_cohort=min_cohort,
                               epsilon_budget=epsilon_budget, delta=delta, allow_non_dp=allow_non_dp)
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_clients = min_clients
        self.max_weight = max_weight
        self.value_bound = value_bound
        self.dp = dp
        self.poll_interval = poll_interval
        self.clock = clock
        self.timeout = 3600.0
        #: One entry per round: round, round_id, state, accepted, sampled, reason, seconds, bytes_up, bytes_down.
        self.history: list[dict] = []
        self._spec: ModelSpec | None = None
        self._fixed = ArrayRecord()  # the initial values of tensors that are not aggregated (public)
        self._global: RoundStatus | None = None  # the closed round whose sum is the current global model
        self._rounds: dict[int, dict] = {}

    # -- Flower's Strategy interface ----------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Create the secagg round for the sampled nodes and one TRAIN message per node."""
        self._learn_spec(arrays)
        sample = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        nodes, _ = sample_nodes(grid, self.min_available_nodes, sample)
        status = self._create_round(grid.run.run_id, server_round, nodes)
        terms = wire.terms_record(status, self._spec, self._global)
        body = self._global_records(arrays)
        config = ConfigRecord({**dict(config), "server-round": server_round})
        down = _bytes(body) + len(terms["round-status"]) + len(terms.get("global-status", b""))
        self._rounds[server_round] = {"round": server_round, "round_id": status.round_id, "sampled": len(nodes),
                                      "start": time.perf_counter(), "bytes_up": 0, "bytes_down": down, "refused": [],
                                      "metrics": []}
        return [Message(RecordDict({wire.TERMS: terms, "config": config, **body}), dst_node_id=node,
                        message_type=MessageType.TRAIN, ttl=self.timeout, group_id=str(server_round))
                for node in nodes]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Feed every reply to the aggregator core as it comes; the encrypted sum once the round closes.

        ``replies`` may be a lazy iterable (:meth:`start` pulls one reply at a time); a list, as
        Flower's ``send_and_receive`` returns, works too but holds every update in memory at once.
        """
        info = self._rounds[server_round]
        round_id = info["round_id"]
        for reply in replies:
            self._accept(info, reply)
            del reply
        status = self.core.status(round_id)
        if status.state == COLLECTING:
            status = self.core.end_collection(round_id, "every sampled node answered or the wait ended")
        info.update(state=status.state, accepted=status.submitted, reason=status.reason,
                    seconds=time.perf_counter() - info.pop("start"))
        metrics = _mean_metrics(info.pop("metrics"))
        self.history.append(info)
        if status.state != CLOSED:
            log.warning("round %d (%s) failed: %s; the global model stays that of the previous round", server_round,
                        round_id, status.reason)
            return None, metrics
        aggregate = self.core.aggregate(round_id)
        self._global = status
        log.info("round %d (%s) closed with %d encrypted updates", server_round, round_id, status.submitted)
        return ArrayRecord({SUM: wire.pack_aggregate(aggregate)}), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """EVALUATE messages carrying the (encrypted) global model, which the sites' mod decrypts."""
        if self.fraction_evaluate <= 0.0:
            return []
        sample = max(int(len(list(grid.get_node_ids())) * self.fraction_evaluate), self.min_evaluate_nodes)
        nodes, _ = sample_nodes(grid, self.min_available_nodes, sample)
        return self._messages(nodes, arrays, ConfigRecord({**dict(config), "server-round": server_round}),
                              MessageType.EVALUATE, str(server_round))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The sites' evaluation metrics, averaged without weights."""
        return _mean_metrics([_metrics(r) for r in replies if not r.has_error()])

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info("EncryptedFedAvg: secagg rounds (state %s), quorum %s, min cohort %d, max weight %g, value bound %g, "
                 "DP %s", self.core.state_dir, self.min_clients or "all sampled", self.core.min_cohort,
                 self.max_weight, self.value_bound, self.dp.to_dict() if self.dp else "none")

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable | None = None) -> Result:
        """Run ``num_rounds`` encrypted FedAvg rounds; ``Result.arrays`` is the encrypted global model.

        ``timeout``: each round's deadline (and its messages' time to live). ``evaluate_fn`` cannot
        be given: the server cannot decrypt the global model (evaluate at the sites instead).
        """
        if evaluate_fn is not None:
            raise ValueError("EncryptedFedAvg cannot evaluate on the server: the server never sees the global model "
                             "in plaintext. Evaluate at the sites (fraction_evaluate > 0, the ClientApp's evaluate).")
        self.timeout = float(timeout)
        self.summary()
        arrays = initial_arrays
        result = Result(arrays=initial_arrays)
        for server_round in range(1, num_rounds + 1):
            messages = list(self.configure_train(server_round, arrays, train_config or ConfigRecord(), grid))
            round_id = self._rounds[server_round]["round_id"]
            replies = self._pull(grid, messages, lambda rid=round_id: self.core.status(rid).state != COLLECTING)
            new_arrays, metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            evaluate = list(self.configure_evaluate(server_round, arrays, evaluate_config or ConfigRecord(), grid))
            if evaluate:
                end = self.clock() + self.timeout
                metrics = self.aggregate_evaluate(server_round, self._pull(grid, evaluate, lambda: self.clock() > end))
                if metrics is not None:
                    result.evaluate_metrics_clientapp[server_round] = metrics
        return result

    def query(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord | None = None,
              timeout: float | None = None) -> dict[int, MetricRecord]:
        """Send the global model (e.g. ``Result.arrays``) to every node as a QUERY message; their replies' metrics.

        Sites receive it decrypted by their mod (e.g. to save the final model, or to report a check).
        """
        nodes = list(grid.get_node_ids())
        end = self.clock() + (self.timeout if timeout is None else timeout)
        replies = self._pull(grid, self._messages(nodes, arrays, config or ConfigRecord(), MessageType.QUERY, "query"),
                             lambda: self.clock() > end)
        out = {}
        for reply in replies:
            if reply.has_error():
                log.warning("node %d answered the query with an error: %s", reply.metadata.src_node_id,
                            reply.error.reason)
            else:
                out[reply.metadata.src_node_id] = _metrics(reply)
            del reply
        return out

    # -- one round --------------------------------------------------------------------------------

    def _learn_spec(self, arrays: ArrayRecord) -> None:
        if self._spec is not None:
            return
        if SUM in arrays and arrays[SUM].stype == wire.AGGREGATE_STYPE:
            raise SecAggError("the first round needs the initial model in plaintext (a common starting point that "
                              "every site may see), not an encrypted sum")
        tensors = {name: a.numpy() for name, a in arrays.items()}
        self._spec = ModelSpec.of(tensors)
        self._fixed = ArrayRecord({t.name: arrays[t.name] for t in self._spec.tensors if not t.aggregated})
        if self._spec.num_params == 0:
            raise SecAggError("the initial arrays hold no floating-point tensor to aggregate")

    def _create_round(self, run_id: int, server_round: int, nodes: list[int]) -> RoundStatus:
        round_id = f"flwr-{run_id}-{server_round}"
        quorum = len(nodes) if self.min_clients is None else min(self.min_clients, len(nodes))
        config = RoundConfig(round_id, self._spec, len(nodes), max(quorum, 1), self.clock() + self.timeout,
                             self.max_weight, self.value_bound, self.dp, tuple(f"node-{n}" for n in nodes))
        try:
            return self.core.create_round(config)
        except RoundExistsError:
            # A restarted ServerApp on the same state dir: the round's accepted updates are in its log.
            status = self.core.status(round_id)
            log.info("round %s exists (%s, %d accepted): resuming it", round_id, status.state, status.submitted)
            return status

    def _global_records(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        if SUM in arrays and arrays[SUM].stype == wire.AGGREGATE_STYPE:
            return {wire.GLOBAL: arrays, "arrays": self._fixed}
        return {"arrays": arrays}

    def _messages(self, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord, message_type: str,
                  group_id: str) -> list[Message]:
        body = self._global_records(arrays)
        if self._global is None:  # no encrypted global model yet: the plaintext initial arrays, no secagg terms
            return [Message(RecordDict({"config": config, **body}), dst_node_id=n, message_type=message_type,
                            ttl=self.timeout, group_id=group_id) for n in nodes]
        terms = wire.terms_record(self._global, self._spec, self._global)
        return [Message(RecordDict({wire.TERMS: terms, "config": config, **body}), dst_node_id=n,
                        message_type=message_type, ttl=self.timeout, group_id=group_id) for n in nodes]

    def _pull(self, grid: Grid, messages: list[Message], stop: Callable[[], bool]) -> Iterator[Message]:
        """The replies to ``messages``, one at a time as they arrive, until all came or ``stop()``."""
        ids = [i for i in grid.push_messages(messages) if i]
        if len(ids) < len(messages):
            log.warning("%d of %d messages could not be pushed to the SuperLink", len(messages) - len(ids),
                        len(messages))
        del messages
        outstanding = list(ids)
        while outstanding:
            arrived = False
            for message_id in list(outstanding):
                # One id per call: Flower inflates every reply of a call into one list.
                batch = list(grid.pull_messages([message_id]))
                if batch:
                    outstanding.remove(message_id)
                    arrived = True
                while batch:
                    reply = batch.pop()
                    yield reply
                    del reply  # hold no reply while pulling the next one
            if outstanding and stop():
                log.warning("%d node(s) did not answer in time", len(outstanding))
                return
            if not arrived:
                time.sleep(self.poll_interval)

    def _accept(self, info: dict, reply: Message) -> None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            info["refused"].append((node, f"error reply: {reply.error.reason}"))
            log.warning("node %d answered with an error: %s", node, reply.error.reason)
            return
        try:
            packed = reply.content.array_records.get(wire.UPDATE, ArrayRecord()).get("update")
            if packed is None:
                raise SecAggError("the reply carries no secagg update: does the ClientApp have mods=[secagg_mod]?")
            header, chunks = wire.read_update(packed)
            if header.client_id != f"node-{node}" or header.round_id != info["round_id"]:
                raise SecAggError(f"the update is for client {header.client_id!r} in round {header.round_id!r}, but came "
                                  f"from node {node} in round {info['round_id']!r}")
            self.core.submit(header, chunks)
            info["bytes_up"] = max(info["bytes_up"], len(packed.data))
            info["metrics"].append(_metrics(reply))
        except SecAggError as exc:
            info["refused"].append((node, str(exc)))
            log.warning("the update of node %d was refused: %s", node, exc)


def _metrics(reply: Message) -> MetricRecord:
    return reply.content.metric_records.get("metrics", MetricRecord())


def _mean_metrics(records: list[MetricRecord]) -> MetricRecord | None:
    """Unweighted mean of every scalar metric that all records carry (the sample weights are encrypted)."""
    if not records:
        return None
    names = set(records[0]).intersection(*records[1:])
    out = {}
    for name in sorted(names):
        values = [r[name] for r in records]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            out[name] = float(sum(values) / len(values))
    return MetricRecord(out)


def _bytes(records: dict[str, ArrayRecord]) -> int:
    return sum(len(a.data) for record in records.values() for a in record.values() if isinstance(a, Array))
