"""Wire-format benchmark: what secagg's encrypted updates cost, next to plain float32 and TenSEAL.

Run from the repository root (``make bench`` does)::

    .venv/bin/python benchmarks/wire.py                       # 100k, 1M, 10M params, 3 repeats
    .venv/bin/python benchmarks/wire.py --quick               # smoke run, a few seconds
    .venv/bin/python benchmarks/wire.py --sizes 50M --repeats 1

It prints a table and writes JSON (default ``benchmarks/results/wire.json``). Every figure is the
median of ``--repeats`` runs unless it says otherwise; ratios compare figures from the same run.
Nothing here asserts anything about time. ``benchmarks/README.md`` explains each figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

HERE = Path(__file__).resolve().parent
DEFAULT_SIZES = "100k,1M,10M"
DEFAULT_OUT = HERE / "results" / "wire.json"
SEED = 20240601
PARAM_STD = 0.05  # typical magnitude of trained weights; the round's default value bound is 100
TENSEAL_SLOTS = 4096  # CKKS slots at N = 8192: values per TenSEAL ckks_vector ciphertext
GRPC_FRAME = 5  # gRPC's per-message prefix: 1-byte compressed flag + 4-byte length

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


def make_theta(n: int) -> np.ndarray:
    """The benchmark's model: n float32 values ~ N(0, 0.05), the same for every process."""
    rng = np.random.default_rng(SEED)
    return rng.standard_normal(n, dtype=np.float32) * np.float32(PARAM_STD)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def proc_kb(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (VmHWM = peak RSS, VmRSS = current RSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mb(kb: int) -> float:
    return kb * 1024 / 1e6


def log(msg: str) -> None:
    print(f"[wire] {msg}", file=sys.stderr, flush=True)


class ServerProcess:
    """A server in its own process; its address is parsed from the 'serving on HOST:PORT' line."""

    def __init__(self, argv: list[str], log_path: Path, timeout: float = 60.0) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
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
    def secagg(cls, server_key: Path, state_dir: Path, log_path: Path) -> "ServerProcess":
        return cls([sys.executable, "-m", "secagg.cli", "serve", "--key", str(server_key), "--listen", "127.0.0.1:0",
                    "--state-dir", str(state_dir)], log_path)

    @classmethod
    def plain(cls, log_path: Path) -> "ServerProcess":
        return cls([sys.executable, str(HERE / "_plain_server.py"), "--listen", "127.0.0.1:0"], log_path)

    def peak_rss_kb(self) -> int:
        return proc_kb(self.pid, "VmHWM")

    def rss_kb(self) -> int:
        return proc_kb(self.pid, "VmRSS")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

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


def submit_wire_bytes(header, chunks) -> int:
    """Bytes of one Submit stream as gRPC carries it: serialized messages plus the 5-byte prefixes.

    HTTP/2 adds about 9 bytes per 16 KiB DATA frame (0.05%) and one set of headers per call; those
    are not counted.
    """
    from secagg.transport import secagg_pb2 as pb
    from secagg.transport.server import chunk_to_pb

    total = pb.SubmitMessage(header=pb.UpdateHeader(
        format_version=header.format_version, round_id=header.round_id, client_id=header.client_id,
        key_id=header.key_id, spec_hash=header.spec_hash, num_ciphertexts=header.num_ciphertexts,
        num_chunks=header.num_chunks, digest=header.digest,
    )).ByteSize() + GRPC_FRAME
    for c in chunks:
        total += pb.SubmitMessage(chunk=chunk_to_pb(c)).ByteSize() + GRPC_FRAME
    return total


def float32_blobs(theta32: np.ndarray) -> list[bytes]:
    """The plain baseline's payload: little-endian float32, 8192 values per blob."""
    raw = theta32.astype("<f4", copy=False).tobytes()
    step = 8192 * 4
    return [raw[i : i + step] for i in range(0, len(raw), step)]


# ---------------------------------------------------------------------------------------------
# 1. secagg's format, in one process


def bench_secagg_local(ck, sk, theta: np.ndarray, repeats: int) -> tuple[dict, list[bytes]]:
    from secagg import ciphertexts
    from secagg.ciphertexts import Bounds, EncryptedSum

    n = theta.size
    bounds = Bounds(expected_clients=1, max_weight=1.0, value_bound=100.0)
    enc_t, blobs = [], None
    for _ in range(repeats):
        dt, blobs = timed(lambda: ciphertexts.encrypt(ck, ciphertexts.encode_update(theta, 1.0, bounds)))
        enc_t.append(dt)

    acc = EncryptedSum(sk, len(blobs))
    for i, b in enumerate(blobs):  # position i now holds a ciphertext: every timed add is parse + add
        acc.add(i, b)
    ingest_t = []
    for _ in range(repeats):
        def ingest():
            for i, b in enumerate(blobs):
                acc.add(i, b)
        ingest_t.append(timed(ingest)[0])

    parsed = [ciphertexts.load_ciphertext(sk, b) for b in blobs]
    add_t = []
    for _ in range(repeats):
        def add_only():
            for i, ct in enumerate(parsed):
                acc.add_parsed(i, ct)
        add_t.append(timed(add_only)[0])
    del parsed

    sum_blobs = list(acc.iter_blobs())
    total_adds = 1 + 2 * repeats
    dec_t, vec = [], None
    for _ in range(repeats):
        dt, vec = timed(lambda: ciphertexts.decrypt(ck, sum_blobs, n + ciphertexts.EXTRA_SLOTS))
        dec_t.append(dt)
    count_ok = abs(vec[-1] - total_adds) < 1e-3
    mean_err = float(np.max(np.abs(vec[:n] / vec[-2] - theta))) if n else 0.0

    ct_bytes = sum(map(len, blobs))
    out = {
        "num_ciphertexts": len(blobs),
        "ciphertext_bytes": ct_bytes,
        "ciphertext_bytes_each": len(blobs[0]),
        "aggregate_bytes": sum(map(len, sum_blobs)),
        "aggregate_bytes_per_param": sum(map(len, sum_blobs)) / n,
        "encrypt_seconds": enc_t,
        "encrypt_rate": n / median(enc_t),
        "ingest_seconds": ingest_t,
        "ingest_rate": n / median(ingest_t),
        "add_only_seconds": add_t,
        "add_only_rate": n / median(add_t),
        "decrypt_seconds": dec_t,
        "decrypt_rate": n / median(dec_t),
        "decrypt_check": {"sum_of_updates": total_adds, "count_slot_ok": bool(count_ok), "max_abs_error_of_mean": mean_err},
    }
    return out, blobs


# ---------------------------------------------------------------------------------------------
# 3(ii). the common TenSEAL layout


def tenseal_context():
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40])
    ctx.global_scale = 2**40
    return ctx


def tenseal_context_sizes() -> dict:
    """What the naive approach ships with each update: the serialized context and its keys."""
    ctx = tenseal_context()
    default = len(ctx.serialize())  # public + relinearization keys (TenSEAL's defaults), no secret key
    public_only = len(ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                    save_relin_keys=False))
    ctx.generate_galois_keys()
    with_galois = len(ctx.serialize())
    return {"default_keys_bytes": default, "public_key_only_bytes": public_only, "with_galois_keys_bytes": with_galois}


def bench_tenseal_common(sample: np.ndarray, repeats: int) -> dict:
    """One ts.ckks_vector per 4096 values (fully packed: the best case of one vector per tensor)."""
    import tenseal as ts

    ctx = tenseal_context()
    n = sample.size
    pieces = [sample[i : i + TENSEAL_SLOTS] for i in range(0, n, TENSEAL_SLOTS)]
    enc_t, blobs = [], None
    for _ in range(repeats):
        dt, blobs = timed(lambda: [ts.ckks_vector(ctx, p).serialize() for p in pieces])
        enc_t.append(dt)

    acc = [ts.ckks_vector_from(ctx, b) for b in blobs]
    ingest_t = []
    for _ in range(repeats):
        def ingest():
            for a, b in zip(acc, blobs):
                a.add_(ts.ckks_vector_from(ctx, b))
        ingest_t.append(timed(ingest)[0])

    parsed = [ts.ckks_vector_from(ctx, b) for b in blobs]
    add_t = []
    for _ in range(repeats):
        def add_only():
            for a, p in zip(acc, parsed):
                a.add_(p)
        add_t.append(timed(add_only)[0])
    del parsed

    sum_blobs = [a.serialize() for a in acc]
    total_adds = 1 + 2 * repeats
    dec_t, vec = [], None
    for _ in range(repeats):
        dt, vec = timed(lambda: np.concatenate([ts.ckks_vector_from(ctx, b).decrypt() for b in sum_blobs]))
        dec_t.append(dt)
    err = float(np.max(np.abs(vec / total_adds - sample))) if n else 0.0
    return {
        "measured_params": n,
        "num_vectors": len(blobs),
        "vector_bytes_each": len(blobs[0]),
        "bytes": sum(map(len, blobs)),
        "bytes_per_param": sum(map(len, blobs)) / n,
        "encrypt_seconds": enc_t,
        "encrypt_rate": n / median(enc_t),
        "ingest_seconds": ingest_t,
        "ingest_rate": n / median(ingest_t),
        "add_only_seconds": add_t,
        "add_only_rate": n / median(add_t),
        "decrypt_seconds": dec_t,
        "decrypt_rate": n / median(dec_t),
        "max_abs_error_of_mean": err,
    }


def lstm_like_padding() -> dict:
    sizes = [int(np.prod(s)) for s in LSTM_LIKE_TENSORS.values()]
    total = sum(sizes)
    per_tensor = sum(-(-s // TENSEAL_SLOTS) for s in sizes)
    packed = -(-total // TENSEAL_SLOTS)
    return {"tensors": {k: list(v) for k, v in LSTM_LIKE_TENSORS.items()}, "num_params": total,
            "ckks_vectors_per_tensor": per_tensor, "ckks_vectors_fully_packed": packed,
            "overhead": per_tensor / packed - 1, "secagg_ciphertexts": -(-(total + 2) // 8192)}


# ---------------------------------------------------------------------------------------------
# 1 + 3(i). gRPC submit through real servers


def bench_grpc(tmp: Path, label: str, paths, ck, spec_hash: str, blobs: list[bytes], plain_blobs: list[bytes],
               n: int, repeats: int) -> dict:
    import secagg
    from secagg import envelope
    from secagg.transport.client import AggregatorClient

    out = {}
    for kind in ("secagg", "plain"):
        log_path = tmp / f"{kind}-throughput-{label}.log"
        if kind == "secagg":
            server = ServerProcess.secagg(paths.server, tmp / f"state-throughput-{label}", log_path)
            payload, key_id = blobs, ck.key_id
        else:
            server = ServerProcess.plain(log_path)
            payload, key_id = plain_blobs, "plain"
        with server:
            round_id = f"tp-{label}"
            if kind == "secagg":  # expected > submissions: the round never closes inside a timed call
                secagg.create_round(server.address, round_id, {"w": np.zeros(n, np.float32)}, clients=repeats + 2)
            header, chunks = envelope.seal_update(round_id, "warmup", key_id, spec_hash, payload)
            wire = submit_wire_bytes(header, chunks)
            times, cpu = [], []
            with AggregatorClient(server.address) as client:
                client.server_info()  # connect before timing
                client.submit(header, chunks)  # warm-up, not timed
                for r in range(repeats):
                    h = dataclasses.replace(header, client_id=f"site-{r}")
                    c0 = server.cpu_seconds()
                    dt, reply = timed(lambda: client.submit(h, chunks))
                    cpu.append(server.cpu_seconds() - c0)
                    times.append(dt)
            out[kind] = {
                "wire_bytes": wire,
                "wire_bytes_per_param": wire / n,
                "payload_bytes": sum(map(len, payload)),
                "envelope_bytes": wire - sum(map(len, payload)),
                "messages": 1 + len(chunks),
                "submit_seconds": times,
                "submit_rate": n / median(times),
                "submit_mb_per_s": wire / median(times) / 1e6,
                "server_cpu_seconds": cpu,
                # CPU time comes in clock ticks (10 ms): total over the runs, and None when too coarse.
                "server_cpu_rate": n * repeats / sum(cpu) if sum(cpu) >= 0.05 else None,
                "server_peak_rss_mb": mb(server.peak_rss_kb()),
            }
    return out


# ---------------------------------------------------------------------------------------------
# 2. aggregator peak memory


def bench_memory(tmp: Path, label: str, paths, ck, spec_hash: str, blobs: list[bytes], plain_blobs: list[bytes],
                 n: int, client_counts: list[int]) -> dict:
    import secagg
    from secagg import envelope
    from secagg.transport.client import AggregatorClient

    out: dict = {"secagg": {}, "plain": {}}
    for kind in ("secagg", "plain"):
        counts = client_counts if kind == "secagg" else [max(client_counts)]
        for count in counts:
            log_path = tmp / f"{kind}-memory-{label}-{count}.log"
            if kind == "secagg":
                server = ServerProcess.secagg(paths.server, tmp / f"state-memory-{label}-{count}", log_path)
            else:
                server = ServerProcess.plain(log_path)
            with server:
                round_id = f"mem-{label}-{count}"
                with AggregatorClient(server.address) as client:
                    client.server_info()
                    idle_kb = server.rss_kb()
                    if kind == "secagg":
                        secagg.create_round(server.address, round_id, {"w": np.zeros(n, np.float32)}, clients=count)
                        header, chunks = envelope.seal_update(round_id, "x", ck.key_id, spec_hash, blobs)
                    else:
                        header, chunks = envelope.seal_update(round_id, "x", "plain", spec_hash, plain_blobs)
                    t0 = time.perf_counter()
                    for i in range(count):  # the same encrypted payload under a new client id each time
                        client.submit(dataclasses.replace(header, client_id=f"site-{i:03d}"), chunks)
                    elapsed = time.perf_counter() - t0
                    state = client.status(round_id)[0].state if kind == "secagg" else "n/a"
                peak_kb = server.peak_rss_kb()
                out[kind][str(count)] = {
                    "clients": count,
                    "round_state_after": state,
                    "idle_rss_mb": mb(idle_kb),
                    "peak_rss_mb": mb(peak_kb),
                    "peak_bytes_per_param": peak_kb * 1024 / n,
                    "peak_mb_per_param": mb(peak_kb) / n,
                    "growth_over_idle_mb": mb(peak_kb - idle_kb),
                    "growth_bytes_per_param": (peak_kb - idle_kb) * 1024 / n,
                    "submit_all_seconds": elapsed,
                }
    s = out["secagg"]
    if len(client_counts) >= 2:
        lo, hi = str(min(client_counts)), str(max(client_counts))
        out["ratio_peak"] = s[hi]["peak_rss_mb"] / s[lo]["peak_rss_mb"]
        out["ratio_growth"] = s[hi]["growth_over_idle_mb"] / max(s[lo]["growth_over_idle_mb"], 1e-9)
        out["ratio_clients"] = f"{hi}/{lo}"
    return out


# ---------------------------------------------------------------------------------------------
# round trip through the public API, in a fresh child process


def _roundtrip_child(conn, address: str, client_key: str, round_id: str, n: int) -> None:
    import secagg

    pid = os.getpid()
    base_kb = proc_kb(pid, "VmRSS")
    key = secagg.load_client_key(client_key)
    model = {"w": make_theta(n)}
    t0 = time.perf_counter()
    receipt = secagg.submit(address, round_id, key, "rt-site", model, weight=1.0)
    t1 = time.perf_counter()
    average = secagg.fetch_average(address, round_id, key, wait=60.0)
    t2 = time.perf_counter()
    err = float(np.max(np.abs(average.vector - model["w"].astype(np.float64))))
    conn.send({
        "submit_seconds": t1 - t0,
        "encrypt_seconds": receipt.encrypt_seconds,
        "send_seconds": receipt.send_seconds,
        "receipt_wire_bytes": receipt.wire_bytes,
        "fetch_seconds": t2 - t1,
        "contributions": average.contributions,
        "max_abs_error": err,
        "client_baseline_rss_mb": mb(base_kb),
        "client_peak_rss_mb": mb(proc_kb(pid, "VmHWM")),
    })
    conn.close()


def bench_roundtrip(tmp: Path, label: str, paths, n: int) -> dict:
    import secagg

    server = ServerProcess.secagg(paths.server, tmp / f"state-roundtrip-{label}", tmp / f"roundtrip-{label}.log")
    with server:
        round_id = f"rt-{label}"
        secagg.create_round(server.address, round_id, {"w": np.zeros(n, np.float32)}, clients=1)
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        t0 = time.perf_counter()
        proc = ctx.Process(target=_roundtrip_child, args=(child, server.address, str(paths.client), round_id, n))
        proc.start()
        child.close()
        try:
            result = parent.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"round-trip child failed (exit code {proc.exitcode}); see the traceback above")
        proc.join()
        result["wall_seconds_incl_child_start"] = time.perf_counter() - t0
        result["server_peak_rss_mb"] = mb(server.peak_rss_kb())
    return result


# ---------------------------------------------------------------------------------------------
# table


def fmt_rate(r: float) -> str:
    return f"{r / 1e6:.3g}"


def fmt_x(r: float) -> str:
    return f"{r:.2f}x"


def build_rows(results: dict, clients: list[int]) -> list[tuple[str, Callable[[dict], str]] | str]:
    lo, hi = str(min(clients)), str(max(clients))
    rows: list = [
        "Wire size (bytes/param as sent: protobuf messages + gRPC 5-byte prefixes)",
        ("secagg update: seeded CKKS ciphertexts + envelope", lambda r: f"{r['grpc']['secagg']['wire_bytes_per_param']:.3f}"),
        ("  of which envelope (header, chunk ids, SHA-256s)", lambda r: f"{r['grpc']['secagg']['envelope_bytes'] / r['num_params']:.4f}"),
        ("plain float32, same stream layout", lambda r: f"{r['grpc']['plain']['wire_bytes_per_param']:.3f}"),
        ("TenSEAL ckks_vector per 4096 values (serialized)*", lambda r: f"{r['tenseal_common']['bytes_per_param']:.2f}"),
        ("secagg aggregate download (full ciphertexts)", lambda r: f"{r['secagg']['aggregate_bytes_per_param']:.2f}"),
        "Client, one process (M params/s)",
        ("secagg encrypt: encode_update + encrypt", lambda r: fmt_rate(r["secagg"]["encrypt_rate"])),
        ("TenSEAL: ckks_vector + serialize*", lambda r: fmt_rate(r["tenseal_common"]["encrypt_rate"])),
        ("secagg decrypt of the sum: ciphertexts.decrypt", lambda r: fmt_rate(r["secagg"]["decrypt_rate"])),
        ("TenSEAL: ckks_vector_from + decrypt*", lambda r: fmt_rate(r["tenseal_common"]["decrypt_rate"])),
        "Aggregator, one core (M params/s)",
        ("secagg ingest: EncryptedSum.add (parse + add)", lambda r: fmt_rate(r["secagg"]["ingest_rate"])),
        ("TenSEAL: ckks_vector_from + add_*", lambda r: fmt_rate(r["tenseal_common"]["ingest_rate"])),
        ("secagg add only: Evaluator.add_inplace", lambda r: fmt_rate(r["secagg"]["add_only_rate"])),
        ("TenSEAL: add_ only*", lambda r: fmt_rate(r["tenseal_common"]["add_only_rate"])),
        "gRPC submit over loopback to a real server, pre-encrypted payload",
        ("secagg -> `secagg serve` (M params/s)", lambda r: fmt_rate(r["grpc"]["secagg"]["submit_rate"])),
        ("  same, MB/s on the wire", lambda r: f"{r['grpc']['secagg']['submit_mb_per_s']:.0f}"),
        ("  server CPU: M params per CPU-second", lambda r: fmt_rate(r["grpc"]["secagg"]["server_cpu_rate"])),
        ("plain float32 -> plain server (M params/s)", lambda r: fmt_rate(r["grpc"]["plain"]["submit_rate"])),
        ("  same, MB/s on the wire", lambda r: f"{r['grpc']['plain']['submit_mb_per_s']:.0f}"),
        ("  server CPU: M params per CPU-second", lambda r: fmt_rate(r["grpc"]["plain"]["server_cpu_rate"])),
        "Ratios, same run",
        ("wire bytes: secagg / plain float32", lambda r: fmt_x(r["ratios"]["wire_secagg_over_plain"])),
        ("wire bytes: TenSEAL layout / secagg", lambda r: fmt_x(r["ratios"]["wire_tenseal_over_secagg"])),
        ("encrypt rate: secagg / TenSEAL", lambda r: fmt_x(r["ratios"]["encrypt_secagg_over_tenseal"])),
        ("ingest rate: secagg / TenSEAL", lambda r: fmt_x(r["ratios"]["ingest_secagg_over_tenseal"])),
        ("add-only rate: secagg / TenSEAL", lambda r: fmt_x(r["ratios"]["add_only_secagg_over_tenseal"])),
        ("decrypt rate: secagg / TenSEAL", lambda r: fmt_x(r["ratios"]["decrypt_secagg_over_tenseal"])),
        ("gRPC submit rate: secagg / plain float32", lambda r: fmt_x(r["ratios"]["submit_secagg_over_plain"])),
        ("server CPU per param: secagg / plain", lambda r: fmt_x(r["ratios"]["server_cpu_secagg_over_plain"])),
        "Aggregator peak RSS (VmHWM after the round closed; fresh process each; one run)",
    ]
    for c in sorted(set(clients)):
        rows.append((f"secagg serve, {c} client(s): MB", lambda r, c=c: f"{r['memory']['secagg'][str(c)]['peak_rss_mb']:.0f}"))
        rows.append(("  bytes/param (= MB per M params)", lambda r, c=c: f"{r['memory']['secagg'][str(c)]['peak_bytes_per_param']:.1f}"))
        rows.append(("  growth over idle server: MB", lambda r, c=c: f"{r['memory']['secagg'][str(c)]['growth_over_idle_mb']:.0f}"))
    if lo != hi:
        rows.append((f"ratio {hi}/{lo} clients: peak RSS", lambda r: fmt_x(r["memory"]["ratio_peak"])))
        rows.append((f"ratio {hi}/{lo} clients: growth over idle", lambda r: fmt_x(r["memory"]["ratio_growth"])))
    rows.append((f"plain server, {hi} client(s): MB", lambda r: f"{r['memory']['plain'][hi]['peak_rss_mb']:.0f}"))
    rows += [
        "Round trip: secagg.submit + secagg.fetch_average, in-memory model, fresh processes (one run)",
        ("submit wall s (encrypt + send)", lambda r: f"{r['round_trip']['submit_seconds']:.2f}"),
        ("  of which encrypt s", lambda r: f"{r['round_trip']['encrypt_seconds']:.2f}"),
        ("  of which send s", lambda r: f"{r['round_trip']['send_seconds']:.2f}"),
        ("fetch_average wall s (download + decrypt + checks)", lambda r: f"{r['round_trip']['fetch_seconds']:.2f}"),
        ("max |average - model|", lambda r: f"{r['round_trip']['max_abs_error']:.1e}"),
        ("client peak RSS MB", lambda r: f"{r['round_trip']['client_peak_rss_mb']:.0f}"),
        ("aggregator peak RSS MB", lambda r: f"{r['round_trip']['server_peak_rss_mb']:.0f}"),
    ]
    return rows


def render_table(results: dict, labels: list[str], clients: list[int], repeats: int) -> str:
    width = 52
    col = max(10, *(len(lbl) + 2 for lbl in labels))
    lines = [f"secagg wire benchmark: medians of {repeats} run(s) unless noted; rates are per parameter",
             f"{'':{width}}" + "".join(f"{lbl:>{col}}" for lbl in labels)]
    for row in build_rows(results, clients):
        if isinstance(row, str):
            lines.append(row)
            continue
        name, get = row
        cells = []
        for lbl in labels:
            try:
                cells.append(get(results[lbl]))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        lines.append(f"  {name:{width - 2}}" + "".join(f"{c:>{col}}" for c in cells))
    samples = {lbl: results[lbl]["tenseal_common"]["measured_params"] for lbl in labels}
    lines.append(f"* TenSEAL common layout measured on the first {', '.join(f'{v:,}' for v in samples.values())} "
                 f"params (per size); rates are per param, so they extrapolate linearly to the full size.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", help=f"comma-separated parameter counts (default {DEFAULT_SIZES}; --quick: 20k)")
    p.add_argument("--repeats", type=int, help="runs per timing; medians are reported (default 3; --quick: 1)")
    p.add_argument("--clients-memory", help="client counts for the aggregator memory test (default 1,20; --quick: 1,3)")
    p.add_argument("--common-sample", type=parse_size, default=parse_size("1M"),
                   help="at most this many params for the TenSEAL common layout (default 1M); rates extrapolate")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(HERE.parent)})")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = p.parse_args(argv)

    sizes_text = args.sizes or ("20k" if args.quick else DEFAULT_SIZES)
    labels = [s.strip() for s in sizes_text.split(",") if s.strip()]
    sizes = {lbl: parse_size(lbl) for lbl in labels}
    if len(set(labels)) != len(labels):
        p.error("--sizes lists a size twice")
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1:
        p.error("--repeats must be at least 1")
    clients = [int(c) for c in (args.clients_memory or ("1,3" if args.quick else "1,20")).split(",") if c.strip()]
    if not clients or min(clients) < 1:
        p.error("--clients-memory needs positive client counts, e.g. 1,20")

    import tenseal

    import secagg
    from secagg.packing import ModelSpec

    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        paths = secagg.keygen(tmp / "keys")
        ck = secagg.load_client_key(paths.client)
        sk = secagg.load_server_key(paths.server)
        log("TenSEAL context sizes")
        context_sizes = tenseal_context_sizes()
        for lbl in labels:
            n = sizes[lbl]
            t_size = time.perf_counter()
            r: dict = {"num_params": n}
            theta32 = make_theta(n)
            theta = theta32.astype(np.float64)
            spec_hash = ModelSpec.of({"w": np.zeros(n, np.float32)}).hash
            log(f"{lbl}: secagg encrypt/ingest/add/decrypt")
            r["secagg"], blobs = bench_secagg_local(ck, sk, theta, repeats)
            sample = theta[: min(n, args.common_sample)]
            log(f"{lbl}: TenSEAL common layout on {sample.size:,} params")
            r["tenseal_common"] = bench_tenseal_common(sample, repeats)
            r["tenseal_common"]["extrapolated_full_size"] = {
                "bytes": r["tenseal_common"]["bytes_per_param"] * n,
                "encrypt_seconds": n / r["tenseal_common"]["encrypt_rate"],
                "ingest_seconds": n / r["tenseal_common"]["ingest_rate"],
                "decrypt_seconds": n / r["tenseal_common"]["decrypt_rate"],
            }
            plain = float32_blobs(theta32)
            del theta
            log(f"{lbl}: gRPC submit, secagg serve vs plain float32 server")
            r["grpc"] = bench_grpc(tmp, lbl, paths, ck, spec_hash, blobs, plain, n, repeats)
            log(f"{lbl}: aggregator memory with {','.join(map(str, clients))} client(s)")
            r["memory"] = bench_memory(tmp, lbl, paths, ck, spec_hash, blobs, plain, n, clients)
            del blobs, plain, theta32
            log(f"{lbl}: round trip through secagg.submit + secagg.fetch_average")
            r["round_trip"] = bench_roundtrip(tmp, lbl, paths, n)
            s, t, g = r["secagg"], r["tenseal_common"], r["grpc"]
            r["ratios"] = {
                "wire_secagg_over_plain": g["secagg"]["wire_bytes"] / g["plain"]["wire_bytes"],
                "wire_tenseal_over_secagg": t["bytes_per_param"] / g["secagg"]["wire_bytes_per_param"],
                "encrypt_secagg_over_tenseal": s["encrypt_rate"] / t["encrypt_rate"],
                "ingest_secagg_over_tenseal": s["ingest_rate"] / t["ingest_rate"],
                "add_only_secagg_over_tenseal": s["add_only_rate"] / t["add_only_rate"],
                "decrypt_secagg_over_tenseal": s["decrypt_rate"] / t["decrypt_rate"],
                "submit_secagg_over_plain": g["secagg"]["submit_rate"] / g["plain"]["submit_rate"],
                "server_cpu_secagg_over_plain": (g["plain"]["server_cpu_rate"] / g["secagg"]["server_cpu_rate"]
                                                 if g["plain"]["server_cpu_rate"] and g["secagg"]["server_cpu_rate"]
                                                 else None),
            }
            r["seconds"] = time.perf_counter() - t_size
            results[lbl] = r
            log(f"{lbl}: done in {r['seconds']:.0f} s")

    total = time.perf_counter() - started
    table = render_table(results, labels, clients, repeats)
    padding = lstm_like_padding()
    one_offs = [
        f"TenSEAL context serialized as the naive approach ships it with every update (one-off): "
        f"{context_sizes['default_keys_bytes'] / 1e6:.2f} MB with TenSEAL's default keys (public + relinearization), "
        f"{context_sizes['with_galois_keys_bytes'] / 1e6:.1f} MB once Galois keys are generated "
        f"(secagg ships no key material).",
        f"One ckks_vector per tensor on an LSTM-like split ({padding['num_params']:,} params, "
        f"{len(padding['tensors'])} tensors): {padding['ckks_vectors_per_tensor']} vectors instead of "
        f"{padding['ckks_vectors_fully_packed']} fully packed (+{100 * padding['overhead']:.1f}% bytes and time); "
        f"secagg packs the same model in {padding['secagg_ciphertexts']} ciphertexts.",
        f"Total run time {total:.0f} s on {os.cpu_count()} CPU(s).",
    ]
    print(table)
    print()
    print("\n".join(one_offs))

    doc = {
        "meta": {
            "started_unix": time.time() - total,
            "total_seconds": total,
            "argv": sys.argv[1:],
            "sizes": sizes,
            "repeats": repeats,
            "clients_memory": clients,
            "common_sample": args.common_sample,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "secagg": secagg.__version__,
            "tenseal": tenseal.__version__,
            "numpy": np.__version__,
            "benchmark_process_peak_rss_mb": mb(proc_kb(os.getpid(), "VmHWM")),
            "units": "rates are parameters per second (medians); *_seconds lists hold every run; memory in MB = 1e6 bytes",
        },
        "tenseal_context_bytes": context_sizes,
        "lstm_like_split": padding,
        "results": results,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
