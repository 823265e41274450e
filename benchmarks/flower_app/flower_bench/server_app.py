"""ServerApp of the benchmark: runs the run's method over every connected node for
num-server-rounds rounds, times each round, checks the last global against the plaintext weighted
mean and writes a JSON result to result-path.

A round is timed by the ServerApp from the first TRAIN message of that round (group id) it pushes
to the first TRAIN message of the next round, the last one to the end of the method's run: Flower's
own polling, the ClientApps' start-up, the transfers and the server's aggregation all count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from flower_bench.task import BenchConfig, initial_arrays, max_abs_error, round_key, weighted_mean

app = ServerApp()


class TimedGrid(Grid):
    """A Grid that passes everything to Flower's and notes when each round's first TRAIN message
    leaves (wall and process CPU time) and which nodes replied to each round (rounds by
    task.round_key).

    Its send_and_receive is Flower's own loop (push, then pull every poll_interval seconds until
    every reply is in), so that the pushes it makes are seen too; 3 s is Flower's interval."""

    def __init__(self, grid: Grid, poll_interval: float) -> None:
        self._grid = grid
        self._poll_interval = poll_interval
        self.round_starts: list[tuple[str, float, float]] = []  # (round key, wall, cpu)
        self.repliers: dict[str, set[int]] = {}
        self.pushed: dict[str, int] = {}
        self._round_of: dict[str, str] = {}  # TRAIN message id -> round key

    def set_run(self, run) -> None:  # noqa: ANN001
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        keys = []
        for msg in messages:
            key = round_key(msg) if msg.metadata.message_type == MessageType.TRAIN else None
            keys.append(key)
            if key is not None:
                if not self.round_starts or self.round_starts[-1][0] != key:
                    self.round_starts.append((key, time.perf_counter(), time.process_time()))
                self.pushed[key] = self.pushed.get(key, 0) + 1
        ids = list(self._grid.push_messages(messages))
        for msg_id, key in zip(ids, keys):
            if key is not None and msg_id:
                self._round_of[msg_id] = key
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for msg in replies:
            key = self._round_of.get(msg.metadata.reply_to_message_id)
            if key is not None and msg.has_content():
                self.repliers.setdefault(key, set()).add(msg.metadata.src_node_id)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        msg_ids = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(msg_ids))
            replies.extend(got)
            msg_ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not msg_ids:
                break
            time.sleep(self._poll_interval)
        return replies

    def rounds(self, end_wall: float, end_cpu: float) -> list[dict]:
        out = []
        for i, (group, wall, cpu) in enumerate(self.round_starts):
            next_wall, next_cpu = (self.round_starts[i + 1][1:] if i + 1 < len(self.round_starts)
                                   else (end_wall, end_cpu))
            out.append({"round": i + 1, "round_key": group, "wall_s": next_wall - wall,
                        "server_cpu_s": next_cpu - cpu, "train_messages": self.pushed.get(group, 0),
                        "contributors": len(self.repliers.get(group, ()))})
        return out


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    end = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.time() > end:
            raise TimeoutError(f"only {len(nodes)} of {count} nodes connected within {timeout:.0f} s")
        time.sleep(0.5)


def _run_fedavg(grid: TimedGrid, cfg: BenchConfig) -> tuple[list, dict]:
    from flwr.serverapp.strategy import FedAvg

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.min_nodes,
                      min_available_nodes=cfg.min_nodes)
    result = strategy.start(grid, ArrayRecord(initial_arrays(cfg.num_params, cfg.num_tensors)),
                            num_rounds=cfg.num_rounds, timeout=cfg.timeout)
    return result.arrays.to_numpy_ndarrays(), {}


def _run_secaggplus(grid: TimedGrid, cfg: BenchConfig, context: Context) -> tuple[list, dict]:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.min_nodes,
        min_available_clients=cfg.min_nodes,
        initial_parameters=ndarrays_to_parameters(initial_arrays(cfg.num_params, cfg.num_tensors)),
        on_fit_config_fn=lambda server_round: {"server-round": server_round},
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_rounds),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=3, reconstruction_threshold=2, max_weight=cfg.max_weight, timeout=cfg.timeout))
    workflow(grid, legacy)
    final = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    return final, {}


def _run_secagg(grid: TimedGrid, cfg: BenchConfig) -> tuple[None, dict]:
    from secagg.flower import EncryptedFedAvg

    strategy = EncryptedFedAvg(cfg.secagg_server_key, cfg.secagg_state_dir, min_train_nodes=cfg.min_nodes,
                               min_available_nodes=cfg.min_nodes, max_weight=cfg.max_weight,
                               value_bound=cfg.value_bound, poll_interval=cfg.poll_interval)
    result = strategy.start(grid, ArrayRecord(initial_arrays(cfg.num_params, cfg.num_tensors)),
                            num_rounds=cfg.num_rounds, timeout=cfg.timeout)
    return None, {"strategy": strategy, "encrypted_global": result.arrays}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = BenchConfig.from_context(context)
    nodes = _wait_for_nodes(grid, cfg.min_nodes, cfg.timeout)
    timed = TimedGrid(grid, cfg.poll_interval)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if cfg.method == "fedavg":
        final, extra = _run_fedavg(timed, cfg)
    elif cfg.method == "secaggplus":
        final, extra = _run_secaggplus(timed, cfg, context)
    else:
        final, extra = _run_secagg(timed, cfg)
    wall1, cpu1 = time.perf_counter(), time.process_time()
    rounds = timed.rounds(wall1, cpu1)

    # The check, outside the timed rounds: the last global against the plaintext weighted mean of
    # the nodes that answered the last round's TRAIN messages (SecAgg+: any of its stages).
    last_group = rounds[-1]["round_key"] if rounds else ""
    contributors = sorted(timed.repliers.get(last_group, set()) or nodes)
    result: dict = {"method": cfg.method, "num_params": cfg.num_params, "num_tensors": cfg.num_tensors,
                    "num_rounds": cfg.num_rounds, "nodes": nodes, "poll_interval_s": cfg.poll_interval,
                    "max_weight": cfg.max_weight, "total_wall_s": wall1 - wall0,
                    "total_server_cpu_s": cpu1 - cpu0, "rounds": rounds,
                    "reference_nodes": contributors}
    if final is not None:
        want = weighted_mean(contributors, cfg.num_rounds, cfg.num_params, cfg.num_tensors)
        result["max_error"] = max_abs_error(final, want)
        result["global_dtypes"] = sorted({str(a.dtype) for a in final})
    else:
        # secagg: the server cannot decrypt; every node decrypts the global (query path) and reports.
        strategy = extra["strategy"]
        query = ConfigRecord({"reference-nodes": [str(n) for n in contributors],
                              "reference-round": cfg.num_rounds})
        replies = strategy.query(timed, extra["encrypted_global"], query)
        errors = {str(node): float(metrics["max-error"]) for node, metrics in replies.items()}
        result["query_errors"] = errors
        result["max_error"] = max(errors.values()) if len(errors) == len(nodes) else None
        result["strategy_history"] = strategy.history
    if cfg.result_path:
        Path(cfg.result_path).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
