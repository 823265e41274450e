"""Load benchmark: one `secagg serve` and many concurrent clients in one round, on loopback.

Run from the repository root::

    .venv/bin/python benchmarks/load.py                  # 100 clients, 100k params, 3 repeats
    .venv/bin/python benchmarks/load.py --quick          # smoke run: 12 clients, 20k params, 1 repeat
    .venv/bin/python benchmarks/load.py --clients 200 --workers 20 --repeats 1

Each repeat runs three phases, each on a fresh aggregator (default settings: minimum cohort 3) and
a round that expects every client:

* ``api``: the clients are processes (``--workers`` processes of clients/workers threads each,
  since TenSEAL holds the GIL) that all start at once and call ``secagg.submit`` with an
  in-memory model: GetRound, encrypt, stream, acknowledgement. This is a real round.
* ``streams``: the same, but every update is encrypted before the start signal; what is timed is
  only the concurrent streams into the aggregator (``AggregatorClient.submit``).
* ``two``: the same pre-encrypted updates as ``sequential``, on two connections at once (two
  threads, each sending its half one after the other): the aggregator's ingest with 2 in parallel.
* ``sequential``: the same encrypted updates submitted one after the other over one connection:
  the aggregator's throughput without concurrency, for the ratios.
* ``workers1`` / ``workers2``: the same pre-encrypted updates on 4 connections at once into an
  aggregator started with ``--ingest-workers 1`` / ``2`` (uploads received, checked and written in
  worker processes; ``secagg.transport.ingest``): ingest with 1 and 2 worker processes, side by
  side. CPU and memory figures count the workers too. ``--state-root /dev/shm`` puts the
  aggregators' state on tmpfs, to see the CPU side apart from the disk.

After each phase the benchmark checks exactly-once (round closed, ``submitted`` == clients, the
round's clients are exactly the ids that were sent, the acknowledgements' ``submitted`` counts
are a permutation of 1..N, the aggregator logged N acceptances) and exactness (the decrypted
average against the float64 average of all models). It prints a table of medians over the
repeats and writes JSON (default ``benchmarks/results/load.json``). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from wire import ServerProcess, mb, parse_size, proc_kb

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "load.json"
SEED = 20240607
PARAM_STD = 0.05
PHASES = ("api", "streams", "two", "sequential", "workers1", "workers2")
INGEST_LANES = 4  # concurrent uploads in the workers phases: enough to keep every worker busy
TIMEOUT = 900.0  # no phase may hang the benchmark


def log(msg: str) -> None:
    print(f"[load] {msg}", file=sys.stderr, flush=True)


def layout(n: int) -> dict[str, tuple[int, ...]]:
    """A dense layer of about n parameters: kernel (n // 200, 199)-ish plus a bias, exactly n floats."""
    rows = max(1, n // 200)
    return {"dense/kernel": (rows, (n - rows) // rows), "dense/bias": (n - rows * ((n - rows) // rows),)}


def model_for(index: int, n: int) -> dict[str, np.ndarray]:
    """Client ``index``'s model: float32 ~ N(0, 0.05), reproducible in any process."""
    rng = np.random.default_rng([SEED, index])
    return {name: (rng.standard_normal(shape) * PARAM_STD).astype(np.float32) for name, shape in layout(n).items()}


def client_id(index: int) -> str:
    return f"site-{index:03d}"


# ---------------------------------------------------------------------------------------------
# client processes


def _worker(address: str, client_key: str, round_id: str, indices: list[int], n: int, mode: str,
            ready, go, results) -> None:
    """One client process: ``len(indices)`` client threads that start together when ``go`` is set."""
    try:
        import secagg
        from secagg.packing import ModelSpec, flatten
        from secagg.transport.client import AggregatorClient
        from secagg.updates import seal_update

        key = secagg.load_client_key(client_key)
        models = {i: model_for(i, n) for i in indices}
        sealed = {}
        if mode == "streams":
            status = secagg.round_status(address, round_id)
            for i, m in models.items():
                sealed[i] = seal_update(key, status, client_id(i), flatten(ModelSpec.of(m), m), 1.0)
        out: list[dict] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            rec: dict = {"client": client_id(i)}
            go.wait()
            rec["t_start"] = time.time()
            try:
                if mode == "api":
                    r = secagg.submit(address, round_id, key, client_id(i), models[i], weight=1.0, retry_for=60.0)
                    rec.update(submitted=r.submitted, already_accepted=r.already_accepted, wire_bytes=r.wire_bytes,
                               encrypt_seconds=r.encrypt_seconds, send_seconds=r.send_seconds)
                else:
                    from secagg.errors import BusyError

                    update = sealed[i]
                    delay, busy = 0.1, 0
                    with AggregatorClient(address) as c:
                        while True:  # as secagg.submit does: an aggregator at its upload limit says so; retry
                            try:
                                reply = c.submit(update.header, update.chunks)
                                break
                            except BusyError:
                                busy += 1
                                time.sleep(delay)
                                delay = min(2 * delay, 1.0)
                    rec["busy_retries"] = busy
                    rec.update(submitted=reply.submitted, already_accepted=reply.already_accepted,
                               wire_bytes=update.wire_bytes)
            except Exception as exc:  # reported, never hidden: the parent counts errors
                rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["t_end"] = time.time()
            with lock:
                out.append(rec)

        threads = [threading.Thread(target=one, args=(i,)) for i in indices]
        for t in threads:
            t.start()
        ready.put(os.getpid())
        for t in threads:
            t.join()
        results.put({"pid": os.getpid(), "records": out, "peak_rss_mb": mb(proc_kb(os.getpid(), "VmHWM"))})
    except BaseException as exc:
        ready.put(os.getpid())
        results.put({"pid": os.getpid(), "records": [], "fatal": f"{type(exc).__name__}: {exc}"})


def run_concurrent(ctx, address: str, client_key: Path, round_id: str, clients: int, workers: int, n: int,
                   mode: str, server: ServerProcess) -> tuple[list[dict], dict]:
    """Start the client processes, wait until all are ready, then release them at once."""
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    groups = [list(range(w, clients, workers)) for w in range(min(workers, clients))]
    procs = [ctx.Process(target=_worker, args=(address, str(client_key), round_id, g, n, mode, ready, go, results))
             for g in groups]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=TIMEOUT)
    time.sleep(0.2)  # every thread is parked on go.wait()
    cpu0 = server.cpu_seconds()
    t_go = time.time()
    go.set()
    outs = [results.get(timeout=TIMEOUT) for _ in procs]
    for p in procs:
        p.join(60)
    fatal = [o["fatal"] for o in outs if "fatal" in o]
    if fatal:
        raise RuntimeError(f"client process failed: {fatal[0]}")
    records = [r for o in outs for r in o["records"]]
    return records, {"t_go": t_go, "server_cpu_seconds": server.cpu_seconds() - cpu0,
                     "client_process_peak_rss_mb": [o["peak_rss_mb"] for o in outs]}


def run_sequential(address: str, client_key: Path, round_id: str, clients: int, n: int,
                   server: ServerProcess, lanes: int = 1) -> tuple[list[dict], dict]:
    """Pre-encrypted updates sent one after the other on each of ``lanes`` connections (threads)."""
    import secagg
    from secagg.packing import ModelSpec, flatten
    from secagg.transport.client import AggregatorClient
    from secagg.updates import seal_update

    key = secagg.load_client_key(client_key)
    status = secagg.round_status(address, round_id)
    sealed = []
    for i in range(clients):
        m = model_for(i, n)
        sealed.append(seal_update(key, status, client_id(i), flatten(ModelSpec.of(m), m), 1.0))
    records = []
    conns = [AggregatorClient(address) for _ in range(lanes)]
    for c in conns:
        c.server_info()

    def lane(k: int) -> None:
        for i in range(k, clients, lanes):
            rec = {"client": client_id(i), "t_start": time.time()}
            try:
                reply = conns[k].submit(sealed[i].header, sealed[i].chunks)
                rec.update(submitted=reply.submitted, already_accepted=reply.already_accepted,
                           wire_bytes=sealed[i].wire_bytes)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["t_end"] = time.time()
            records.append(rec)

    cpu0 = server.cpu_seconds()
    t_go = time.time()
    threads = [threading.Thread(target=lane, args=(k,)) for k in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    return records, {"t_go": t_go, "server_cpu_seconds": server.cpu_seconds() - cpu0}


# ---------------------------------------------------------------------------------------------
# one phase: fresh aggregator, one round, checks


def expected_average(clients: int, n: int) -> np.ndarray:
    from secagg.packing import ModelSpec, flatten

    total = np.zeros(n, dtype=np.float64)
    spec = ModelSpec.of(model_for(0, n))
    for i in range(clients):
        total += flatten(spec, model_for(i, n))
    return total / clients


def run_phase(ctx, tmp: Path, paths, mode: str, repeat: int, clients: int, workers: int, n: int,
              reference: np.ndarray, state_root: Path) -> dict:
    import secagg
    from secagg.transport.client import AggregatorClient

    label = f"{mode}-{repeat}"
    ingest_workers = {"workers1": 1, "workers2": 2}.get(mode, 0)
    extra = ("--ingest-workers", str(ingest_workers)) if ingest_workers else ()
    server = ServerProcess.secagg(paths.server, state_root / f"state-{label}",
                                  tmp / f"server-{label}.log", extra=extra)
    with server:
        with AggregatorClient(server.address) as c:
            c.server_info()
        time.sleep(0.5)
        idle_kb = server.rss_kb()
        round_id = f"load-{label}"
        # Every client has weight 1, so the round's max weight is 1: released sums are rounded to an
        # absolute grid (secagg.release), and a max weight far above the real ones would cost precision.
        secagg.create_round(server.address, round_id, model_for(0, n), clients=clients, max_weight=1.0)
        if mode in ("sequential", "two", "workers1", "workers2"):
            lanes = {"sequential": 1, "two": 2}.get(mode, INGEST_LANES)
            records, extra = run_sequential(server.address, paths.client, round_id, clients, n, server, lanes=lanes)
        else:
            records, extra = run_concurrent(ctx, server.address, paths.client, round_id, clients, workers, n, mode,
                                            server)
        peak_close_kb = server.peak_rss_kb()
        status = secagg.round_status(server.address, round_id)
        t0 = time.perf_counter()
        average = secagg.fetch_average(server.address, round_id, paths.client, wait=60.0)
        fetch_seconds = time.perf_counter() - t0
        peak_fetch_kb = server.peak_rss_kb()
    server_log = server.log_path.read_text(errors="replace")

    ok = [r for r in records if "error" not in r]
    errors = [r["error"] for r in records if "error" in r]
    t_go = extra["t_go"]
    t_last = max(r["t_end"] for r in records)
    round_seconds = t_last - t_go
    wire = sum(r["wire_bytes"] for r in ok)
    ids = sorted(client_id(i) for i in range(clients))
    counts = sorted(r["submitted"] for r in ok)
    err = float(np.max(np.abs(average.vector - reference)))
    latency = sorted(r["t_end"] - t_go for r in ok)
    exactly_once = {
        "state": status.state,
        "submitted": status.submitted,
        "clients_match": list(status.clients) == ids,
        "contributions": average.contributions,
        "ack_counts_are_1_to_n": counts == list(range(1, clients + 1)),
        "already_accepted": sum(bool(r["already_accepted"]) for r in ok),
        "errors": errors,
        "log_accepted_lines": server_log.count("update accepted"),
    }
    passed = (status.state == "closed" and status.submitted == clients and exactly_once["clients_match"]
              and average.contributions == clients and exactly_once["ack_counts_are_1_to_n"]
              and not errors and exactly_once["already_accepted"] == 0
              and exactly_once["log_accepted_lines"] == clients and err < 1e-6)
    out = {
        "mode": mode,
        "repeat": repeat,
        "clients": clients,
        "workers": {"sequential": 1, "two": 2, "workers1": INGEST_LANES, "workers2": INGEST_LANES}.get(mode, workers),
        "ingest_workers": ingest_workers,
        "passed": passed,
        "exactly_once": exactly_once,
        "max_abs_error": err,
        "total_weight": average.total_weight,
        "round_seconds": round_seconds,
        "submissions_per_s": clients / round_seconds,
        "wire_bytes_total": wire,
        "wire_bytes_per_submission": wire / max(1, len(ok)),
        "mb_per_s": wire / round_seconds / 1e6,
        "latency_median_s": statistics.median(latency) if latency else None,
        "latency_p95_s": latency[int(0.95 * (len(latency) - 1))] if latency else None,
        "latency_p99_s": latency[int(0.99 * (len(latency) - 1))] if latency else None,
        "busy_retries": sum(r.get("busy_retries", 0) for r in ok),
        "fetch_seconds": fetch_seconds,
        "server_idle_rss_mb": mb(idle_kb),
        "server_peak_rss_mb": mb(peak_close_kb),
        "server_peak_rss_after_fetch_mb": mb(peak_fetch_kb),
        "server_growth_mb": mb(peak_close_kb - idle_kb),
        "server_cpu_seconds": extra["server_cpu_seconds"],
        "server_cpu_ms_per_submission": 1e3 * extra["server_cpu_seconds"] / clients,
        # CPU seconds per wall second while the clients sent: how many cores the aggregator kept busy.
        "server_cores_used": extra["server_cpu_seconds"] / round_seconds,
    }
    if mode == "api":
        out["encrypt_seconds_median"] = statistics.median(r["encrypt_seconds"] for r in ok) if ok else None
        out["send_seconds_median"] = statistics.median(r["send_seconds"] for r in ok) if ok else None
    if "client_process_peak_rss_mb" in extra:
        out["client_process_peak_rss_mb_median"] = statistics.median(extra["client_process_peak_rss_mb"])
    return out


# ---------------------------------------------------------------------------------------------
# table


def med(runs: list[dict], key: str) -> float | None:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return float(statistics.median(xs)) if xs else None


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_table(summary: dict, phases: list[str], clients: int, n: int, repeats: int) -> str:
    rows = [
        ("exactly once: passed / runs", lambda s: f"{s['passed']}/{s['runs']}"),
        ("round: submitted == clients, ids match", lambda s: "yes" if s["all_exact_counts"] else "NO"),
        ("max |average - float64 average| (worst run)", lambda s: fmt(s["max_abs_error"], ".1e")),
        ("round time s (start signal -> last ack)", lambda s: fmt(s["round_seconds"], ".2f")),
        ("submissions/s", lambda s: fmt(s["submissions_per_s"], ".1f")),
        ("MB/s received (ciphertexts + digests + record)", lambda s: fmt(s["mb_per_s"], ".1f")),
        ("ack latency median s (from start signal)", lambda s: fmt(s["latency_median_s"], ".2f")),
        ("ack latency p95 s", lambda s: fmt(s["latency_p95_s"], ".2f")),
        ("ack latency p99 s", lambda s: fmt(s["latency_p99_s"], ".2f")),
        ("uploads refused as busy, then resent", lambda s: fmt(s["busy_retries"], ".0f")),
        ("client encrypt s, median (api only)", lambda s: fmt(s.get("encrypt_seconds_median"), ".3f")),
        ("aggregator CPU ms per submission", lambda s: fmt(s["server_cpu_ms_per_submission"], ".1f")),
        ("aggregator cores used (CPU s / wall s)", lambda s: fmt(s["server_cores_used"], ".2f")),
        ("aggregator idle RSS MB", lambda s: fmt(s["server_idle_rss_mb"], ".0f")),
        ("aggregator peak RSS MB (VmHWM at close)", lambda s: fmt(s["server_peak_rss_mb"], ".0f")),
        ("  peak / idle", lambda s: fmt(s["peak_over_idle"], ".2f") + "x"),
        ("  peak after fetch MB", lambda s: fmt(s["server_peak_rss_after_fetch_mb"], ".0f")),
        ("fetch_average s (download + decrypt)", lambda s: fmt(s["fetch_seconds"], ".2f")),
    ]
    width = 46
    col = 14
    lines = [f"secagg load benchmark: {clients} clients, {n:,} params, one round each; medians of {repeats} "
             "run(s), fresh aggregator per run",
             f"{'':{width}}" + "".join(f"{p:>{col}}" for p in phases)]
    for name, get in rows:
        cells = []
        for p in phases:
            try:
                cells.append(get(summary[p]))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"  {name:{width - 2}}" + "".join(f"{c:>{col}}" for c in cells))
    ratios = summary.get("ratios", {})
    if ratios:
        lines.append("Ratios of medians, same run")
        for name, value in ratios.items():
            lines.append(f"  {name:{width - 2}}{value:>{col}.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, help="concurrent clients in the round (default 100; --quick: 12)")
    p.add_argument("--params", type=parse_size, help="model size (default 100k; --quick: 20k)")
    p.add_argument("--workers", type=int, help="client processes; each runs clients/workers threads (default 10; "
                                               "--quick: 3)")
    p.add_argument("--repeats", type=int, help="runs of every phase; medians are reported (default 3; --quick: 1)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default benchmarks/results/load.json)")
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--state-root", type=Path, help="folder for the aggregators' state dirs (default: a temporary "
                                                   "folder; e.g. /dev/shm to take the disk out of the figures)")
    args = p.parse_args(argv)
    clients = args.clients or (12 if args.quick else 100)
    n = args.params or (20_000 if args.quick else 100_000)
    workers = args.workers or (3 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 3)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not set(phases) <= set(PHASES) or not phases:
        p.error(f"--phases must name some of {', '.join(PHASES)}")
    if clients < 3 or workers < 1 or repeats < 1 or n < 1:
        p.error("--clients must be at least 3 (the default minimum cohort), --workers and --repeats at least 1")

    import tenseal

    import secagg

    started = time.perf_counter()
    load_before = os.getloadavg()
    ctx = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict]] = {ph: [] for ph in phases}
    with tempfile.TemporaryDirectory(prefix="secagg-load-") as tmp_name, \
            tempfile.TemporaryDirectory(prefix="secagg-load-state-", dir=args.state_root) as state_name:
        tmp = Path(tmp_name)
        state_root = Path(state_name) if args.state_root else None
        paths = secagg.keygen(tmp / "keys")
        reference = expected_average(clients, n)
        for r in range(repeats):
            for ph in phases:
                log(f"repeat {r + 1}/{repeats}: phase {ph}, {clients} clients")
                res = run_phase(ctx, tmp, paths, ph, r, clients, workers, n, reference, state_root or tmp)
                log(f"  {'ok' if res['passed'] else 'FAILED'}: {res['round_seconds']:.2f} s, "
                    f"{res['submissions_per_s']:.1f} submissions/s, peak RSS {res['server_peak_rss_mb']:.0f} MB, "
                    f"max error {res['max_abs_error']:.1e}")
                runs[ph].append(res)

    summary: dict = {}
    for ph, rs in runs.items():
        s = {key: med(rs, key) for key in (
            "round_seconds", "submissions_per_s", "mb_per_s", "latency_median_s", "latency_p95_s", "latency_p99_s",
            "busy_retries", "server_cpu_ms_per_submission", "server_cores_used", "server_idle_rss_mb",
            "server_peak_rss_mb",
            "server_peak_rss_after_fetch_mb", "server_growth_mb", "fetch_seconds", "encrypt_seconds_median",
            "send_seconds_median", "client_process_peak_rss_mb_median", "wire_bytes_per_submission")}
        s["runs"] = len(rs)
        s["passed"] = sum(r["passed"] for r in rs)
        s["all_exact_counts"] = all(r["exactly_once"]["submitted"] == clients and r["exactly_once"]["clients_match"]
                                    for r in rs)
        s["max_abs_error"] = max(r["max_abs_error"] for r in rs)
        s["peak_over_idle"] = med([{"x": r["server_peak_rss_mb"] / r["server_idle_rss_mb"]} for r in rs], "x")
        summary[ph] = s
    ratios = {}
    if "streams" in summary and "sequential" in summary:
        ratios["submissions/s: concurrent streams / sequential"] = (summary["streams"]["submissions_per_s"]
                                                                    / summary["sequential"]["submissions_per_s"])
    if "workers2" in summary and "workers1" in summary:
        ratios["submissions/s: 2 ingest worker processes / 1"] = (summary["workers2"]["submissions_per_s"]
                                                                  / summary["workers1"]["submissions_per_s"])
    if "two" in summary and "sequential" in summary:
        ratios["submissions/s: 2 uploads ingested in parallel / 1 at a time"] = (
            summary["two"]["submissions_per_s"] / summary["sequential"]["submissions_per_s"])
    if "streams" in summary and "api" in summary:
        ratios["submissions/s: pre-encrypted / public API"] = (summary["streams"]["submissions_per_s"]
                                                               / summary["api"]["submissions_per_s"])
    if "api" in summary and "sequential" in summary:
        ratios["peak RSS: api (concurrent) / sequential"] = (summary["api"]["server_peak_rss_mb"]
                                                             / summary["sequential"]["server_peak_rss_mb"])
    summary["ratios"] = ratios
    table = render_table(summary, phases, clients, n, repeats)
    total = time.perf_counter() - started
    print(table)
    print(f"\nTotal run time {total:.0f} s on {os.cpu_count()} CPU(s); load average before {load_before[0]:.1f}, "
          f"after {os.getloadavg()[0]:.1f}.")
    doc = {
        "meta": {
            "argv": sys.argv[1:], "clients": clients, "num_params": n, "workers": workers, "repeats": repeats,
            "phases": phases, "total_seconds": total, "cpu_count": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version(),
            "secagg": secagg.__version__, "tenseal": tenseal.__version__, "numpy": np.__version__,
            "units": "medians over repeats; MB = 1e6 bytes; times in seconds; wire bytes as Receipt.wire_bytes",
        },
        "summary": summary,
        "runs": runs,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"JSON: {args.out}")
    all_passed = all(r["passed"] for rs in runs.values() for r in rs)
    if not all_passed:
        print("SOME RUNS FAILED their exactly-once or exactness checks: see the JSON", file=sys.stderr)
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
