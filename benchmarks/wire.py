"""Wire-format benchmark: secagg's format 2 side by side with the previous format, in one run.

Run from the repository root (``make bench`` does)::

    .venv/bin/python benchmarks/wire.py                       # 100k, 1M, 10M params, 3 repeats
    .venv/bin/python benchmarks/wire.py --quick               # smoke run, well under a minute
    .venv/bin/python benchmarks/wire.py --sizes 1M --repeats 5

For every model size it measures the current format (``secagg.updates``, ``secagg.polys``, a real
``secagg serve``) and the previous one (8c54b64: SEAL seeded blobs, SEAL load + ``add_inplace`` on
the aggregator, full ciphertexts back; ``benchmarks/_previous_format.py``) in the same process and
run: bytes per parameter up and down, client encrypt and decrypt, the aggregator's ingest per core,
the whole aggregator process's CPU time per update over gRPC, and its peak memory with 1 and 20
clients. Once per run it measures what decrypting costs per contributor (3, 20, 100), since a
client now rebuilds every contributor's second polynomial from its seed.

It prints a table and writes JSON (default ``benchmarks/results/wire.json``). Every timing is the
median of ``--repeats`` runs unless it says otherwise; ratios compare figures from the same run.
Nothing here asserts anything about time. ``benchmarks/README.md`` explains each figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import _previous_format as prev

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_SIZES = "100k,1M,10M"
DEFAULT_CONTRIBUTORS = "3,20,100"
DEFAULT_OUT = HERE / "results" / "wire.json"
SEED = 20240601
PARAM_STD = 0.05  # typical magnitude of trained weights; the round's default value bound is 100
TENSEAL_SLOTS = 4096  # CKKS slots at N = 8192: values per TenSEAL ckks_vector ciphertext
GRPC_FRAME = 5  # gRPC's per-message prefix: 1-byte compressed flag + 4-byte length
COHORT = 3  # the aggregator's default minimum cohort: every round here has at least this many contributions
AGGREGATOR_REPEATS = 5  # at least this many runs of the (cheap) in-process aggregator operations
# Round-trip weights: sample counts of three sites, below the default max weight 1e5.
ROUND_TRIP_WEIGHTS = (800.0, 1200.0, 2000.0)
# Goals of issue 10 (per parameter; the CPU goal per 1M-parameter update). Shown, never asserted.
GOALS = {"up": 8.1, "down": 8.2, "cpu_ms_per_M": 30.0, "ingest_rate": 200e6}

# A Keras text classifier (Embedding 20000x128, LSTM 256, LSTM 256, Dense 64, Dense 1), to show
# what one-ckks_vector-per-tensor costs in partly filled ciphertexts on a realistic split.
LSTM_LIKE_TENSORS = {
    "embedding": (20000, 128),
    "lstm1/kernel": (128, 1024), "lstm1/recurrent_kernel": (256, 1024), "lstm1/bias": (1024,),
    "lstm2/kernel": (256, 1024), "lstm2/recurrent_kernel": (256, 1024), "lstm2/bias": (1024,),
    "dense1/kernel": (256, 64), "dense1/bias": (64,),
    "dense2/kernel": (64, 1), "dense2/bias": (1,),
}


# ---------------------------------------------------------------------------------------------
# small helpers


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 100k, 1M, 2.5M, 50M or 123456")
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if n < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least 1 parameter")
    return int(round(n))


def make_theta(n: int, site: int = 0) -> np.ndarray:
    """The benchmark's model: n float32 values ~ N(0, 0.05), the same in every process (one per site)."""
    rng = np.random.default_rng([SEED, site])
    return rng.standard_normal(n, dtype=np.float32) * np.float32(PARAM_STD)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class Timings:
    """Wall time and CPU time (this process, all its threads) of repeated runs of one operation.

    Rates are per CPU-second: what one core does, whatever else runs on the machine (these machines
    are shared; wall time under load measures the neighbours too). Wall-time rates are kept as well.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def run(self, fn: Callable[[], object], record: bool = True):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if record:
            self.wall.append(wall)
            self.cpu.append(cpu)
        return out

    def figures(self, name: str, n: int) -> dict:
        return {f"{name}_seconds": self.wall, f"{name}_cpu_seconds": self.cpu,
                f"{name}_rate": n / median(self.cpu), f"{name}_wall_rate": n / median(self.wall)}


def proc_kb(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (VmHWM = peak RSS, VmRSS = current RSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (10 ms resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mb(kb: int) -> float:
    return kb * 1024 / 1e6


_STARTED = time.perf_counter()


def log(msg: str) -> None:
    print(f"[wire {time.perf_counter() - _STARTED:6.1f} s] {msg}", file=sys.stderr, flush=True)


class ServerProcess:
    """A server in its own process; its address is parsed from the 'serving on HOST:PORT' line."""

    def __init__(self, argv: list[str], log_path: Path, timeout: float = 60.0, env: dict | None = None,
                 cwd: Path | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env,
                                     cwd=cwd)
        self.pid = self.proc.pid
        end = time.monotonic() + timeout
        while True:
            text = log_path.read_text(errors="replace")
            m = re.search(r"serving on (\S+:\d+)", text)
            if m:
                self.address = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"server {' '.join(argv)} did not start:\n{text[-2000:]}")
            time.sleep(0.05)

    @classmethod
    def secagg(cls, server_key: Path, state_dir: Path, log_path: Path, extra: tuple[str, ...] = ()) -> "ServerProcess":
        return cls([sys.executable, "-m", "secagg.cli", "serve", "--key", str(server_key), "--listen", "127.0.0.1:0",
                    "--state-dir", str(state_dir), *extra], log_path)

    @classmethod
    def previous(cls, tree: Path, server_key: Path, state_dir: Path, log_path: Path) -> "ServerProcess":
        """8c54b64's own ``secagg serve`` (``_previous_format.extract_previous_tree``)."""
        return cls([sys.executable, "-m", "secagg.cli", "serve", "--key", str(server_key), "--listen", "127.0.0.1:0",
                    "--state-dir", str(state_dir)], log_path, env=prev.previous_env(tree), cwd=tree)

    @classmethod
    def plain(cls, log_path: Path) -> "ServerProcess":
        return cls([sys.executable, str(HERE / "_plain_server.py"), "--listen", "127.0.0.1:0"], log_path)

    def _pids(self) -> list[int]:
        """The server and its running children (``secagg serve --ingest-workers``): figures count them all."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [self.pid, *map(int, f.read().split())]
        except OSError:
            return [self.pid]

    def _sum(self, figure: Callable[[int], float]) -> float:
        total = 0
        for pid in self._pids():
            try:
                total += figure(pid)
            except (OSError, RuntimeError):  # a child that just ended
                if pid == self.pid:
                    raise
        return total

    def peak_rss_kb(self) -> int:
        return self._sum(lambda pid: proc_kb(pid, "VmHWM"))

    def rss_kb(self) -> int:
        return self._sum(lambda pid: proc_kb(pid, "VmRSS"))

    def cpu_seconds(self) -> float:
        return self._sum(proc_cpu_seconds)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_groups(server: ServerProcess, submit: Callable[[int], None], groups: list[int]) -> list[dict]:
    """Submit in groups (``submit(i)`` sends the i-th update); the server's CPU time and memory around each group."""
    out, sent = [], 0
    for size in groups:
        cpu0, w0 = server.cpu_seconds(), time.perf_counter()
        for _ in range(size):
            submit(sent)
            sent += 1
        w1, cpu1 = time.perf_counter(), server.cpu_seconds()
        out.append({"submissions": size, "wall_seconds": w1 - w0, "server_cpu_seconds": cpu1 - cpu0,
                    "server_rss_kb": server.rss_kb(), "server_peak_rss_kb": server.peak_rss_kb()})
    return out


def grpc_figures(groups: list[dict], n: int, batches: slice) -> dict:
    """CPU ms per update (median over the timed batches), per 1M params, and the wall submit rate."""
    timed_groups = groups[batches]
    per_update = [g["server_cpu_seconds"] / g["submissions"] for g in timed_groups]
    walls = [g["wall_seconds"] / g["submissions"] for g in timed_groups]
    return {
        "cpu_seconds_per_update": per_update,
        "cpu_ms_per_update": 1e3 * median(per_update),
        "cpu_ms_per_M_params": 1e3 * median(per_update) * 1e6 / n,
        "wall_seconds_per_update": walls,
        "submit_rate": n / median(walls),
    }


# ---------------------------------------------------------------------------------------------
# message sizes as gRPC carries them (protobuf messages + 5-byte prefixes; HTTP/2 framing not counted)


def submit_wire_bytes(header, chunks) -> int:
    """Bytes of one Submit stream: the header message (with the contribution record) and every chunk."""
    from secagg.transport import secagg_pb2 as pb
    from secagg.transport.server import chunk_to_pb, record_to_pb

    total = pb.SubmitMessage(header=pb.UpdateHeader(
        format_version=header.format_version, round_id=header.round_id, client_id=header.client_id,
        key_id=header.key_id, spec_hash=header.spec_hash, num_ciphertexts=header.num_ciphertexts,
        num_chunks=header.num_chunks, digest=header.digest, contribution=record_to_pb(header.contribution),
    )).ByteSize() + GRPC_FRAME
    for c in chunks:
        total += pb.SubmitMessage(chunk=chunk_to_pb(c)).ByteSize() + GRPC_FRAME
    return total


def fetch_wire_bytes(agg, chunks) -> tuple[int, int]:
    """(all bytes, the seeds' bytes) of one FetchAggregate stream, built as the servicer builds it."""
    from secagg.transport import secagg_pb2 as pb
    from secagg.transport.server import chunk_to_pb, record_to_pb

    h = agg.header
    total = pb.AggregateMessage(header=pb.AggregateHeader(
        round_id=h.round_id, key_id=h.key_id, spec_hash=h.spec_hash, contributions=agg.contributions,
        clients=list(agg.clients), num_ciphertexts=h.num_ciphertexts, num_chunks=h.num_chunks, digest=h.digest,
        records=[record_to_pb(r) for r in agg.records],
    )).ByteSize() + GRPC_FRAME
    seeds = 0
    for c in chunks:
        total += pb.AggregateMessage(chunk=chunk_to_pb(c)).ByteSize() + GRPC_FRAME
        seeds += sum(map(len, c.seeds))
    return total, seeds


def as_client(update, key, status, client_id: str):
    """``update``'s header for another client id, with that client's own contribution record (tag).

    The aggregator's work does not depend on the values, so one encryption serves as N clients'
    updates: it checks and adds every coefficient, hashes and stores every byte, for each of them.
    """
    from secagg import contribution

    r = update.header.contribution
    record = contribution.make(key, status.terms(), client_id, r.digest, r.seeds_digest)
    return dataclasses.replace(update.header, client_id=client_id, contribution=record)


def release_tolerance(status, weights: list[float], average: np.ndarray) -> float:
    """How far a released average may be from the float64 one: a grid step over the encoded total weight."""
    from secagg.release import grid
    from secagg.slots import VALUE_LIMIT

    headroom = VALUE_LIMIT / (status.expected * status.value_bound)
    encoded = headroom * sum(weights) / status.max_weight
    return grid(len(weights)) * (1 + float(np.max(np.abs(average)))) / encoded


# ---------------------------------------------------------------------------------------------
# 1. in one process: client encrypt/decrypt, aggregator ingest (current format)


def core_round(core, round_id: str, n: int, clients: int):
    """A round on the library core (no gRPC): its status as a client sees it."""
    from secagg.packing import ModelSpec
    from secagg.rounds import RoundConfig

    spec = ModelSpec.of({"w": np.zeros(n, np.float32)})
    return core.create_round(RoundConfig(round_id, spec, clients, clients, None)), spec


def open_sum(key, status, spec, agg, chunks):
    """What fetch_average does after the download: envelope checks, then open_aggregate."""
    from secagg import updates

    pairs = list(updates.open_chunks(key, status, agg.header, agg.contributions, chunks))
    return updates.open_aggregate(key, status, spec, list(agg.records), pairs)


def bench_new_local(tmp: Path, label: str, key, server_key, theta: np.ndarray, repeats: int) -> dict:
    from secagg import ciphertexts, updates
    from secagg.envelope import ChunkValidator
    from secagg.polys import C0Sum, c0_bytes, parse_c0
    from secagg.rounds import Aggregator

    n = theta.size
    core = Aggregator(server_key, tmp / f"core-{label}")
    round_id = f"local-{label}"
    status, spec = core_round(core, round_id, n, COHORT)
    ciphertexts.codec(key)  # SEAL's objects are built once per process and key: not part of any timing
    enc, sealed = Timings(), []
    for i in range(max(repeats, COHORT)):  # each a real, distinct encryption by its own client
        sealed.append(enc.run(lambda i=i: updates.seal_update(key, status, f"site-{i}", theta, 1.0), i < repeats))
    update = sealed[0]
    params = server_key.parameters
    c0s = [c0 for c in update.chunks for c0 in c.c0s]

    # Aggregator, one core: parse_c0 (exact size, every coefficient < q) + C0Sum.add, per ciphertext.
    acc = C0Sum(params, len(c0s))
    for i, c0 in enumerate(c0s):
        acc.add(i, parse_c0(params, c0))
    ingest, add, env = Timings(), Timings(), Timings()

    def ingest_all():
        for i, c0 in enumerate(c0s):
            acc.add(i, parse_c0(params, c0))

    def add_all():
        for i, words in enumerate(parsed):
            acc.add(i, words)

    def envelope_checks():
        v = ChunkValidator(update.header, c0_bytes(params))
        for chunk in update.chunks:
            v.accept(chunk)
        v.finish()

    parsed = [parse_c0(params, c0) for c0 in c0s]
    for timings, fn in ((ingest, ingest_all), (add, add_all), (env, envelope_checks)):
        for _ in range(max(repeats, AGGREGATOR_REPEATS)):
            timings.run(fn)

    # A real 3-contribution sum from the core, opened as a client opens it.
    for u in sealed[:COHORT]:
        core.submit(u.header, iter(u.chunks))
    status = core.status(round_id)
    assert status.state == "closed", status
    agg = core.aggregate(round_id)
    chunks = list(agg.chunks())
    down, seeds = fetch_wire_bytes(agg, chunks)
    dec = Timings()
    for _ in range(repeats):
        average = dec.run(lambda: open_sum(key, status, spec, agg, chunks))
    err = float(np.max(np.abs(average.vector - theta)))
    return {
        "num_ciphertexts": len(c0s),
        "update_payload_bytes": update.wire_bytes,
        **enc.figures("encrypt", n), **ingest.figures("ingest", n), **add.figures("add_only", n),
        **env.figures("envelope_check", n),
        "decrypt_contributions": COHORT,
        **dec.figures("decrypt", n),
        "download_bytes": down,
        "download_seed_bytes": seeds,
        "download_bytes_per_param_without_seeds": (down - seeds) / n,
        "seed_bytes_per_param_per_contributor": seeds / COHORT / n,
        "max_abs_error": err,
        "release_tolerance": release_tolerance(status, [1.0] * COHORT, theta),
    }


def bench_previous_local(key, theta: np.ndarray, repeats: int) -> dict:
    """The previous format's client and aggregator arithmetic (the copies in _previous_format.py)."""
    n = theta.size
    bounds = prev.Bounds(COHORT, 1e5, 100.0)
    def encrypt_and_seal():
        blobs = prev.encrypt(key, prev.encode_update(theta, 1.0, bounds))
        return blobs, prev.seal_update(blobs)

    enc, encrypted = Timings(), []
    for i in range(max(repeats, COHORT)):
        encrypted.append(enc.run(encrypt_and_seal, i < repeats))
    blobs, (digest, chunks) = encrypted[0]

    agg_key = prev.AggregatorKey()
    acc = prev.EncryptedSum(agg_key, len(blobs))
    for i, b in enumerate(blobs):  # every position holds a ciphertext: every timed add is parse + add
        acc.add(i, b)
    ingest, add, env = Timings(), Timings(), Timings()

    def ingest_all():
        for i, b in enumerate(blobs):
            acc.add(i, b)

    def add_all():
        for i, ct in enumerate(parsed):
            acc.add_parsed(i, ct)

    def envelope_checks():
        v = prev.ChunkValidator(len(blobs), len(chunks), digest)
        for chunk in chunks:
            v.accept(chunk)
        v.finish()

    parsed = [prev.load_ciphertext(agg_key, b) for b in blobs]
    for timings, fn in ((ingest, ingest_all), (add, add_all), (env, envelope_checks)):
        for _ in range(max(repeats, AGGREGATOR_REPEATS)):
            timings.run(fn)

    total = prev.EncryptedSum(agg_key, len(blobs))
    for bl, _ in encrypted[:COHORT]:
        for i, b in enumerate(bl):
            total.add(i, b)
    sum_blobs = list(total.iter_blobs())
    dec = Timings()
    for _ in range(repeats):
        mean = dec.run(lambda: prev.decode_aggregate(prev.decrypt(key, sum_blobs, n + prev.EXTRA_SLOTS), COHORT,
                                                     bounds)[0])
    return {
        "num_ciphertexts": len(blobs),
        "ciphertext_bytes_each": len(blobs[0]),
        "ciphertext_bytes": sum(map(len, blobs)),
        **enc.figures("encrypt", n), **ingest.figures("ingest", n), **add.figures("add_only", n),
        **env.figures("envelope_check", n),
        "decrypt_contributions": COHORT,
        **dec.figures("decrypt", n),
        "aggregate_ciphertext_bytes": sum(map(len, sum_blobs)),
        "aggregate_bytes_per_param": sum(map(len, sum_blobs)) / n,
        "max_abs_error": float(np.max(np.abs(mean - theta))),
    }


# ---------------------------------------------------------------------------------------------
# 2. the whole aggregator process over gRPC: CPU per update, and peak memory


def bench_grpc_new(tmp: Path, label: str, paths, key, theta: np.ndarray, groups: list[int], tag: str) -> dict:
    """Fresh ``secagg serve``; one round expecting sum(groups) clients; submissions in groups."""
    import secagg
    from secagg import updates
    from secagg.transport.client import AggregatorClient

    n = theta.size
    server = ServerProcess.secagg(paths.server, tmp / f"state-{tag}-{label}", tmp / f"{tag}-{label}.log")
    with server, AggregatorClient(server.address) as client:
        client.server_info()
        idle = server.rss_kb()
        round_id = f"{tag}-{label}"
        status = secagg.create_round(server.address, round_id, {"w": np.zeros(n, np.float32)}, clients=sum(groups))
        update = updates.seal_update(key, status, "site-0000", theta, 1.0)

        def submit(i: int) -> None:
            client.submit(as_client(update, key, status, f"site-{i:04d}"), update.chunks)

        out = {"idle_rss_kb": idle, "submit_wire_bytes": submit_wire_bytes(update.header, update.chunks),
               "groups": run_groups(server, submit, groups)}
        out["round_state"] = client.status(round_id)[0].state
    return out


def bench_grpc_previous(tmp: Path, label: str, tree: Path, keys: Path, n: int, groups: list[int], tag: str,
                        fetch: bool = False) -> dict:
    """8c54b64's ``secagg serve``, driven by 8c54b64's client code (``_previous_format.py submit``)."""
    server = ServerProcess.previous(tree, keys / "server.key", tmp / f"prev-state-{tag}-{label}",
                                    tmp / f"prev-{tag}-{label}.log")
    with server:
        argv = [sys.executable, str(HERE / "_previous_format.py"), "submit", "--tree", str(tree),
                "--server", server.address, "--server-pid", str(server.pid), "--client-key", str(keys / "client.key"),
                "--round", f"{tag}-{label}", "--params", str(n), "--groups", ",".join(map(str, groups)),
                "--seed", str(SEED)] + (["--fetch"] if fetch else [])
        done = subprocess.run(argv, capture_output=True, text=True, env=prev.previous_env(tree), cwd=tree, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"the previous format's client failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def bench_grpc_plain(tmp: Path, label: str, theta32: np.ndarray, groups: list[int]) -> dict:
    """Plain float32 in the same stream layout to ``_plain_server.py`` (no encryption, no disk)."""
    from secagg import envelope
    from secagg.contribution import Contribution
    from secagg.transport.client import AggregatorClient

    blobs = float32_blobs(theta32)
    chunks = envelope.split_chunks([(b, b"") for b in blobs])
    digest = envelope.update_digest(c.digest for c in chunks)
    server = ServerProcess.plain(tmp / f"plain-{label}.log")
    with server, AggregatorClient(server.address) as client:
        def header(i: int):
            cid = f"site-{i:04d}"
            return envelope.Header(f"plain-{label}", cid, "plain", "plain", len(blobs), len(chunks), digest,
                                   Contribution(cid, digest, b"", b""))

        return {"submit_wire_bytes": submit_wire_bytes(header(0), chunks),
                "groups": run_groups(server, lambda i: client.submit(header(i), chunks), groups)}


def float32_blobs(theta32: np.ndarray) -> list[bytes]:
    """The plain baseline's payload: little-endian float32, 8192 values per blob (the last one zero-padded)."""
    padded = np.zeros(-(-theta32.size // 8192) * 8192, dtype="<f4")
    padded[: theta32.size] = theta32
    raw = padded.tobytes()
    step = 8192 * 4
    return [raw[i : i + step] for i in range(0, len(raw), step)]


def memory_figures(run: dict, n: int) -> dict:
    groups = run["groups"]
    first, last = groups[0]["server_peak_rss_kb"], groups[-1]["server_peak_rss_kb"]
    return {
        "clients": len(groups),
        "round_state_after": run["round_state"],
        "idle_rss_mb": mb(run["idle_rss_kb"]),
        "peak_rss_after_first_update_mb": mb(first),
        "peak_rss_at_close_mb": mb(last),
        "peak_rss_after_each_update_mb": [mb(g["server_peak_rss_kb"]) for g in groups],
        "growth_at_close_mb": mb(last - run["idle_rss_kb"]),
        "peak_bytes_per_param": last * 1024 / n,
    }


# ---------------------------------------------------------------------------------------------
# 3. once per run: decrypting costs one seed expansion per contributor and ciphertext


def bench_contributors(tmp: Path, key, server_key, n: int, counts: list[int], repeats: int) -> dict:
    from secagg import updates
    from secagg.rounds import Aggregator

    theta = make_theta(n).astype(np.float64)
    core = Aggregator(server_key, tmp / "core-contributors")
    out: dict = {"num_params": n, "contributors": {}}
    for k in counts:
        round_id = f"contributors-{k}"
        status, spec = core_round(core, round_id, n, k)
        enc = Timings()
        for i in range(k):  # k real encryptions: the check slots assume independent encryption noise
            update = enc.run(lambda i=i: updates.seal_update(key, status, f"site-{i:04d}", theta, 1.0))
            core.submit(update.header, iter(update.chunks))
        status = core.status(round_id)
        agg = core.aggregate(round_id)
        chunks = list(agg.chunks())
        down, seeds = fetch_wire_bytes(agg, chunks)
        dec = Timings()
        for _ in range(repeats):
            average = dec.run(lambda: open_sum(key, status, spec, agg, chunks))
        out["contributors"][str(k)] = {
            **enc.figures("encrypt", n), **dec.figures("decrypt", n),
            "download_bytes": down,
            "download_bytes_per_param": down / n,
            "download_seed_bytes_per_param": seeds / n,
            "max_abs_error": float(np.max(np.abs(average.vector - theta))),
        }
        log(f"  {k} contributors: decrypt {median(dec.cpu):.2f} CPU s")
    # Least-squares line through (contributors, median CPU seconds): the cost of one more contributor.
    ks = np.array(counts, dtype=float)
    ts = np.array([median(out["contributors"][str(k)]["decrypt_cpu_seconds"]) for k in counts])
    if len(counts) >= 2:
        slope, intercept = np.polyfit(ks, ts, 1)
        out["seconds_per_contributor"] = float(slope)
        out["ms_per_contributor_per_M_params"] = 1e3 * float(slope) * 1e6 / n
        out["intercept_seconds"] = float(intercept)
    bounds = prev.Bounds(COHORT, 1e5, 100.0)
    blobs = prev.encrypt(key, prev.encode_update(theta, 1.0, bounds))
    total = prev.EncryptedSum(prev.AggregatorKey(), len(blobs))
    for _ in range(COHORT):
        for i, b in enumerate(blobs):
            total.add(i, b)
    sum_blobs = list(total.iter_blobs())
    dec = Timings()
    for _ in range(repeats):
        dec.run(lambda: prev.decode_aggregate(prev.decrypt(key, sum_blobs, n + prev.EXTRA_SLOTS), COHORT, bounds))
    out["previous"] = {**dec.figures("decrypt", n), "download_bytes_per_param": sum(map(len, sum_blobs)) / n}
    return out


# ---------------------------------------------------------------------------------------------
# 4. other layouts, same run: the common TenSEAL layout


def tenseal_context():
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40])
    ctx.global_scale = 2**40
    return ctx


def tenseal_context_sizes() -> dict:
    """What the naive approach ships with each update: the serialized context and its keys."""
    ctx = tenseal_context()
    default = len(ctx.serialize())  # public + relinearization keys (TenSEAL's defaults), no secret key
    ctx.generate_galois_keys()
    return {"default_keys_bytes": default, "with_galois_keys_bytes": len(ctx.serialize())}


def bench_tenseal_common(sample: np.ndarray, repeats: int) -> dict:
    """One ts.ckks_vector per 4096 values (fully packed: the best case of one vector per tensor)."""
    import tenseal as ts

    ctx = tenseal_context()
    n = sample.size
    pieces = [sample[i : i + TENSEAL_SLOTS] for i in range(0, n, TENSEAL_SLOTS)]
    enc, ingest, dec = Timings(), Timings(), Timings()
    for _ in range(repeats):
        blobs = enc.run(lambda: [ts.ckks_vector(ctx, p).serialize() for p in pieces])
    acc = [ts.ckks_vector_from(ctx, b) for b in blobs]

    def ingest_all():
        for a, b in zip(acc, blobs):
            a.add_(ts.ckks_vector_from(ctx, b))

    for _ in range(repeats):
        ingest.run(ingest_all)
    sum_blobs = [a.serialize() for a in acc]
    for _ in range(repeats):
        dec.run(lambda: [ts.ckks_vector_from(ctx, b).decrypt() for b in sum_blobs])
    return {"measured_params": n, "bytes_per_param": sum(map(len, blobs)) / n, **enc.figures("encrypt", n),
            **ingest.figures("ingest", n), **dec.figures("decrypt", n)}


def lstm_like_padding() -> dict:
    from secagg.slots import num_ciphertexts

    sizes = [int(np.prod(s)) for s in LSTM_LIKE_TENSORS.values()]
    total = sum(sizes)
    per_tensor = sum(-(-s // TENSEAL_SLOTS) for s in sizes)
    packed = -(-total // TENSEAL_SLOTS)
    return {"num_params": total, "tensors": len(sizes), "ckks_vectors_per_tensor": per_tensor,
            "ckks_vectors_fully_packed": packed, "overhead": per_tensor / packed - 1,
            "secagg_ciphertexts": num_ciphertexts(total)}


# ---------------------------------------------------------------------------------------------
# 5. round trip through the public API: 3 sites, fresh processes


def _roundtrip_child(conn, address: str, client_key: str, round_id: str, n: int) -> None:
    import secagg

    pid = os.getpid()
    base_kb = proc_kb(pid, "VmRSS")
    key = secagg.load_client_key(client_key)
    models = [make_theta(n, site) for site in range(len(ROUND_TRIP_WEIGHTS))]
    receipts, walls = [], []
    for site, (model, weight) in enumerate(zip(models, ROUND_TRIP_WEIGHTS)):
        t0 = time.perf_counter()
        receipts.append(secagg.submit(address, round_id, key, f"rt-site-{site}", {"w": model}, weight=weight))
        walls.append(time.perf_counter() - t0)
    t1 = time.perf_counter()
    average = secagg.fetch_average(address, round_id, key, wait=60.0)
    fetch_s = time.perf_counter() - t1
    expected = sum(w * m.astype(np.float64) for m, w in zip(models, ROUND_TRIP_WEIGHTS)) / sum(ROUND_TRIP_WEIGHTS)
    status = secagg.round_status(address, round_id)
    conn.send({
        "submit_seconds": walls,
        "encrypt_seconds": [r.encrypt_seconds for r in receipts],
        "send_seconds": [r.send_seconds for r in receipts],
        "receipt_wire_bytes": receipts[0].wire_bytes,
        "fetch_seconds": fetch_s,
        "contributions": average.contributions,
        "max_abs_error": float(np.max(np.abs(average.vector - expected))),
        "release_tolerance": release_tolerance(status, list(ROUND_TRIP_WEIGHTS), expected),
        "client_baseline_rss_mb": mb(base_kb),
        "client_peak_rss_mb": mb(proc_kb(pid, "VmHWM")),
    })
    conn.close()


def bench_roundtrip(tmp: Path, label: str, paths, n: int) -> dict:
    import secagg

    server = ServerProcess.secagg(paths.server, tmp / f"state-roundtrip-{label}", tmp / f"roundtrip-{label}.log")
    with server:
        round_id = f"rt-{label}"
        secagg.create_round(server.address, round_id, {"w": np.zeros(n, np.float32)}, clients=len(ROUND_TRIP_WEIGHTS))
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_roundtrip_child, args=(child, server.address, str(paths.client), round_id, n))
        proc.start()
        child.close()
        try:
            result = parent.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"round-trip child failed (exit code {proc.exitcode}); see the traceback above")
        proc.join()
        result["server_peak_rss_mb"] = mb(server.peak_rss_kb())
    return result


# ---------------------------------------------------------------------------------------------
# one size


def cpu_batch(n: int, batch_params: int) -> int:
    """Submissions per timed batch: enough CPU time for the 10 ms clock (about batch_params parameters)."""
    return max(3, min(100, math.ceil(batch_params / n)))


def bench_size(tmp: Path, label: str, n: int, args, ctx: dict) -> dict:
    key, server_key, paths = ctx["key"], ctx["server_key"], ctx["paths"]
    repeats = args.repeats
    r: dict = {"num_params": n}
    theta32 = make_theta(n)
    theta = theta32.astype(np.float64)
    log(f"{label}: client and aggregator arithmetic, current format")
    r["new"] = bench_new_local(tmp, label, key, server_key, theta, repeats)
    log(f"{label}: client and aggregator arithmetic, previous format (copies)")
    r["previous"] = bench_previous_local(key, theta, repeats)

    batch = cpu_batch(n, args.batch_params)
    groups = [1] + [batch] * repeats + [1]  # warm-up, timed batches, the submission that closes the round
    timed_batches = slice(1, 1 + repeats)
    log(f"{label}: gRPC into a real secagg serve, {repeats} x {batch} submissions")
    g = bench_grpc_new(tmp, label, paths, key, theta, groups, "cpu")
    r["grpc_new"] = {**g, **grpc_figures(g["groups"], n, timed_batches),
                     "wire_bytes_per_param": g["submit_wire_bytes"] / n,
                     "close_cpu_seconds": g["groups"][-1]["server_cpu_seconds"]}
    log(f"{label}: gRPC into a plain float32 server")
    g = bench_grpc_plain(tmp, label, theta32, groups[:-1])
    r["grpc_plain"] = {**g, **grpc_figures(g["groups"], n, timed_batches),
                       "wire_bytes_per_param": g["submit_wire_bytes"] / n}
    if ctx.get("tree"):
        log(f"{label}: gRPC into 8c54b64's secagg serve")
        g = bench_grpc_previous(tmp, label, ctx["tree"], ctx["prev_keys"], n, groups, "cpu", fetch=True)
        r["grpc_previous"] = {**g, **grpc_figures(g["groups"], n, timed_batches),
                              "wire_bytes_per_param": g["submit_wire_bytes"] / n,
                              "fetch_bytes_per_param": g.get("fetch_wire_bytes", 0) / n,
                              "close_cpu_seconds": g["groups"][-1]["server_cpu_seconds"]}

    r["memory"] = {"new": {}, "previous": {}}
    for count in args.clients_memory:
        log(f"{label}: aggregator memory, {count} clients")
        m = bench_grpc_new(tmp, label, paths, key, theta, [1] * count, f"mem{count}")
        r["memory"]["new"][str(count)] = memory_figures(m, n)
        if ctx.get("tree"):
            m = bench_grpc_previous(tmp, label, ctx["tree"], ctx["prev_keys"], n, [1] * count, f"mem{count}")
            r["memory"]["previous"][str(count)] = memory_figures(m, n)

    sample = theta[: min(n, args.common_sample)]
    log(f"{label}: TenSEAL common layout on {sample.size:,} params")
    r["tenseal_common"] = bench_tenseal_common(sample, repeats)
    del theta, theta32
    log(f"{label}: round trip through secagg.submit + secagg.fetch_average (3 sites)")
    r["round_trip"] = bench_roundtrip(tmp, label, paths, n)
    r["ratios"] = ratios(r, args.clients_memory)
    return r


def ratios(r: dict, clients: list[int]) -> dict:
    """new / previous for every figure measured both ways in this run (and memory: most / fewest clients)."""
    new, old = r["new"], r["previous"]
    out = {
        "encrypt_rate": new["encrypt_rate"] / old["encrypt_rate"],
        "decrypt_rate": new["decrypt_rate"] / old["decrypt_rate"],
        "ingest_rate": new["ingest_rate"] / old["ingest_rate"],
        "add_only_rate": new["add_only_rate"] / old["add_only_rate"],
        "envelope_check_rate": new["envelope_check_rate"] / old["envelope_check_rate"],
        "download_bytes_without_seeds": new["download_bytes_per_param_without_seeds"] / old["aggregate_bytes_per_param"],
    }
    gp = r.get("grpc_previous")
    if gp:
        gn = r["grpc_new"]
        out["upload_bytes"] = gn["wire_bytes_per_param"] / gp["wire_bytes_per_param"]
        out["server_cpu_per_update"] = gn["cpu_ms_per_update"] / gp["cpu_ms_per_update"] if gp["cpu_ms_per_update"] else None
        out["submit_rate"] = gn["submit_rate"] / gp["submit_rate"]
    lo, hi = str(min(clients)), str(max(clients))
    for fmt in ("new", "previous"):
        m = r["memory"][fmt]
        if hi in m:
            out[f"memory_{fmt}_peak_{hi}_over_first_update"] = (m[hi]["peak_rss_at_close_mb"]
                                                                / m[hi]["peak_rss_after_first_update_mb"])
            out[f"memory_{fmt}_peak_{hi}_over_{lo}"] = m[hi]["peak_rss_at_close_mb"] / m[lo]["peak_rss_at_close_mb"]
    return out


# ---------------------------------------------------------------------------------------------
# table


def fmt_rate(r: float | None) -> str:
    return "-" if not r else f"{r / 1e6:.3g}"


def fmt_x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def mark(ok: bool | None) -> str:
    return "" if ok is None else (" ok" if ok else " MISS")


def size_block(label: str, r: dict, clients: list[int]) -> list[str]:
    """One size's rows: figure, current format, previous format, new/previous, goal."""
    n = r["num_params"]
    new, old, gn, gp, gpl = r["new"], r["previous"], r["grpc_new"], r.get("grpc_previous", {}), r["grpc_plain"]
    hi = str(max(clients))
    mem_new, mem_old = r["memory"]["new"], r["memory"]["previous"]

    def get(d: dict, *path):
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return d

    up_new, up_old = gn["wire_bytes_per_param"], gp.get("wire_bytes_per_param")
    down_new = new["download_bytes_per_param_without_seeds"]
    down_old = gp.get("fetch_bytes_per_param") or old["aggregate_bytes_per_param"]
    seed_pp = new["seed_bytes_per_param_per_contributor"]
    cpu_new, cpu_old = gn["cpu_ms_per_M_params"], gp.get("cpu_ms_per_M_params")
    rows: list = [
        f"== {label} ({n:,} parameters; {new['num_ciphertexts']} ciphertexts) ==",
        ("", "format 2", "previous", "new/prev", "goal"),
        "Wire (bytes/param as gRPC carries them: protobuf messages + 5-byte prefixes)",
        ("upload: one Submit stream", f"{up_new:.3f}", f"{up_old:.3f}" if up_old else "-", fmt_x(up_new, up_old),
         f"<= {GOALS['up']}{mark(up_new <= GOALS['up'])}"),
        ("download: c0 sum + envelope, without seeds", f"{down_new:.3f}", f"{down_old:.3f}", fmt_x(down_new, down_old),
         f"<= {GOALS['down']}{mark(down_new <= GOALS['down'])}"),
        ("  + seeds, per contributor", f"{seed_pp:.4f}", "0", "", ""),
        (f"  download with {COHORT} contributors", f"{down_new + COHORT * seed_pp:.3f}", f"{down_old:.3f}",
         fmt_x(down_new + COHORT * seed_pp, down_old), ""),
        "Aggregator, whole `secagg serve` process over gRPC (CPU from /proc, median of the batches)",
        ("CPU ms per update", f"{gn['cpu_ms_per_update']:.1f}", f"{gp['cpu_ms_per_update']:.1f}" if gp else "-",
         fmt_x(gn["cpu_ms_per_update"], gp.get("cpu_ms_per_update")), ""),
        ("CPU ms per 1M-parameter update", f"{cpu_new:.1f}", f"{cpu_old:.1f}" if cpu_old else "-", fmt_x(cpu_new, cpu_old),
         f"<= {GOALS['cpu_ms_per_M']:g}{mark(cpu_new <= GOALS['cpu_ms_per_M'])}"),
        ("submit wall rate, M params/s (one client at a time)", fmt_rate(gn["submit_rate"]), fmt_rate(gp.get("submit_rate")),
         fmt_x(gn["submit_rate"], gp.get("submit_rate")), ""),
        ("closing submission: CPU ms (accept + write the sum)", f"{1e3 * gn['close_cpu_seconds']:.0f}",
         f"{1e3 * gp['close_cpu_seconds']:.0f}" if gp else "-", "", ""),
        ("plain float32 server (reference): CPU ms per 1M params", f"{gpl['cpu_ms_per_M_params']:.1f}", "", "", ""),
        "Aggregator, one core in one process (M params per CPU-second)",
        ("ingest: check + add (new: parse_c0 + C0Sum.add; prev: SEAL load + add_inplace)", fmt_rate(new["ingest_rate"]),
         fmt_rate(old["ingest_rate"]), fmt_x(new["ingest_rate"], old["ingest_rate"]),
         f">= {GOALS['ingest_rate'] / 1e6:g}{mark(new['ingest_rate'] >= GOALS['ingest_rate'])}"),
        ("add only (C0Sum.add / Evaluator.add_inplace)", fmt_rate(new["add_only_rate"]), fmt_rate(old["add_only_rate"]),
         fmt_x(new["add_only_rate"], old["add_only_rate"]), ""),
        ("envelope checks (SHA-256 chunk digests, both formats)", fmt_rate(new["envelope_check_rate"]),
         fmt_rate(old["envelope_check_rate"]), fmt_x(new["envelope_check_rate"], old["envelope_check_rate"]), ""),
        "Client, one process (M params per CPU-second)",
        ("encrypt (new: seal_update; prev: encode + encrypt + seal)", fmt_rate(new["encrypt_rate"]),
         fmt_rate(old["encrypt_rate"]), fmt_x(new["encrypt_rate"], old["encrypt_rate"]), ""),
        (f"decrypt a {COHORT}-contributor sum (new: open_aggregate)", fmt_rate(new["decrypt_rate"]),
         fmt_rate(old["decrypt_rate"]), fmt_x(new["decrypt_rate"], old["decrypt_rate"]), ""),
        ("max |average - model| (release grid bound)", f"{new['max_abs_error']:.1e} ({new['release_tolerance']:.0e})",
         f"{old['max_abs_error']:.1e}", "", ""),
        "Aggregator peak RSS, MB (VmHWM; fresh process per round; one run)",
        ("idle server", _mb(get(mem_new, hi, "idle_rss_mb")), _mb(get(mem_old, hi, "idle_rss_mb")), "", ""),
        ("after its 1st update (1 client)", _mb(get(mem_new, hi, "peak_rss_after_first_update_mb")),
         _mb(get(mem_old, hi, "peak_rss_after_first_update_mb")), "", ""),
    ]
    for c in sorted({int(c) for c in clients}):
        rows.append((f"{c} clients, round closed", _mb(get(mem_new, str(c), "peak_rss_at_close_mb")),
                     _mb(get(mem_old, str(c), "peak_rss_at_close_mb")),
                     fmt_x(get(mem_new, str(c), "peak_rss_at_close_mb"), get(mem_old, str(c), "peak_rss_at_close_mb")), ""))
    rows.append((f"ratio {hi} clients / 1 client (same process)",
                 fmt_x(get(mem_new, hi, "peak_rss_at_close_mb"), get(mem_new, hi, "peak_rss_after_first_update_mb")),
                 fmt_x(get(mem_old, hi, "peak_rss_at_close_mb"), get(mem_old, hi, "peak_rss_after_first_update_mb")), "", ""))
    rt = r["round_trip"]
    t = r["tenseal_common"]
    rows += [
        f"Round trip, public API, {len(ROUND_TRIP_WEIGHTS)} sites in a fresh process (one run)",
        ("submit wall s, median (encrypt + send)", f"{median(rt['submit_seconds']):.2f}", "", "", ""),
        ("fetch_average wall s (download + checks + decrypt)", f"{rt['fetch_seconds']:.2f}", "", "", ""),
        ("max |average - weighted mean| (release grid bound)", f"{rt['max_abs_error']:.1e} ({rt['release_tolerance']:.0e})",
         "", "", ""),
        ("client / aggregator peak RSS MB", f"{rt['client_peak_rss_mb']:.0f} / {rt['server_peak_rss_mb']:.0f}", "", "", ""),
        f"Other layouts, same run (TenSEAL: one ckks_vector per 4096 values, [60,40,40], on {t['measured_params']:,} params)",
        ("TenSEAL: bytes/param; encrypt, ingest, decrypt M params/CPU-s",
         f"{t['bytes_per_param']:.1f}; {fmt_rate(t['encrypt_rate'])}, {fmt_rate(t['ingest_rate'])}, "
         f"{fmt_rate(t['decrypt_rate'])}", "", "", ""),
        ("plain float32, same stream layout: bytes/param", f"{gpl['wire_bytes_per_param']:.3f}", "", "", ""),
    ]
    return _render(rows)


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _render(rows: list) -> list[str]:
    width = 62
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        name, *cells = row
        if len(name) > width - 2:
            lines.append(f"  {name}")
            name = ""
        lines.append(f"  {name:{width - 2}}" + "".join(f"{c:>14}" for c in cells[:3]) + f"  {cells[3]}".rstrip())
    return lines


def contributors_block(c: dict) -> list[str]:
    n = c["num_params"]
    ks = list(c["contributors"])
    lines = [f"== Client decrypt vs contributors ({n:,} parameters; open_aggregate after the download checks) ==",
             f"  {'contributors':<40}" + "".join(f"{k:>10}" for k in ks) + f"{'previous':>12}"]
    row = lambda name, f, p: lines.append(f"  {name:<40}" + "".join(f"{f(c['contributors'][k]):>10}" for k in ks) + f"{p:>12}")
    row("encrypt M params/CPU-s (each contributor)", lambda d: fmt_rate(d["encrypt_rate"]), "")
    row("decrypt CPU s (median)", lambda d: f"{median(d['decrypt_cpu_seconds']):.3f}",
        f"{median(c['previous']['decrypt_cpu_seconds']):.3f}")
    row("decrypt M params/CPU-s", lambda d: fmt_rate(d["decrypt_rate"]), fmt_rate(c["previous"]["decrypt_rate"]))
    row("download bytes/param (all)", lambda d: f"{d['download_bytes_per_param']:.3f}",
        f"{c['previous']['download_bytes_per_param']:.3f}")
    row("  of which seeds", lambda d: f"{d['download_seed_bytes_per_param']:.3f}", "0")
    row("max |average - model|", lambda d: f"{d['max_abs_error']:.0e}", "")
    if "ms_per_contributor_per_M_params" in c:
        lines.append(f"  each contributor adds {c['ms_per_contributor_per_M_params']:.0f} ms of decrypt per 1M parameters "
                     f"(least-squares slope; the previous format's decrypt does not depend on it)")
    return lines


def render_table(results: dict, contributors: dict | None, clients: list[int], repeats: int, prev_note: str) -> str:
    lines = [f"secagg wire benchmark: format 2 vs the previous format ({prev.PREVIOUS_COMMIT}), same run; medians of "
             f"{repeats} run(s) unless noted",
             "new/prev = format 2 / previous for every row (bytes, ms: lower is better; rates: higher is better)",
             "in-process rates are per CPU-second of one process (per core); gRPC rows: the server process's own CPU time"]
    if prev_note:
        lines.append(prev_note)
    for label, r in results.items():
        lines.append("")
        lines += size_block(label, r, clients)
    if contributors:
        lines.append("")
        lines += contributors_block(contributors)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def previous_setup(tmp: Path, args) -> tuple[Path | None, Path | None, str]:
    """8c54b64's tree and a key pair made by its own keygen; (None, None, why) if git cannot give it."""
    if args.no_previous_server:
        return None, None, "previous aggregator process: skipped (--no-previous-server)"
    try:
        tree = Path(args.previous_tree) if args.previous_tree else prev.extract_previous_tree(REPO, tmp / "previous-tree")
        keys = tmp / "previous-keys"
        subprocess.run([sys.executable, "-m", "secagg.cli", "keygen", "--out", str(keys)], check=True,
                       capture_output=True, env=prev.previous_env(tree), cwd=tree, timeout=120)
        return tree, keys, ""
    except (OSError, subprocess.SubprocessError) as exc:
        return None, None, (f"previous aggregator process: not measured ({type(exc).__name__}: the repository's history "
                            f"must contain {prev.PREVIOUS_COMMIT}, or pass --previous-tree)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", help=f"comma-separated parameter counts (default {DEFAULT_SIZES}; --quick: 20k)")
    p.add_argument("--repeats", type=int, help="runs per timing; medians are reported (default 3; --quick: 1)")
    p.add_argument("--clients-memory", help="client counts of the memory rounds, each >= 3 (default 3,20; --quick: 3)")
    p.add_argument("--contributors",
                   help=f"contributor counts of the decrypt test, each >= 3 (default {DEFAULT_CONTRIBUTORS}; --quick: 3,20)")
    p.add_argument("--contributors-params", type=parse_size,
                   help="model size of the decrypt-vs-contributors test (default 1M; --quick: 20k)")
    p.add_argument("--batch-params", type=parse_size,
                   help="parameters per timed batch of gRPC submissions, 3 to 100 submissions (default 20M; --quick: 400k)")
    p.add_argument("--common-sample", type=parse_size, default=parse_size("1M"),
                   help="at most this many params for the TenSEAL common layout (default 1M); rates extrapolate")
    p.add_argument("--previous-tree", help=f"an extracted {prev.PREVIOUS_COMMIT} tree (default: git archive of this repo)")
    p.add_argument("--no-previous-server", action="store_true", help="skip the previous aggregator process")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--quick", action="store_true", help="smoke run (well under a minute)")
    args = p.parse_args(argv)

    labels = [s.strip() for s in (args.sizes or ("20k" if args.quick else DEFAULT_SIZES)).split(",") if s.strip()]
    if len(set(labels)) != len(labels):
        p.error("--sizes lists a size twice")
    sizes = {lbl: parse_size(lbl) for lbl in labels}
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.clients_memory = sorted({int(c) for c in (args.clients_memory or ("3" if args.quick else "3,20")).split(",")
                                  if c.strip()})
    counts = sorted({int(c) for c in (args.contributors or ("3,20" if args.quick else DEFAULT_CONTRIBUTORS)).split(",")
                     if c.strip()})
    if min(args.clients_memory, default=0) < COHORT or (counts and min(counts) < COHORT):
        p.error(f"every round needs at least {COHORT} contributions (the aggregator's minimum cohort)")
    args.contributors_params = args.contributors_params or parse_size("20k" if args.quick else "1M")
    args.batch_params = args.batch_params or parse_size("400k" if args.quick else "20M")

    import tenseal

    import secagg

    started = time.perf_counter()
    results: dict = {}
    contributors = None
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        paths = secagg.keygen(tmp / "keys")
        ctx = {"paths": paths, "key": secagg.load_client_key(paths.client), "server_key": secagg.load_server_key(paths.server)}
        ctx["tree"], ctx["prev_keys"], prev_note = previous_setup(tmp, args)
        if prev_note:
            log(prev_note)
        context_sizes = tenseal_context_sizes()
        for lbl in labels:
            t0 = time.perf_counter()
            results[lbl] = bench_size(tmp, lbl, sizes[lbl], args, ctx)
            results[lbl]["seconds"] = time.perf_counter() - t0
            log(f"{lbl}: done in {results[lbl]['seconds']:.0f} s")
        if counts:
            log(f"decrypt vs contributors ({','.join(map(str, counts))}) on {args.contributors_params:,} params")
            contributors = bench_contributors(tmp, ctx["key"], ctx["server_key"], args.contributors_params, counts,
                                              args.repeats)

    total = time.perf_counter() - started
    table = render_table(results, contributors, args.clients_memory, args.repeats, prev_note)
    padding = lstm_like_padding()
    one_offs = [
        f"TenSEAL context as the naive approach ships it with every update (one-off): "
        f"{context_sizes['default_keys_bytes'] / 1e6:.2f} MB with TenSEAL's default keys, "
        f"{context_sizes['with_galois_keys_bytes'] / 1e6:.1f} MB with Galois keys (secagg ships no key material).",
        f"One ckks_vector per tensor on an LSTM-like split ({padding['num_params']:,} params, {padding['tensors']} "
        f"tensors): {padding['ckks_vectors_per_tensor']} vectors instead of {padding['ckks_vectors_fully_packed']} "
        f"(+{100 * padding['overhead']:.1f}%); secagg packs it in {padding['secagg_ciphertexts']} ciphertexts.",
        f"Total run time {total:.0f} s on {os.cpu_count()} CPU(s).",
    ]
    print(table)
    print()
    print("\n".join(one_offs))

    doc = {
        "meta": {
            "started_unix": time.time() - total,
            "total_seconds": total,
            "argv": sys.argv[1:] if argv is None else argv,
            "sizes": sizes,
            "repeats": args.repeats,
            "clients_memory": args.clients_memory,
            "contributors": counts,
            "contributors_params": args.contributors_params,
            "batch_params": args.batch_params,
            "common_sample": args.common_sample,
            "previous_commit": prev.PREVIOUS_COMMIT,
            "previous_aggregator_process": prev_note or "measured",
            "goals": GOALS,
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "secagg": secagg.__version__,
            "tenseal": tenseal.__version__,
            "numpy": np.__version__,
            "benchmark_process_peak_rss_mb": mb(proc_kb(os.getpid(), "VmHWM")),
            "units": ("in-process rates are parameters per CPU-second of the benchmark process (medians; *_wall_rate: per "
                      "wall second); *_seconds (wall) and *_cpu_seconds lists hold every run; MB = 1e6 bytes"),
        },
        "tenseal_context_bytes": context_sizes,
        "lstm_like_split": padding,
        "results": results,
        "decrypt_vs_contributors": contributors,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
