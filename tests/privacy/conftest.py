"""Tools of the privacy audit tests (docs/privacy-audit.md).

* ``aggregator_process``: ``secagg serve`` as a child process whose stdout and stderr are kept in
  files, so a test can search everything the aggregator printed or logged.
* :class:`RecordingRelay`: a TCP relay on 127.0.0.1 that keeps every byte each side sent, so a test
  can search exactly what the aggregator received.
* :func:`read_process_memory`: the readable memory of a child process, through /proc/<pid>/mem.
* :func:`windows` and :func:`found`: byte-pattern search.
* ``malicious_server``: a real aggregator whose servicer tampers with what it serves (sections 9-17),
  and the attacker's arithmetic (c0 sums mod q, plaintext polynomials from the public encoder, key
  recovery from a raw decryption).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

SERVING = re.compile(rb"secagg: serving on (\S+)")


# -- a `secagg serve` subprocess whose output is kept ---------------------------------------------


class AggregatorProcess:
    """``secagg serve --key KEY --listen 127.0.0.1:0 --state-dir DIR``, stdout and stderr to files."""

    def __init__(self, key: Path, state_dir: Path, out_dir: Path, timeout: float = 60.0) -> None:
        self.state_dir = state_dir
        self.stdout_path = out_dir / "aggregator.stdout"
        self.stderr_path = out_dir / "aggregator.stderr"
        exe = Path(sys.executable).with_name("secagg")
        command = [str(exe)] if exe.exists() else [sys.executable, "-m", "secagg.cli"]
        command += ["serve", "--key", str(key), "--listen", "127.0.0.1:0", "--state-dir", str(state_dir)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # The console script is a Python script run by exec, so this pid is the aggregator itself.
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        self.address = ""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            m = SERVING.search(self.stderr_path.read_bytes())
            if m:
                self.address = m.group(1).decode()
                break
            time.sleep(0.05)
        if not self.address:
            self.kill()
            raise RuntimeError("secagg serve did not start:\n" + self.output().decode(errors="replace"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> bytes:
        """Everything the aggregator wrote to stdout and stderr so far."""
        return self.stdout_path.read_bytes() + self.stderr_path.read_bytes()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def aggregator_process(keypair, tmp_path):
    """``start(key=server.key)``: start ``secagg serve`` on a fresh state dir; killed afterwards."""
    started: list[AggregatorProcess] = []

    def start(key: Path | None = None) -> AggregatorProcess:
        n = len(started)
        out_dir = tmp_path / f"aggregator-{n}"
        out_dir.mkdir()
        p = AggregatorProcess(key or keypair.server, out_dir / "state", out_dir)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


# -- a recording TCP relay ------------------------------------------------------------------------


@dataclasses.dataclass
class RelayedConnection:
    """The bytes of one relayed TCP connection, in each direction."""

    upstream: bytearray = dataclasses.field(default_factory=bytearray)  # client -> aggregator
    downstream: bytearray = dataclasses.field(default_factory=bytearray)  # aggregator -> client


class RecordingRelay:
    """Listens on 127.0.0.1 and relays each connection to ``target`` ("host:port"), keeping every byte.

    With ``target=None`` it is a sink: it keeps what it is sent and forwards nothing. Bytes are
    recorded before they are forwarded, so once the far side has answered a request, the request
    is fully recorded.
    """

    def __init__(self, target: str | None) -> None:
        self.target = target
        self.connections: list[RelayedConnection] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def received(self, connections: Iterable[RelayedConnection] | None = None) -> bytes:
        """Everything clients sent (what the far side received), all connections in order."""
        with self._lock:
            return b"".join(bytes(c.upstream) for c in (self.connections if connections is None else connections))

    def sent(self) -> bytes:
        """Everything the far side sent back to clients."""
        with self._lock:
            return b"".join(bytes(c.downstream) for c in self.connections)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                _quietly(s.shutdown, socket.SHUT_RDWR)
                _quietly(s.close)

    def __enter__(self) -> "RecordingRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            record = RelayedConnection()
            upstream = None
            if self.target is not None:
                host, _, port = self.target.rpartition(":")
                upstream = socket.create_connection((host, int(port)))
            with self._lock:
                self.connections.append(record)
                self._sockets += [s for s in (client, upstream) if s is not None]
            threading.Thread(target=self._pump, args=(client, upstream, record.upstream), daemon=True).start()
            if upstream is not None:
                threading.Thread(target=self._pump, args=(upstream, client, record.downstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket | None, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    buf += data
                if dst is not None:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if dst is not None:
                _quietly(dst.shutdown, socket.SHUT_WR)


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except OSError:
        pass


# -- searching bytes --------------------------------------------------------------------------------


def windows(data: bytes, size: int, count: int, start: int = 0, end: int | None = None) -> list[bytes]:
    """``count`` windows of ``size`` bytes spread evenly over ``data[start:end]``."""
    end = len(data) if end is None else end
    step = (end - start - size) // max(count - 1, 1)
    return [data[start + i * step : start + i * step + size] for i in range(count)]


def found(patterns: Mapping[str, bytes], haystack: bytes) -> list[str]:
    """The labels of the patterns that occur in ``haystack``."""
    return [label for label, pattern in patterns.items() if pattern in haystack]


def read_process_memory(pid: int, chunk: int = 64 << 20) -> Iterator[bytes]:
    """The readable memory of process ``pid``, as runs of contiguous memory.

    Pages that are all zeros are left out (most of a process's mappings are reserved but untouched);
    no pattern searched for here can lie in one. Raises PermissionError if the kernel refuses to let
    this process read the other's memory (ptrace access mode check).
    """
    with open(f"/proc/{pid}/maps") as f:
        regions = []
        for line in f:
            fields = line.split()
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if fields[1].startswith("r") and name not in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                regions.append((start, stop))
    page = 4096
    run: list[bytes] = []  # the contiguous run being collected, and where it ends
    run_end = -1
    readable = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, stop in regions:
            for pos in range(start, stop, chunk):
                try:
                    mem.seek(pos)
                    data = mem.read(min(chunk, stop - pos))
                except OSError:
                    data = b""
                if len(data) % page:
                    data = data[: len(data) - len(data) % page]
                readable += len(data)
                nonzero = np.frombuffer(data, dtype=np.uint64).reshape(-1, page // 8).any(axis=1)
                # Runs of non-zero pages: [first, last) page indices where the mask flips.
                edges = np.flatnonzero(np.diff(np.concatenate([[False], nonzero, [False]]).astype(np.int8)))
                for first, last in zip(edges[0::2], edges[1::2]):
                    at = pos + int(first) * page
                    if at != run_end and run:
                        yield b"".join(run)
                        run = []
                    run.append(data[int(first) * page : int(last) * page])
                    run_end = pos + int(last) * page
                if len(data) < min(chunk, stop - pos):
                    break  # the rest of this mapping cannot be read
    if run:
        yield b"".join(run)
    if readable == 0:
        raise PermissionError(f"no memory of process {pid} could be read through /proc/{pid}/mem")


def search_process_memory(pid: int, patterns: Mapping[str, bytes]) -> set[str]:
    """The labels of the patterns found anywhere in the readable memory of process ``pid``."""
    hits: set[str] = set()
    for piece in read_process_memory(pid):
        hits.update(found({k: v for k, v in patterns.items() if k not in hits}, piece))
    return hits


# -- a malicious aggregator ------------------------------------------------------------------------
#
# The threat model of docs/design-aggregator-adversary.md: the aggregator (or whoever edits its state
# dir) is the adversary. The tests run a REAL aggregator (secagg.serve: the real core, the real gRPC
# server on 127.0.0.1) whose servicer is replaced by a subclass that tampers with what it serves: the
# aggregate streamed to a fetching client (per caller, under mutual TLS) and the round's status. It
# also keeps a copy of every update it received, as a malicious aggregator would. The attacker's
# arithmetic uses only what the aggregator holds: c0 polynomials (added mod q with numpy), seeds,
# records, and the public CKKS parameters.


@dataclasses.dataclass
class Served:
    """A closed round's aggregate as the aggregator streams it: the records, and per ciphertext the
    summed c0 and every contributor's seed (in record order)."""

    records: list
    c0s: list[bytes]
    seeds: list[list[bytes]]  # seeds[i][j]: contributor j's seed of ciphertext i

    def copy(self) -> "Served":
        return Served(list(self.records), list(self.c0s), [list(s) for s in self.seeds])


class Malice:
    """What the malicious servicer does; a test sets the hooks.

    ``fetch(caller, round_id, served) -> Served``: rewrite the aggregate served to ``caller`` (the
    client id of its certificate under mutual TLS, else None). ``status(caller, reply)``: rewrite a
    GetRound reply (a ``pb.RoundStatus``) in place. ``mask(caller, request, reply) -> reply``: rewrite a
    masked round's stage replies (``pb.MaskReply``). ``updates[(round, client)]`` = (header, [(c0, seed)]):
    every update the aggregator accepted, kept after the round closed.
    """

    def __init__(self) -> None:
        self.fetch = None
        self.status = None
        self.mask = None  # mask(caller, request, reply) -> reply: rewrite a masked round's MaskStage replies
        self.updates: dict[tuple[str, str], tuple] = {}
        self.served_to: list[tuple[str | None, str]] = []

    def update(self, round_id: str, client_id: str) -> tuple[list[bytes], list[bytes]]:
        """(c0s, seeds) of one accepted update."""
        _, pairs = self.updates[(round_id, client_id)]
        return [c0 for c0, _ in pairs], [seed for _, seed in pairs]


def _malicious_servicer(malice: Malice):
    from secagg import envelope
    from secagg.polys import SEED_BYTES
    from secagg.rounds import aggregate_chunk_size
    from secagg.transport import secagg_pb2 as pb
    from secagg.transport.server import AggregatorServicer, chunk_to_pb, record_from_pb, record_to_pb

    class MaliciousServicer(AggregatorServicer):
        def _who(self, context) -> str | None:
            who = self.auth.caller(context)
            return None if who is None else who.name

        def GetRound(self, request, context):
            reply = super().GetRound(request, context)
            if malice.status is not None:
                malice.status(self._who(context), reply)
            return reply

        def MaskStage(self, request, context):
            reply = super().MaskStage(request, context)
            if malice.mask is not None and reply is not None:
                reply = malice.mask(self._who(context), request, reply)
            return reply

        def FetchAggregate(self, request, context):
            honest = super().FetchAggregate(request, context)
            if malice.fetch is None:
                yield from honest
                return
            messages = list(honest)  # an abort (round not closed, not enrolled) raises here, as it would honestly
            head = messages[0].header
            records = [record_from_pb(r) for r in head.records]
            n = len(records)
            c0s, seeds = [], []
            for m in messages[1:]:
                for c0, joined in zip(m.chunk.c0, m.chunk.seeds):
                    c0s.append(c0)
                    seeds.append([joined[j * SEED_BYTES:(j + 1) * SEED_BYTES] for j in range(n)])
            caller = self._who(context)
            malice.served_to.append((caller, request.round_id))
            served = malice.fetch(caller, request.round_id, Served(records, c0s, seeds))
            # Re-cut and re-digest: the digests are unkeyed, so the aggregator can always make them match.
            per = aggregate_chunk_size(max(len(served.records), 1))
            chunks = []
            for index, start in enumerate(range(0, len(served.c0s), per)):
                part_c0 = served.c0s[start:start + per]
                part_seeds = [b"".join(s) for s in served.seeds[start:start + per]]
                chunks.append(envelope.Chunk(index, tuple(part_c0), tuple(part_seeds),
                                             envelope.chunk_digest(index, part_c0, part_seeds)))
            yield pb.AggregateMessage(header=pb.AggregateHeader(
                round_id=head.round_id, key_id=head.key_id, spec_hash=head.spec_hash,
                contributions=len(served.records), clients=[r.client_id for r in served.records],
                num_ciphertexts=len(served.c0s), num_chunks=len(chunks),
                digest=envelope.update_digest(c.digest for c in chunks),
                records=[record_to_pb(r) for r in served.records]))
            for c in chunks:
                yield pb.AggregateMessage(chunk=chunk_to_pb(c))

    return MaliciousServicer


@pytest.fixture
def malicious_server(keypair, tmp_path):
    """``start(tls=None, name="evil") -> (server, malice)``: a real aggregator (secagg.serve on 127.0.0.1)
    whose servicer tampers as ``malice`` says, and which keeps every update it accepted."""
    import secagg
    from secagg.transport import server as server_module

    started = []

    def start(tls=None, name: str = "evil", min_cohort: int = 3):
        malice = Malice()
        real_servicer = server_module.AggregatorServicer
        server_module.AggregatorServicer = _malicious_servicer(malice)
        try:
            srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / f"{name}-state", min_cohort=min_cohort,
                               tls=tls)
        finally:
            server_module.AggregatorServicer = real_servicer
        started.append(srv)
        honest_submit = srv.core.submit

        def keeping_submit(header, chunks):
            kept = []

            def tee():
                for chunk in chunks:
                    kept.append(chunk)
                    yield chunk

            result = honest_submit(header, tee())
            malice.updates[(header.round_id, header.client_id)] = (
                header, [(bytes(c0), bytes(seed)) for c in kept for c0, seed in zip(c.c0s, c.seeds)])
            return result

        srv.core.submit = keeping_submit
        return srv, malice

    yield start
    for srv in started:
        srv.stop(grace=0)


# -- the attacker's arithmetic ----------------------------------------------------------------------

DATA_PRIME = 1152921504606748673  # q, public (secagg.keys.DATA_PRIME); restated so a change there is noticed
N = 8192


def words(c0: bytes) -> np.ndarray:
    return np.frombuffer(c0, dtype="<u8")


def add_mod_q(*polys: bytes) -> bytes:
    """The sum of c0 polynomials modulo q, as the aggregator computes it."""
    q = np.uint64(DATA_PRIME)
    total = np.zeros(N, dtype=np.uint64)
    for p in polys:
        total += words(p) if isinstance(p, bytes) else p
        total -= q * (total >= q)
    return total.astype("<u8").tobytes()


def sub_mod_q(a: bytes, b: bytes) -> bytes:
    q = np.uint64(DATA_PRIME)
    x, y = words(a).copy(), words(b)
    x += q * (x < y)
    return (x - y).astype("<u8").tobytes()


def public_encoder():
    """SEAL's CKKS encoder on the public parameters alone (what the aggregator may run)."""
    import tenseal.sealapi as seal

    from secagg.keys import _SealParameters

    params = _SealParameters()
    return seal.CKKSEncoder(params.context), params


def encode_reals(reals: np.ndarray) -> np.ndarray:
    """The NTT-form plaintext polynomial (uint64 words mod q) whose 8,192 reals are ``reals``, at scale 2^40:
    adding it to a ciphertext's c0 adds ``reals`` to what the ciphertext decrypts to."""
    import tenseal.sealapi as seal

    encoder, params = public_encoder()
    pt = seal.Plaintext()
    encoder.encode((reals[0::2] + 1j * reals[1::2]).tolist(), 2.0**40, pt)
    assert pt.is_ntt_form() and pt.coeff_count() == N
    return np.array([pt[i] for i in range(N)], dtype=np.uint64)


def second_polynomial(key, seeds: list[bytes]) -> list[int]:
    """c1 = sum of PRG(seed) mod q, expanded with SEAL from the seeds (public: no secret key involved)."""
    import tenseal.sealapi as seal

    from secagg import ciphertexts

    codec = ciphertexts.codec(key)
    total = codec._load(bytes(N * 8), seeds[0])
    for s in seeds[1:]:
        seal.Evaluator(key.context).add_inplace(total, codec._load(bytes(N * 8), s))
    poly = total.dyn_array()
    assert all(poly.at(i) == 0 for i in range(0, N, 511))  # the c0 half is the zero we loaded
    return [poly.at(i) for i in range(N, 2 * N)]


def plaintext_of(reals: np.ndarray) -> list[int]:
    """The integer polynomial (NTT form, mod q) a raw decryption ``reals`` came from: re-encoding at the
    scale undoes decoding exactly while the reals carry enough precision."""
    return [int(w) for w in encode_reals(np.asarray(reals, dtype=np.float64))]


def key_from_decryption(reals: np.ndarray, c0: bytes, c1: list[int]) -> list[int]:
    """The Li-Micciancio step: a decryption m = c0 + c1*s (NTT form, pointwise mod q) gives s = (m - c0) / c1."""
    m = plaintext_of(reals)
    return [((mi - int(ci)) * pow(int(c1i), -1, DATA_PRIME)) % DATA_PRIME for mi, ci, c1i in zip(m, words(c0), c1)]


def secret_key_words(key) -> list[int]:
    """The secret key's NTT coefficients for the data prime, as SEAL holds them."""
    data = key.secret_key.data()
    return [data[i] for i in range(N)]


def raw_decryption(key, c0: bytes, seeds: list[bytes]) -> np.ndarray:
    """The 8,192 reals of a ciphertext exactly as CKKS decrypts them: what must never be released."""
    from secagg import ciphertexts

    return ciphertexts.codec(key).decrypt(c0, seeds)
