"""Flower's FedAvg, Flower's SecAgg+ and secagg inside Flower, one after the other on one deployment.

Run from the repository root (``make bench-flower``)::

    .venv/bin/python benchmarks/flower_compare.py                  # 1M float32 parameters, 5 clients, 3 rounds
    .venv/bin/python benchmarks/flower_compare.py --quick          # 10k parameters: a smoke run
    .venv/bin/python benchmarks/flower_compare.py --clients 3 --params 100k --methods fedavg,secagg

One real Flower 1.42 deployment on 127.0.0.1 (``clients/flower/loopback.py``: one SuperLink, K
SuperNodes, offline) runs the numpy-only app ``benchmarks/flower_app`` three times, once per method:

* ``fedavg``: Flower's FedAvg (``flwr.serverapp.strategy``), plaintext float32;
* ``secaggplus``: Flower's SecAgg+ (``SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)``
  in a ``DefaultWorkflow``, legacy FedAvg, client ``secaggplus_mod``);
* ``secagg``: ``secagg.flower.EncryptedFedAvg`` and ``secagg_mod`` (a fresh ``secagg keygen``).

Every client returns the same deterministic float32 arrays in every method (seeded by node id and
round, weight 100..1000 by node id), so the exact weighted mean is known. Per method it reports:

* **round wall time**, median over the rounds, timed by the ServerApp from the first TRAIN message
  of a round to the first of the next (the last: to the end of the strategy): Flower's polling
  (the SuperNodes pull every 3 s when idle; the ServerApp every ``--poll-interval`` s, the same for
  all methods), a new ClientApp process per message, transfers and aggregation all count;
* **server CPU** per round (the ServerApp process) and **client CPU** per round (inside the
  ClientApp's handler and Mods, per client, summed over a round's messages);
* **payload bytes per client per round**, up and down, counted by an outermost client Mod: every
  Array's data plus every bytes value of a ConfigRecord (the protocol's own framing is not counted).
  Down is shown for round 1 and for later rounds (secagg's first global is the public initial model);
* **max error** of the last round's global against the float64 weighted mean: FedAvg's and SecAgg+'s
  global on the server; secagg's decrypted by every client from a QUERY message (the server cannot).

Prints a table, writes ``benchmarks/results/flower.json`` (everything, every round and message)
and ``docs/results/flower.md``. Nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "flower"))

import secagg  # noqa: E402
from loopback import Loopback, LoopbackError  # noqa: E402

APP = HERE / "flower_app"
METHODS = ("fedavg", "secaggplus", "secagg")
LABELS = {"fedavg": "Flower FedAvg (plaintext)", "secaggplus": "Flower SecAgg+ (3 shares, t=2)",
          "secagg": "secagg in Flower (EncryptedFedAvg)"}
DEFAULT_OUT = HERE / "results" / "flower.json"
DEFAULT_MD = ROOT / "docs" / "results" / "flower.md"


def parse_size(text: str) -> int:
    """``1M``, ``10k``, ``2.5M`` or ``1000000``."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}
    text = text.strip().lower()
    if text and text[-1] in scale:
        return int(float(text[:-1]) * scale[text[-1]])
    return int(float(text))


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def read_stats(stats_dir: Path) -> list[dict]:
    lines = []
    for path in sorted(stats_dir.glob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines


def summarize(method: str, result: dict, stats: list[dict], num_params: int) -> dict:
    """One method's figures from the ServerApp's result and the clients' per-message lines."""
    rounds = result["rounds"]
    group_round = {r["round_key"]: r["round"] for r in rounds}
    per_client_round: dict[tuple[int, int], dict] = defaultdict(lambda: {"down": 0, "up": 0, "cpu": 0.0, "messages": 0})
    other = [s for s in stats if s["round_key"] not in group_round]
    errors = [s for s in stats if s["error"]]
    for s in stats:
        if s["round_key"] in group_round:
            entry = per_client_round[(s["node_id"], group_round[s["round_key"]])]
            entry["down"] += s["bytes_down"]
            entry["up"] += s["bytes_up"]
            entry["cpu"] += s["handler_cpu_s"]
            entry["messages"] += 1

    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    later = [v for (node, rnd), v in per_client_round.items() if rnd > 1]
    first = [v for (node, rnd), v in per_client_round.items() if rnd == 1]
    every = list(per_client_round.values())
    out = {
        "method": method,
        "label": LABELS[method],
        "round_wall_s": [r["wall_s"] for r in rounds],
        "round_wall_s_median": med([r["wall_s"] for r in rounds]),
        "server_cpu_s_median": med([r["server_cpu_s"] for r in rounds]),
        "client_cpu_s_median": med([v["cpu"] for v in every]),
        "messages_per_client_round": med([v["messages"] for v in every]),
        "delivery_s_median": med([s["delivery_s"] for s in stats if s["round_key"] in group_round]),
        "contributors_per_round": [r["contributors"] for r in rounds],
        "bytes_up_median": med([v["up"] for v in every]),
        "bytes_down_round1_median": med([v["down"] for v in first]),
        "bytes_down_later_median": med([v["down"] for v in later]),
        "max_error": result.get("max_error"),
        "client_error_replies": [s["error"] for s in errors],
        "other_messages": [{k: s[k] for k in ("message_type", "round_key", "bytes_down", "bytes_up", "handler_cpu_s")}
                           for s in other],
        "per_client_round": [{"node_id": node, "round": rnd, **v} for (node, rnd), v in sorted(per_client_round.items())],
    }
    for key in ("bytes_up_median", "bytes_down_round1_median", "bytes_down_later_median"):
        value = out[key]
        out[key.replace("bytes", "B_per_param").replace("_median", "")] = None if value is None else value / num_params
    return out


def run_method(link: Loopback, method: str, work: Path, args: argparse.Namespace, keys: secagg.KeyPaths | None) -> dict:
    stats_dir = work / f"stats-{method}"
    stats_dir.mkdir()
    result_path = work / f"result-{method}.json"
    run_config = {
        "method": method, "num-params": args.params, "num-tensors": args.tensors,
        "num-server-rounds": args.rounds, "min-nodes": args.clients, "max-weight": args.max_weight,
        "poll-interval": args.poll_interval, "timeout": float(args.timeout),
        "result-path": str(result_path), "stats-dir": str(stats_dir),
    }
    if method == "secagg":
        run_config.update({"secagg-key": str(keys.client), "secagg-server-key": str(keys.server),
                           "secagg-state-dir": str(work / "secagg-state")})
    load_before = loadavg()
    t0 = time.perf_counter()
    link.run(APP, run_config=run_config, timeout=args.timeout * (args.rounds + 1))
    elapsed = time.perf_counter() - t0
    result = json.loads(result_path.read_text(encoding="utf-8"))
    summary = summarize(method, result, read_stats(stats_dir), args.params)
    summary.update(flwr_run_s=elapsed, loadavg_before=load_before, loadavg_after=loadavg(), server_result=result)
    return summary


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ("| method | round wall s, median (each) | message delivery s | server CPU s/round | client CPU s/round | "
            "up B/param | down B/param, round 1 / later | messages/round | max error |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        each = ", ".join(f"{w:.2f}" for w in r["round_wall_s"])
        lines.append(
            f"| {r['label']} | {fmt(r['round_wall_s_median'], '.2f')} ({each}) | {fmt(r['delivery_s_median'], '.2f')} | "
            f"{fmt(r['server_cpu_s_median'], '.3f')} | "
            f"{fmt(r['client_cpu_s_median'], '.3f')} | {fmt(r['B_per_param_up'], '.3f')} | "
            f"{fmt(r['B_per_param_down_round1'], '.3f')} / {fmt(r['B_per_param_down_later'], '.3f')} | "
            f"{fmt(r['messages_per_client_round'], 'g')} | {fmt(r['max_error'], '.2g')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=5, help="SuperNodes, one client each (default 5)")
    ap.add_argument("--params", type=parse_size, default=1_000_000, help="float32 parameters per client (1M, 10k, ...)")
    ap.add_argument("--tensors", type=int, default=4, help="tensors the parameters are split into")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--max-weight", type=float, default=1000.0, help="SecAgg+'s and secagg's max weight (clients: 100..1000)")
    ap.add_argument("--poll-interval", type=float, default=0.2,
                    help="seconds between the ServerApp's pulls, all methods (Flower's send_and_receive: 3)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a round may take")
    ap.add_argument("--quick", action="store_true", help="10k parameters: a smoke run")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--md", default=None,
                    help=f"Markdown table (default {DEFAULT_MD.relative_to(ROOT)}; none with --quick unless given; '' for none)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, per-message lines)")
    args = ap.parse_args()
    if args.quick:
        args.params = 10_000
    md = Path(args.md) if args.md else (None if args.md == "" or args.quick else DEFAULT_MD)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.clients < 3:
        ap.error("--clients must be at least 3 (SecAgg+'s 3 shares, secagg's minimum cohort)")

    work = Path(tempfile.mkdtemp(prefix="secagg-flower-bench-"))
    keys = secagg.keygen(work / "keys") if "secagg" in methods else None
    rows: list[dict] = []
    failures: dict[str, str] = {}
    started = time.perf_counter()
    try:
        with Loopback(work / "flower", supernodes=args.clients) as link:
            for method in methods:
                print(f"{method}: {args.rounds} rounds of {args.clients} clients x {args.params:,} params ...", flush=True)
                try:
                    row = run_method(link, method, work, args, keys)
                except (LoopbackError, OSError, KeyError, ValueError) as err:  # the next method may still run
                    failures[method] = str(err)
                    print(f"  {method} failed: {err}", file=sys.stderr, flush=True)
                    continue
                rows.append(row)
                print(f"  round {row['round_wall_s_median']:.2f} s (median), up {fmt(row['B_per_param_up'], '.3f')} "
                      f"B/param, down {fmt(row['B_per_param_down_later'], '.3f')} B/param, "
                      f"max error {fmt(row['max_error'], '.2g')} (load {row['loadavg_after']})", flush=True)
    except LoopbackError as err:
        failures["deployment"] = str(err)
        print(f"flower_compare: {err}", file=sys.stderr)
    if failures or args.keep:
        print(f"work directory (logs, per-message lines) kept: {work}", file=sys.stderr if failures else sys.stdout)
    else:
        shutil.rmtree(work, ignore_errors=True)

    command = ".venv/bin/python benchmarks/flower_compare.py " + " ".join(sys.argv[1:])
    report = {
        "command": command.strip(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(), "cpus": os.cpu_count(), "clients": args.clients, "params": args.params,
        "tensors": args.tensors, "rounds": args.rounds, "poll_interval_s": args.poll_interval,
        "max_weight": args.max_weight, "total_s": time.perf_counter() - started, "methods": rows,
        "failures": failures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    text = table(rows)
    print()
    print(text)
    print(f"wrote {args.out}")
    if md is not None:
        loads = ", ".join(f"{r['method']} {r['loadavg_before']} -> {r['loadavg_after']}" for r in rows)
        failed = "".join(f"\n**{name} failed:** {reason.splitlines()[0]}\n" for name, reason in failures.items())
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(
            f"# Flower: FedAvg, SecAgg+ and secagg in one run\n\n"
            f"`{report['command']}` ({report['date']}, {report['total_s']:.0f} s, {report['cpus']} CPUs; "
            f"load averages {loads}).\n"
            f"{args.clients} SuperNodes, 1 SuperLink on 127.0.0.1 (Flower 1.42), {args.params:,} float32 parameters "
            f"in {args.tensors} tensors per client, {args.rounds} rounds; ServerApp polls every {args.poll_interval:g} s.\n"
            f"Bytes: payload per client per round (Array data + ConfigRecord bytes). Errors: last round's global vs "
            f"the float64 weighted mean. Details: `benchmarks/README.md`, JSON: `benchmarks/results/flower.json`.\n\n"
            f"{text}\n{failed}", encoding="utf-8")
        print(f"wrote {md}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
