"""Benchmark-only: secagg's previous wire format (format 1, commit 8c54b64), so that ``wire.py`` can
measure it side by side with the current one. Nothing in ``secagg/`` uses this module.

Two parts:

* **In-process copies** of the previous client and aggregator arithmetic, taken from 8c54b64's
  ``secagg/ciphertexts.py`` (``git show 8c54b64:secagg/ciphertexts.py``) and ``secagg/envelope.py``
  with only the imports changed: the client encodes ``[w*theta, w, 1]`` and encrypts each 8,192 reals
  into one SEAL *seeded* symmetric ciphertext, saved with SEAL's default (zstd) compression
  (:func:`encrypt`); chunks carry a SHA-256 (:func:`seal_update`, :class:`ChunkValidator`); the
  aggregator parses every ciphertext with SEAL, which expands the seed into the second polynomial,
  and adds it with ``Evaluator.add_inplace`` (:class:`EncryptedSum`); the sum it serves is made of
  ordinary ciphertexts (16 bytes per parameter), which the client parses and decrypts
  (:func:`decrypt`, :func:`decode_aggregate`). The aggregator side gets a SEAL context built from the
  public parameters (:class:`AggregatorKey`), as 8c54b64's ``server.key`` held.
* **The previous aggregator as a whole process**: ``wire.py`` extracts 8c54b64's ``secagg`` package
  with ``git archive`` (:func:`extract_previous_tree`) and runs its own ``secagg serve``; this file,
  run as a script under that tree (``PYTHONPATH=TREE python _previous_format.py submit ...``), is the
  client that creates a round there and submits to it with 8c54b64's own code, reporting the server
  process's CPU time and memory after each group of submissions and the bytes on the wire (JSON on
  stdout). That part imports only the previous ``secagg`` it runs under.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

PREVIOUS_COMMIT = "8c54b64"
REALS_PER_CIPHERTEXT = 8192
VALUE_LIMIT = float(2**18)
EXTRA_SLOTS = 2  # weight and count, after the parameters
CIPHERTEXTS_PER_CHUNK = 24
MAX_CIPHERTEXT_BYTES = 140_000


class PreviousFormatError(Exception):
    """A check of the previous format failed (the copies raise this where 8c54b64 raised secagg's errors)."""


def _seal():
    import tenseal.sealapi as seal

    return seal


def _scratch_dir() -> str:
    import tempfile

    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


# ---------------------------------------------------------------------------------------------
# 8c54b64 secagg/ciphertexts.py (copy)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A round's limits that keep every encrypted partial sum inside the CKKS range."""

    expected_clients: int
    max_weight: float
    value_bound: float

    @property
    def headroom(self) -> float:
        return VALUE_LIMIT / (self.expected_clients * self.value_bound)


def num_ciphertexts(num_params: int) -> int:
    return max(1, math.ceil((num_params + EXTRA_SLOTS) / REALS_PER_CIPHERTEXT))


def encode_update(theta: np.ndarray, weight: float, bounds: Bounds) -> np.ndarray:
    """The vector a client encrypts, after checking it cannot overflow the encrypted sum."""
    if not (math.isfinite(weight) and weight > 0):
        raise PreviousFormatError(f"weight must be a positive finite number, got {weight}")
    if weight > bounds.max_weight:
        raise PreviousFormatError(f"weight {weight:g} exceeds the round's max weight {bounds.max_weight:g}")
    if theta.size and not np.all(np.isfinite(theta)):
        raise PreviousFormatError("the model contains NaN or infinite values")
    peak = float(np.max(np.abs(theta))) if theta.size else 0.0
    if peak > bounds.value_bound:
        raise PreviousFormatError(f"a model value of magnitude {peak:.4g} exceeds the round's value bound")
    w = bounds.headroom * weight / bounds.max_weight
    return np.concatenate([theta * w, [w, 1.0]])


def decode_aggregate(vector: np.ndarray, contributions: int, bounds: Bounds) -> tuple[np.ndarray, float]:
    """(weighted mean of theta, summed weight) from a decrypted sum, after the integrity checks."""
    count = float(vector[-1])
    wsum = float(vector[-2])
    if not math.isfinite(count) or abs(count - contributions) > 1e-3:
        raise PreviousFormatError(f"the decrypted aggregate counts {count:.6g} contributions, not {contributions}")
    if not (0 < wsum <= contributions * bounds.headroom * (1 + 1e-6)):
        raise PreviousFormatError(f"the decrypted total weight {wsum:.6g} is impossible")
    total_weight = wsum * bounds.max_weight / bounds.headroom
    return vector[:-EXTRA_SLOTS] / wsum, total_weight


class _Scratch:
    """A per-thread tmpfs file: SEAL's binding reads and writes ciphertexts only through paths."""

    _local = threading.local()

    @classmethod
    def path(cls) -> str:
        p = getattr(cls._local, "path", None)
        if p is None:
            p = os.path.join(_scratch_dir(), f"secagg-prev-{os.getpid()}-{threading.get_ident()}.ct")
            cls._local.path = p
        return p


def encrypt(key, vector: np.ndarray, progress=None) -> list[bytes]:
    """Seeded symmetric ciphertexts of ``vector``, two reals per complex slot.

    ``key`` is a client key: ``key.params.context``, ``key.params.scale``, ``key.secret_key``
    (secagg's current :class:`~secagg.keys.ClientKey` has them, with the same parameters).
    """
    seal = _seal()
    params = key.params
    encoder = seal.CKKSEncoder(params.context)
    encryptor = seal.Encryptor(params.context, key.secret_key)
    blobs = []
    scratch = _Scratch.path()
    n = num_ciphertexts(vector.size - EXTRA_SLOTS)
    padded = np.zeros(n * REALS_PER_CIPHERTEXT)
    padded[: vector.size] = vector
    try:
        for i in range(n):
            seg = padded[i * REALS_PER_CIPHERTEXT : (i + 1) * REALS_PER_CIPHERTEXT]
            pt = seal.Plaintext()
            encoder.encode((seg[0::2] + 1j * seg[1::2]).tolist(), params.scale, pt)
            encryptor.encrypt_symmetric(pt).save(scratch)
            blobs.append(Path(scratch).read_bytes())
            if progress:
                progress("encrypt", i + 1, n)
    finally:
        _unlink(scratch)
    return blobs


def decrypt(key, blobs: list[bytes], length: int) -> np.ndarray:
    """The first ``length`` reals of the decrypted ciphertexts."""
    seal = _seal()
    params = key.params
    encoder = seal.CKKSEncoder(params.context)
    decryptor = seal.Decryptor(params.context, key.secret_key)
    out = np.empty(len(blobs) * REALS_PER_CIPHERTEXT)
    for i, blob in enumerate(blobs):
        ct = load_ciphertext(key, blob)
        pt = seal.Plaintext()
        decryptor.decrypt(ct, pt)
        z = np.asarray(encoder.decode_complex(pt))
        seg = out[i * REALS_PER_CIPHERTEXT : (i + 1) * REALS_PER_CIPHERTEXT]
        seg[0::2] = z.real
        seg[1::2] = z.imag
    return out[:length]


def load_ciphertext(key, blob: bytes):
    """Parse one ciphertext and check it fits the federation's parameters (``key.context``, ``key.params.scale``)."""
    seal = _seal()
    # SEAL's 16-byte header states the object's total size; a blob padded with junk is refused.
    if len(blob) < 16 or int.from_bytes(blob[8:16], "little") != len(blob):
        raise PreviousFormatError(f"ciphertext of {len(blob)} bytes does not match the size in its own header")
    scratch = _Scratch.path()
    try:
        with open(scratch, "wb") as f:
            f.write(blob)
        ct = seal.Ciphertext()
        try:
            ct.load(key.context, scratch)
        except Exception as exc:  # SEAL signals bad data with several exception types
            raise PreviousFormatError(f"not a valid ciphertext for this key's parameters ({exc})") from exc
    finally:
        _unlink(scratch)
    if ct.size() != 2 or ct.coeff_modulus_size() != 1 or not ct.is_ntt_form() or ct.scale != key.params.scale:
        raise PreviousFormatError("ciphertext has the wrong size, level or scale for this federation's parameters")
    return ct


def save_ciphertext(ct) -> bytes:
    """Serialize an ordinary (not seeded) ciphertext."""
    scratch = _Scratch.path()
    try:
        ct.save(scratch)
        return Path(scratch).read_bytes()
    finally:
        _unlink(scratch)


class EncryptedSum:
    """The previous aggregator's running sum: one SEAL ciphertext per position."""

    def __init__(self, key, length: int) -> None:
        self._key = key
        self._evaluator = _seal().Evaluator(key.context)
        self._parts: list = [None] * length
        self._counts = [0] * length

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, index: int, blob: bytes) -> None:
        """Parse ``blob`` and add it at ``index``."""
        self.add_parsed(index, load_ciphertext(self._key, blob))

    def add_parsed(self, index: int, ct) -> None:
        if self._parts[index] is None:
            self._parts[index] = ct
        else:
            self._evaluator.add_inplace(self._parts[index], ct)
        self._counts[index] += 1

    def iter_blobs(self) -> Iterator[bytes]:
        """The sum, serialized one ciphertext at a time."""
        if any(p is None for p in self._parts):
            raise PreviousFormatError("the encrypted sum is incomplete")
        for part in self._parts:
            yield save_ciphertext(part)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class AggregatorKey:
    """What 8c54b64's ``server.key`` gave the aggregator: a SEAL context of the public parameters, no secret."""

    def __init__(self) -> None:
        seal = _seal()
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(8192)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(8192, [60, 60]))
        self.context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        self.params = self  # load_ciphertext reads key.params.scale
        self.scale = float(2**40)


# ---------------------------------------------------------------------------------------------
# 8c54b64 secagg/envelope.py (copy of the parts on the data path)


@dataclasses.dataclass(frozen=True)
class Chunk:
    index: int
    ciphertexts: tuple[bytes, ...]
    sha256: bytes


def chunk_digest(ciphertexts: Iterable[bytes]) -> bytes:
    """SHA-256 over length-prefixed ciphertexts."""
    h = hashlib.sha256()
    for ct in ciphertexts:
        h.update(struct.pack(">I", len(ct)))
        h.update(ct)
    return h.digest()


def seal_update(ciphertexts: list[bytes]) -> tuple[bytes, list[Chunk]]:
    """(overall digest, checksummed chunks) of an update."""
    chunks = [
        Chunk(i, tuple(ciphertexts[s : s + CIPHERTEXTS_PER_CHUNK]), chunk_digest(ciphertexts[s : s + CIPHERTEXTS_PER_CHUNK]))
        for i, s in enumerate(range(0, len(ciphertexts), CIPHERTEXTS_PER_CHUNK))
    ]
    return chunk_digest(ciphertexts), chunks


class ChunkValidator:
    """The previous aggregator's per-chunk checks: order, sizes, per-chunk and overall SHA-256."""

    def __init__(self, num_ciphertexts: int, num_chunks: int, digest: bytes) -> None:
        self.num_ciphertexts, self.num_chunks, self.digest = num_ciphertexts, num_chunks, digest
        self._next_index = 0
        self._count = 0
        self._digest = hashlib.sha256()

    def accept(self, chunk: Chunk) -> tuple[bytes, ...]:
        if chunk.index != self._next_index or chunk.index >= self.num_chunks:
            raise PreviousFormatError(f"chunk {chunk.index} out of order")
        if self._count + len(chunk.ciphertexts) > self.num_ciphertexts:
            raise PreviousFormatError("more ciphertexts than the header announced")
        for ct in chunk.ciphertexts:
            if len(ct) > MAX_CIPHERTEXT_BYTES:
                raise PreviousFormatError(f"a ciphertext of {len(ct)} bytes")
        if chunk_digest(chunk.ciphertexts) != chunk.sha256:
            raise PreviousFormatError(f"chunk {chunk.index} failed its checksum")
        for ct in chunk.ciphertexts:
            self._digest.update(struct.pack(">I", len(ct)))
            self._digest.update(ct)
        self._next_index += 1
        self._count += len(chunk.ciphertexts)
        return chunk.ciphertexts

    def finish(self) -> None:
        if self._next_index != self.num_chunks or self._count != self.num_ciphertexts:
            raise PreviousFormatError("update is truncated")
        if self._digest.digest() != self.digest:
            raise PreviousFormatError("the update's digest does not match its header")


# ---------------------------------------------------------------------------------------------
# the previous aggregator as a whole process: 8c54b64's own code


def extract_previous_tree(repo: Path, dest: Path, commit: str = PREVIOUS_COMMIT) -> Path:
    """8c54b64's ``secagg`` package under ``dest`` (from the repository's history); raises if git cannot give it."""
    tar = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit, "secagg"],
                         capture_output=True, check=True, timeout=120).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    return dest


def previous_env(tree: Path) -> dict[str, str]:
    """Environment that makes ``import secagg`` load the previous tree (run with ``cwd=tree``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _proc_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drive(args: argparse.Namespace) -> dict:
    """Run under the previous tree: one round on the previous ``secagg serve``, submissions in groups."""
    import secagg
    from secagg import ciphertexts, envelope
    from secagg.packing import ModelSpec
    from secagg.transport import secagg_pb2 as pb
    from secagg.transport.client import AggregatorClient
    from secagg.transport.server import chunk_to_pb

    assert Path(secagg.__file__).resolve().is_relative_to(Path(args.tree).resolve()), secagg.__file__
    groups = [int(g) for g in args.groups.split(",")]
    n = args.params
    theta = (np.random.default_rng(args.seed).standard_normal(n, dtype=np.float32) * np.float32(0.05)).astype(np.float64)
    key = secagg.load_client_key(args.client_key)
    template = {"w": np.zeros(n, np.float32)}
    out: dict = {"secagg_file": secagg.__file__}
    with AggregatorClient(args.server) as client:
        client.server_info()
        out["idle_rss_kb"] = _proc_kb(args.server_pid, "VmRSS")
        status = secagg.create_round(args.server, args.round, template, clients=sum(groups))
        bounds = ciphertexts.Bounds(status.expected, status.max_weight, status.value_bound)
        t0 = time.perf_counter()
        blobs = ciphertexts.encrypt(key, ciphertexts.encode_update(theta, 1.0, bounds))
        out["encrypt_seconds"] = time.perf_counter() - t0
        header, chunks = envelope.seal_update(args.round, "x", key.key_id, ModelSpec.of(template).hash, blobs)
        out["num_ciphertexts"] = len(blobs)
        out["submit_wire_bytes"] = (pb.SubmitMessage(header=pb.UpdateHeader(
            format_version=header.format_version, round_id=header.round_id, client_id="site-0000",
            key_id=header.key_id, spec_hash=header.spec_hash, num_ciphertexts=header.num_ciphertexts,
            num_chunks=header.num_chunks, digest=header.digest)).ByteSize() + 5
            + sum(pb.SubmitMessage(chunk=chunk_to_pb(c)).ByteSize() + 5 for c in chunks))
        sent = 0
        out["groups"] = []
        for size in groups:
            cpu0, w0 = _proc_cpu_seconds(args.server_pid), time.perf_counter()
            for _ in range(size):  # the same encrypted payload under a new client id each time
                client.submit(dataclasses.replace(header, client_id=f"site-{sent:04d}"), chunks)
                sent += 1
            w1, cpu1 = time.perf_counter(), _proc_cpu_seconds(args.server_pid)
            out["groups"].append({"submissions": size, "wall_seconds": w1 - w0, "server_cpu_seconds": cpu1 - cpu0,
                                  "server_rss_kb": _proc_kb(args.server_pid, "VmRSS"),
                                  "server_peak_rss_kb": _proc_kb(args.server_pid, "VmHWM")})
        out["round_state"] = client.status(args.round)[0].state
        if args.fetch and out["round_state"] == "closed":
            head, stream = client.fetch(args.round, 30.0)
            out["fetch_wire_bytes"] = (pb.AggregateMessage(header=head).ByteSize() + 5
                                       + sum(pb.AggregateMessage(chunk=chunk_to_pb(c)).ByteSize() + 5 for c in stream))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the previous format's client, run under 8c54b64's tree (wire.py starts it)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="create a round on the previous secagg serve and submit in groups")
    s.add_argument("--tree", required=True, help="the extracted 8c54b64 tree this process runs under")
    s.add_argument("--server", required=True)
    s.add_argument("--server-pid", type=int, required=True)
    s.add_argument("--client-key", required=True)
    s.add_argument("--round", required=True)
    s.add_argument("--params", type=int, required=True)
    s.add_argument("--groups", required=True, help="comma-separated group sizes; the round expects their sum")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fetch", action="store_true", help="after the round closes, download its sum (bytes only)")
    args = p.parse_args(argv)
    print(json.dumps(_drive(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
