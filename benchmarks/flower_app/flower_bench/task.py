"""What every side of the benchmark app shares: the run config, the clients' arrays and the
plaintext reference.

A client's arrays depend only on its node id and the round, and its sample count only on its node
id, so whoever knows which nodes contributed to a round (the ServerApp for FedAvg and SecAgg+, any
client for secagg's decrypted global) can compute the exact weighted mean without seeing an update.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

METHODS = ("fedavg", "secaggplus", "secagg")
VALUE_STD = 0.05  # client values ~ N(0, 0.05): far inside SecAgg+'s clipping range of 8


@dataclass(frozen=True)
class BenchConfig:
    """The run config of the app ([tool.flwr.app.config] in pyproject.toml)."""

    method: str
    num_params: int
    num_tensors: int
    num_rounds: int
    min_nodes: int
    max_weight: float
    value_bound: float
    poll_interval: float
    timeout: float
    secagg_key: str
    secagg_server_key: str
    secagg_state_dir: str
    result_path: str
    stats_dir: str

    @classmethod
    def from_context(cls, context: Context) -> "BenchConfig":
        cfg = context.run_config
        method = str(cfg["method"])
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        return cls(
            method=method,
            num_params=int(cfg["num-params"]),
            num_tensors=int(cfg["num-tensors"]),
            num_rounds=int(cfg["num-server-rounds"]),
            min_nodes=int(cfg["min-nodes"]),
            max_weight=float(cfg["max-weight"]),
            value_bound=float(cfg["value-bound"]),
            poll_interval=float(cfg["poll-interval"]),
            timeout=float(cfg["timeout"]),
            secagg_key=str(cfg["secagg-key"]),
            secagg_server_key=str(cfg["secagg-server-key"]),
            secagg_state_dir=str(cfg["secagg-state-dir"]),
            result_path=str(cfg["result-path"]),
            stats_dir=str(cfg["stats-dir"]),
        )


def tensor_sizes(num_params: int, num_tensors: int) -> list[int]:
    """num_params split into num_tensors flat tensors (the first ones take the remainder)."""
    base, extra = divmod(num_params, num_tensors)
    return [base + (1 if i < extra else 0) for i in range(num_tensors)]


def initial_arrays(num_params: int, num_tensors: int) -> list[np.ndarray]:
    return [np.zeros(n, dtype=np.float32) for n in tensor_sizes(num_params, num_tensors)]


def num_examples(node_id: int) -> int:
    """The client's sample count, its weight: 100..1000, fixed by its node id."""
    return 100 + node_id % 901


def client_arrays(node_id: int, server_round: int, num_params: int, num_tensors: int) -> list[np.ndarray]:
    """The client's float32 update for a round, fixed by node id and round."""
    rng = np.random.default_rng([node_id, server_round])
    return [
        rng.normal(0.0, VALUE_STD, size=n).astype(np.float32)
        for n in tensor_sizes(num_params, num_tensors)
    ]


def weighted_mean(node_ids: list[int], server_round: int, num_params: int, num_tensors: int) -> list[np.ndarray]:
    """The float64 weighted mean of these nodes' arrays for the round, weights = num_examples."""
    total = [np.zeros(n, dtype=np.float64) for n in tensor_sizes(num_params, num_tensors)]
    weight = 0
    for node_id in node_ids:
        w = num_examples(node_id)
        weight += w
        for acc, arr in zip(total, client_arrays(node_id, server_round, num_params, num_tensors)):
            acc += w * arr.astype(np.float64)
    return [acc / weight for acc in total]


def max_abs_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    if len(got) != len(want):
        raise ValueError(f"the global has {len(got)} tensors, the reference {len(want)}")
    return max(
        float(np.max(np.abs(np.asarray(g, dtype=np.float64).reshape(-1) - w.reshape(-1))))
        for g, w in zip(got, want)
    )


def payload_bytes(content: RecordDict) -> int:
    """Bytes of payload in a message: every Array's data plus every bytes value of a ConfigRecord."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


def round_key(msg: Message) -> str:
    """The round a message belongs to: its group id (SecAgg+, secagg) or, where Flower leaves that
    empty (the Message API's FedAvg), the "server-round" of its "config" record."""
    if msg.metadata.group_id:
        return msg.metadata.group_id
    config = msg.content.config_records.get("config") if msg.has_content() else None
    return str(config.get("server-round", "")) if config is not None else ""


def _stage(msg: Message) -> str:
    """SecAgg+'s stage of a TRAIN message ("" for any other message)."""
    configs = msg.content.config_records.get("secaggplus_configs") if msg.has_content() else None
    return str(configs.get("stage", "")) if configs is not None else ""


def count_payload(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost client Mod: counts the payload bytes down (the message as it arrives) and up (the
    reply as it leaves, after every inner Mod), the message's delivery time and the handler's wall
    and CPU time; appends one JSON line per message to stats-dir/<node id>.jsonl."""
    arrived = time.time()
    line = {
        "node_id": context.node_id,
        "method": str(context.run_config.get("method", "")),
        "message_type": msg.metadata.message_type,
        "round_key": round_key(msg),
        "stage": _stage(msg),  # before call_next: secaggplus_mod pops it
        "bytes_down": payload_bytes(msg.content) if msg.has_content() else 0,
        # from the ServerApp creating the message to this Mod getting it: Flower's polling and the
        # start of a new ClientApp process (one per message in Flower 1.42)
        "delivery_s": arrived - msg.metadata.created_at,
    }
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # noted, then Flower turns it into an error reply
        line["error"] = f"{type(exc).__name__}: {exc}"
        raise
    else:
        line["bytes_up"] = payload_bytes(reply.content) if reply.has_content() else 0
        line["error"] = reply.error.reason if reply.has_error() else ""
    finally:
        line["handler_wall_s"] = time.perf_counter() - wall0
        line["handler_cpu_s"] = time.process_time() - cpu0
        line.setdefault("bytes_up", 0)
        line["unix"] = time.time()
        stats_dir = str(context.run_config.get("stats-dir", ""))
        if stats_dir:
            with open(Path(stats_dir) / f"{context.node_id}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")  # one short append per message
    return reply
