"""Fault benchmark: SIGKILL the aggregator at random moments of a round, restart it, check the sum.

Run from the repository root::

    .venv/bin/python benchmarks/faults.py                 # 20 kill trials + 2 dropout rounds
    .venv/bin/python benchmarks/faults.py --quick         # 3 trials, small model
    .venv/bin/python benchmarks/faults.py --trials 50 --seed 7

Every kill trial starts a ``secagg serve`` process on a fresh state dir, creates a round of
``--clients`` clients (default 6, weights 1..100), starts them (threads, each calling
``secagg.submit``, which resends the same encrypted bytes for up to 60 s when the aggregator is
unreachable; each starts after a random delay in [0, ``--stagger``] s, so that submissions spread
over the round), SIGKILLs the aggregator after a random delay drawn from [0, 1.25 x the round time
of an undisturbed calibration round], so that the kill lands before any submission, mid-stream,
between submissions, while the round closes or after it closed, restarts it on the same port and
state dir, waits
for the clients, and checks: every client got a receipt, the round closed with every client
counted exactly once (status; the aggregate's contributions, which the client checks against the
encrypted count slot; receipts; "update accepted" log lines of both processes, of which a kill may
swallow the line of an update it acknowledged too late to reply), and the decrypted average equals
the float64 weighted average (1e-6). Meanwhile an attacker holds ``--silent-streams`` (default 40)
upload streams open against each aggregator process of a kill trial, sending nothing: the SIGKILL
lands while they are open, and the restarted aggregator gets 40 more; each aggregator closes them
after its ``--upload-idle-timeout`` (3 s here), and the clients' retries go through.

To count retries, ``AggregatorClient.submit`` is wrapped in this process (calls and failures are
counted; behaviour is unchanged). ``secagg.submit`` does not retry its first call (GetRound): a
client that starts while the aggregator is down fails at once. The harness restarts such a client
(nothing was sent yet, so this is safe) and counts it as a "pre-submit failure".

The dropout part runs two rounds with a deadline and ``enroll``: fewer than ``--min-clients``
submit (the round must fail, saying who submitted and who is missing), and more than that
(it must close at the deadline with the survivors; the average is theirs).

It prints a table and writes JSON (default ``benchmarks/results/faults.json``). Exit status 1 if
any trial failed its checks. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from wire import ServerProcess, parse_size

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "faults.json"
PARAM_STD = 0.05
CLIENT_TIMEOUT = 180.0


def log(msg: str) -> None:
    print(f"[faults] {msg}", file=sys.stderr, flush=True)


#: Silent upload streams (a slowloris) opened against every aggregator process of a kill trial.
SILENT_STREAMS = 40
#: The aggregators' --upload-idle-timeout here: silent streams hold the upload slots this long.
IDLE_TIMEOUT = 3.0


def serve(paths, state: Path, log_path: Path, listen: str = "127.0.0.1:0") -> ServerProcess:
    return ServerProcess([sys.executable, "-m", "secagg.cli", "serve", "--key", str(paths.server), "--listen", listen,
                          "--state-dir", str(state), "--upload-idle-timeout", str(IDLE_TIMEOUT)], log_path)


class SilentStreams:
    """``n`` Submit streams that never send a byte, over a few channels; :meth:`close` ends them."""

    def __init__(self, address: str, n: int, channels: int = 8) -> None:
        import grpc

        from secagg.transport import secagg_pb2_grpc as pb_grpc

        self.release = threading.Event()
        self.channels = [grpc.insecure_channel(address) for _ in range(channels)]

        def nothing():
            self.release.wait()
            return
            yield

        self.futures = [pb_grpc.AggregatorStub(self.channels[i % channels]).Submit.future(nothing()) for i in range(n)]

    def close(self) -> None:
        self.release.set()
        for ch in self.channels:
            ch.close()


def sigkill(server: ServerProcess) -> None:
    server.proc.kill()
    server.proc.wait(30)
    server.stop()  # closes its log file; the process is already gone


def models_for(seed: int, clients: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"w": (rng.standard_normal(n) * PARAM_STD).astype(np.float32), "step": np.array(i, dtype=np.int64)}
            for i in range(clients)]


def weighted_mean(models: list[dict[str, np.ndarray]], weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return np.tensordot(w, np.stack([m["w"].astype(np.float64) for m in models]), axes=1) / w.sum()


# ---------------------------------------------------------------------------------------------
# counting attempts of AggregatorClient.submit (the call secagg.submit retries)


class AttemptCounter:
    """Wraps ``AggregatorClient.submit`` once per process; counts calls and failures by client id."""

    def __init__(self) -> None:
        from secagg.transport.client import AggregatorClient

        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.failures: dict[str, list[str]] = {}
        original = AggregatorClient.submit
        counter = self

        def counting_submit(client, header, chunks):
            with counter.lock:
                counter.attempts[header.client_id] = counter.attempts.get(header.client_id, 0) + 1
            try:
                return original(client, header, chunks)
            except Exception as exc:
                with counter.lock:
                    counter.failures.setdefault(header.client_id, []).append(type(exc).__name__)
                raise

        AggregatorClient.submit = counting_submit

    def reset(self) -> None:
        with self.lock:
            self.attempts.clear()
            self.failures.clear()


@dataclasses.dataclass
class ClientRun:
    """What one client thread did."""

    client_id: str
    state: str = "starting"  # starting, encrypting, sending, done, error
    receipt: object = None
    error: str = ""
    pre_submit_failures: int = 0  # secagg.submit failed before its first Submit call (GetRound)
    t_end: float = 0.0


def run_client(address: str, round_id: str, key, run: ClientRun, model, weight: float, counter: AttemptCounter,
               start: threading.Event, offset: float) -> None:
    import secagg
    from secagg.errors import TransportError

    def progress(stage: str, done: int, total: int) -> None:
        run.state = "sending" if stage == "send" else "encrypting"

    start.wait()
    time.sleep(offset)
    end = time.monotonic() + 60.0
    while True:
        try:
            run.receipt = secagg.submit(address, round_id, key, run.client_id, model, weight, progress=progress,
                                        retry_for=60.0)
            run.state = "done"
            break
        except TransportError as exc:
            with counter.lock:
                sent = counter.attempts.get(run.client_id, 0)
            if sent or time.monotonic() > end:  # resending would re-encrypt: report instead
                run.state, run.error = "error", f"{type(exc).__name__}: {exc}"
                break
            run.pre_submit_failures += 1
            time.sleep(0.2)
        except Exception as exc:
            run.state, run.error = "error", f"{type(exc).__name__}: {exc}"
            break
    run.t_end = time.monotonic()


# ---------------------------------------------------------------------------------------------
# one kill trial


def run_round(paths, key, tmp: Path, label: str, models, weights, offsets: list[float], kill_delay: float | None,
              counter: AttemptCounter, restart_gap: float) -> dict:
    import secagg

    counter.reset()
    state = tmp / f"state-{label}"
    first = serve(paths, state, tmp / f"{label}-1.log")
    address = first.address
    # The calibration round has them too, so that the kill window covers a round under this load.
    silent = [SilentStreams(address, SILENT_STREAMS)] if SILENT_STREAMS else []
    round_id = f"faults-{label}"
    # The round's max weight is the largest site's weight: released sums are rounded to an absolute
    # grid (secagg.release), so a max weight far above the real ones would cost precision.
    secagg.create_round(address, round_id, models[0], clients=len(models), max_weight=max(weights))
    runs = [ClientRun(f"site-{i}") for i in range(len(models))]
    start = threading.Event()
    threads = [threading.Thread(target=run_client, args=(address, round_id, key, r, models[i], weights[i], counter,
                                                         start, offsets[i]), daemon=True)
               for i, r in enumerate(runs)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    start.set()
    out: dict = {"label": label, "kill_delay_s": kill_delay, "start_offsets_s": offsets}
    second = None
    try:
        if kill_delay is not None:
            time.sleep(kill_delay)
            states = [r.state for r in runs]
            sigkill(first)
            out["killed_at_s"] = time.monotonic() - t0
            first_log = first.log_path.read_text(errors="replace")
            out["accepted_before_kill"] = first_log.count("update accepted")
            out["closed_before_kill"] = "round closed" in first_log
            out["client_states_at_kill"] = {s: states.count(s) for s in sorted(set(states))}
            out["streams_in_flight_at_kill"] = states.count("sending")
            accepted = out["accepted_before_kill"]
            out["phase"] = ("after close" if out["closed_before_kill"] else
                            "before any acceptance" if accepted == 0 else
                            "closing (all accepted, sum not written)" if accepted == len(models) else
                            f"mid-round ({accepted}/{len(models)} accepted)")
            time.sleep(restart_gap)
            t_restart = time.monotonic()
            second = serve(paths, state, tmp / f"{label}-2.log", listen=address)
            if SILENT_STREAMS:
                silent.append(SilentStreams(address, SILENT_STREAMS))
            out["restart_seconds"] = time.monotonic() - t_restart
            out["downtime_s"] = time.monotonic() - t0 - out["killed_at_s"]
        for t in threads:
            t.join(CLIENT_TIMEOUT)
        out["round_seconds"] = max(r.t_end for r in runs) - t0
        server_now = second or first
        status = secagg.round_status(server_now.address, round_id)
        errors = {r.client_id: r.error for r in runs if r.error}
        if status.state == "closed":
            average = secagg.fetch_average(server_now.address, round_id, key)
            err = float(np.max(np.abs(average.vector - weighted_mean(models, weights))))
            weight_err = abs(average.total_weight - sum(weights)) / sum(weights)
            contributions, avg_clients = average.contributions, list(average.clients)
        else:
            err = weight_err = float("nan")
            contributions, avg_clients = 0, []
    finally:
        for streams in silent:
            streams.close()
        for s in (first, second):
            if s is not None and s.proc.poll() is None:
                s.stop()
    logs = [first.log_path.read_text(errors="replace")] + ([second.log_path.read_text(errors="replace")]
                                                             if second else [])
    ids = [r.client_id for r in runs]
    receipts = [r.receipt for r in runs if r.receipt is not None]
    attempts = {cid: counter.attempts.get(cid, 0) for cid in ids}
    out.update({
        "clients": len(models),
        "state": status.state,
        "submitted": status.submitted,
        "clients_match": list(status.clients) == sorted(ids),
        "contributions": contributions,
        "aggregate_clients_match": avg_clients == sorted(ids),
        "log_accepted_lines": sum(text.count("update accepted") for text in logs),
        "receipts": len(receipts),
        "already_accepted": sum(r.already_accepted for r in receipts),
        "attempts": attempts,
        "retries": sum(max(0, a - 1) for a in attempts.values()),
        "failed_attempts": sum(len(v) for v in counter.failures.values()),
        "failure_kinds": sorted({k for v in counter.failures.values() for k in v}),
        "pre_submit_failures": sum(r.pre_submit_failures for r in runs),
        "clients_with_pre_submit_failures": sum(r.pre_submit_failures > 0 for r in runs),
        "client_errors": errors,
        "max_abs_error": err,
        "total_weight_rel_error": weight_err,
    })
    out["passed"] = bool(status.state == "closed" and status.submitted == len(models) and out["clients_match"]
                         and contributions == len(models) and out["aggregate_clients_match"]
                         # A kill between an update's durable rename into accepted/ and its log line
                         # loses the line, never the update; its client then gets already_accepted.
                         and len(models) - out["already_accepted"] <= out["log_accepted_lines"] <= len(models)
                         and len(receipts) == len(models)
                         and not errors and err < 1e-6 and weight_err < 1e-6)
    return out


# ---------------------------------------------------------------------------------------------
# dropouts


def run_dropout(paths, key, tmp: Path, label: str, clients: int, survivors: int, min_clients: int, deadline: float,
                n: int, seed: int) -> dict:
    import secagg
    from secagg.errors import RoundStateError

    models = models_for(seed, clients, n)
    weights = [float(10 * (i + 1)) for i in range(clients)]
    ids = [f"site-{i}" for i in range(clients)]
    server = serve(paths, tmp / f"state-{label}", tmp / f"{label}.log")
    with server:
        round_id = f"dropout-{label}"
        secagg.create_round(server.address, round_id, models[0], clients=clients, min_clients=min_clients,
                            deadline=deadline, enroll=ids, max_weight=max(weights))
        t_created = time.monotonic()
        for i in range(survivors):
            secagg.submit(server.address, round_id, key, ids[i], models[i], weights[i])
        submitted_by_s = time.monotonic() - t_created
        status = secagg.round_status(server.address, round_id)
        while status.state == "collecting" and time.monotonic() - t_created < deadline + 60:
            time.sleep(0.1)
            status = secagg.round_status(server.address, round_id)
        ended_after_s = time.monotonic() - t_created
        out = {
            "label": label, "clients": clients, "survivors": survivors, "min_clients": min_clients,
            "deadline_s": deadline, "survivors_submitted_by_s": submitted_by_s,
            "state_changed_after_s": ended_after_s, "state": status.state, "submitted": status.submitted,
            "status_clients": list(status.clients), "reason": status.reason,
        }
        survivors_ids = ids[:survivors]
        missing = ids[survivors:]
        if survivors < min_clients:
            try:
                secagg.fetch_average(server.address, round_id, key)
                out["fetch"] = "returned an aggregate"
            except RoundStateError as exc:
                out["fetch"] = f"RoundStateError: {exc}"
            out["passed"] = (status.state == "failed" and list(status.clients) == survivors_ids
                             and f"accepted from: {', '.join(survivors_ids) or 'nobody'}" in status.reason
                             and f"missing: {', '.join(missing)}" in status.reason
                             and out["fetch"].startswith("RoundStateError") and "failed" in out["fetch"])
        else:
            average = secagg.fetch_average(server.address, round_id, key)
            err = float(np.max(np.abs(average.vector - weighted_mean(models[:survivors], weights[:survivors]))))
            out.update(contributions=average.contributions, aggregate_clients=list(average.clients),
                       max_abs_error=err, total_weight=average.total_weight)
            out["passed"] = (status.state == "closed" and list(status.clients) == survivors_ids
                             and average.contributions == survivors and list(average.clients) == survivors_ids
                             and err < 1e-6 and abs(average.total_weight - sum(weights[:survivors])) < 1e-3)
    return out


# ---------------------------------------------------------------------------------------------


def render(trials: list[dict], calibration: dict, dropouts: list[dict]) -> str:
    lines = ["secagg fault benchmark: SIGKILL of `secagg serve` at a random moment, restart on the same port and "
             "state dir",
             f"calibration round (no kill): {calibration['round_seconds']:.2f} s, "
             f"{'ok' if calibration['passed'] else 'FAILED'}",
             f"{'#':>3} {'kill s':>7} {'phase':<40} {'in flight':>9} {'retries':>7} {'pre-sub':>7} "
             f"{'dup ack':>7} {'round s':>7} {'max err':>8}  result"]
    for i, t in enumerate(trials):
        lines.append(f"{i:>3} {t['killed_at_s']:>7.2f} {t['phase']:<40} {t['streams_in_flight_at_kill']:>9} "
                     f"{t['retries']:>7} {t['pre_submit_failures']:>7} {t['already_accepted']:>7} "
                     f"{t['round_seconds']:>7.2f} {t['max_abs_error']:>8.1e}  {'pass' if t['passed'] else 'FAIL'}")
    passed = sum(t["passed"] for t in trials)
    phases: dict[str, int] = {}
    for t in trials:
        key = t["phase"].split(" (")[0]
        phases[key] = phases.get(key, 0) + 1
    errs = [t["max_abs_error"] for t in trials if t["max_abs_error"] == t["max_abs_error"]]
    lines += [
        f"trials passed: {passed}/{len(trials)}; kills by phase: "
        + ", ".join(f"{k} {v}" for k, v in sorted(phases.items())),
        f"retries (resent Submit calls): total {sum(t['retries'] for t in trials)}, median per trial "
        f"{statistics.median(t['retries'] for t in trials):.0f}; pre-submit failures (GetRound while down, not retried "
        f"by secagg.submit) total {sum(t['pre_submit_failures'] for t in trials)} in "
        f"{sum(t['pre_submit_failures'] > 0 for t in trials)} trial(s), "
        f"{sum(t['clients_with_pre_submit_failures'] for t in trials)} client(s); acknowledgements lost in the crash "
        f"and re-acknowledged (already_accepted) {sum(t['already_accepted'] for t in trials)}",
        f"max |average - float64 weighted average| over all trials: {max(errs) if errs else float('nan'):.1e}; "
        f"round time median {statistics.median(t['round_seconds'] for t in trials):.2f} s "
        f"(calibration {calibration['round_seconds']:.2f} s: ratio "
        f"{statistics.median(t['round_seconds'] for t in trials) / calibration['round_seconds']:.2f}x)",
        "Dropouts (deadline, enroll):",
    ]
    for d in dropouts:
        what = (f"{d['survivors']} of {d['clients']} submit, min {d['min_clients']}, deadline {d['deadline_s']:g} s -> "
                f"{d['state']} after {d['state_changed_after_s']:.1f} s")
        if d["state"] == "failed":
            what += f"; reason: {d['reason']}"
        else:
            what += f"; contributions {d.get('contributions')}, max err {d.get('max_abs_error', float('nan')):.1e}"
        lines.append(f"  {'pass' if d['passed'] else 'FAIL'}  {what}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, help="kill trials (default 20; --quick: 3)")
    p.add_argument("--clients", type=int, default=6, help="clients per round (default 6)")
    p.add_argument("--params", type=parse_size, help="model size (default 400k: 49 ciphertexts in 3 chunks; "
                                                     "--quick: 100k)")
    p.add_argument("--seed", type=int, default=1, help="seed of the kill delays and models (default 1)")
    p.add_argument("--restart-gap", type=float, default=0.3, help="seconds between the kill and the restart")
    p.add_argument("--stagger", type=float, default=2.0,
                   help="each client starts after a random delay in [0, STAGGER] s (default 2; 0: all at once)")
    p.add_argument("--deadline", type=float, default=5.0, help="deadline of the dropout rounds in seconds (default 5)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="JSON results (default benchmarks/results/faults.json)")
    p.add_argument("--silent-streams", type=int, default=SILENT_STREAMS,
                   help=f"silent upload streams opened against each aggregator process of a kill trial (default "
                        f"{SILENT_STREAMS}; the aggregators close them after --upload-idle-timeout {IDLE_TIMEOUT:g} s)")
    p.add_argument("--quick", action="store_true", help="smoke run")
    args = p.parse_args(argv)
    globals()["SILENT_STREAMS"] = args.silent_streams
    trials = args.trials or (3 if args.quick else 20)
    n = args.params or (100_000 if args.quick else 400_000)
    if args.clients < 4:
        p.error("--clients must be at least 4 (dropout rounds need a quorum of 3 or more below it)")

    import tenseal

    import secagg

    rng = random.Random(args.seed)
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="secagg-faults-") as tmp_name:
        tmp = Path(tmp_name)
        paths = secagg.keygen(tmp / "keys")
        key = secagg.load_client_key(paths.client)
        counter = AttemptCounter()
        weights = [float(rng.randint(1, 100)) for _ in range(args.clients)]
        models = models_for(args.seed, args.clients, n)
        log(f"calibration round: {args.clients} clients, {n:,} params, no kill")
        offsets = sorted(rng.uniform(0.0, args.stagger) for _ in range(args.clients))
        calibration = run_round(paths, key, tmp, "calibration", models, weights, offsets, None, counter,
                                args.restart_gap)
        window = 1.25 * calibration["round_seconds"]
        results = []
        for i in range(trials):
            delay = rng.uniform(0.0, window)
            trial_models = models_for(args.seed * 1000 + i, args.clients, n)
            trial_weights = [float(rng.randint(1, 100)) for _ in range(args.clients)]
            trial_offsets = sorted(rng.uniform(0.0, args.stagger) for _ in range(args.clients))
            res = run_round(paths, key, tmp, f"trial-{i}", trial_models, trial_weights, trial_offsets, delay, counter,
                            args.restart_gap)
            res["weights"] = trial_weights
            verdict = "pass" if res["passed"] else f"FAIL {res['client_errors']}"
            log(f"trial {i}: kill at {res['killed_at_s']:.2f} s ({res['phase']}, {res['streams_in_flight_at_kill']} "
                f"streaming), retries {res['retries']}, {verdict}")
            results.append(res)
        min_clients = args.clients - 2  # quorum: 2 survivors fail it, clients - 1 survivors meet it
        log("dropouts")
        dropouts = [
            run_dropout(paths, key, tmp, "below-quorum", args.clients, 2, min_clients, args.deadline,
                        n // 4, args.seed),
            run_dropout(paths, key, tmp, "above-quorum", args.clients, args.clients - 1, min_clients, args.deadline,
                        n // 4, args.seed),
        ]
    total = time.perf_counter() - started
    table = render(results, calibration, dropouts)
    print(table)
    print(f"\nTotal run time {total:.0f} s on {os.cpu_count()} CPU(s); load average before {load_before[0]:.1f}, "
          f"after {os.getloadavg()[0]:.1f}.")
    doc = {
        "meta": {"argv": sys.argv[1:], "trials": trials, "clients": args.clients, "num_params": n, "seed": args.seed,
                 "stagger_s": args.stagger,
                 "restart_gap_s": args.restart_gap, "kill_window_s": window, "total_seconds": total,
                 "silent_streams": SILENT_STREAMS, "upload_idle_timeout_s": IDLE_TIMEOUT,
                 "cpu_count": os.cpu_count(), "load_average_before": load_before,
                 "load_average_after": os.getloadavg(), "platform": platform.platform(),
                 "python": platform.python_version(), "secagg": secagg.__version__, "tenseal": tenseal.__version__},
        "summary": {
            "trials_passed": sum(t["passed"] for t in results), "trials": len(results),
            "retries_total": sum(t["retries"] for t in results),
            "pre_submit_failures_total": sum(t["pre_submit_failures"] for t in results),
            "trials_with_pre_submit_failures": sum(t["pre_submit_failures"] > 0 for t in results),
            "clients_with_pre_submit_failures": sum(t["clients_with_pre_submit_failures"] for t in results),
            "already_accepted_total": sum(t["already_accepted"] for t in results),
            "max_abs_error": max((t["max_abs_error"] for t in results), default=None),
            "round_seconds_median": statistics.median(t["round_seconds"] for t in results) if results else None,
            "calibration_round_seconds": calibration["round_seconds"],
            "dropouts_passed": sum(d["passed"] for d in dropouts), "dropouts": len(dropouts),
        },
        "calibration": calibration,
        "trials": results,
        "dropouts": dropouts,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"JSON: {args.out}")
    ok = all(t["passed"] for t in results) and calibration["passed"] and all(d["passed"] for d in dropouts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
