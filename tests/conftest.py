"""Shared fixtures of the core, transport, CLI and crash tests.

Keys are generated once per session (keygen is cheap, but there is no reason to repeat it).
Models are small random npz files or dicts of named numpy tensors; the helpers are fixtures that
return plain functions, so tests need not import from this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

import secagg
from secagg.keys import ClientKey, KeyPaths, ServerKey

# A small, realistic layout: a dense layer, a bias, an odd-sized tensor and an integer counter
# that is copied from the template, never aggregated. 4096 + 64 + 7 + 640 = 4807 floats.
SMALL_LAYOUT: dict[str, tuple[tuple[int, ...], str]] = {
    "dense/kernel": ((64, 64), "float32"),
    "dense/bias": ((64,), "float32"),
    "odd": ((7,), "float64"),
    "out/kernel": ((64, 10), "float32"),
    "steps": ((), "int64"),
}


def random_tensors(rng: np.random.Generator, layout: Mapping[str, tuple[tuple[int, ...], str]] = SMALL_LAYOUT,
                   scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random named tensors of ``layout``: floats ~ N(0, scale), integers in [0, 1000)."""
    out = {}
    for name, (shape, dtype) in layout.items():
        if np.dtype(dtype).kind == "f":
            out[name] = (rng.standard_normal(shape) * scale).astype(dtype)
        else:
            out[name] = np.asarray(rng.integers(0, 1000, size=shape), dtype=dtype)
    return out


def save_npz(path: Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """Write ``tensors`` as an npz archive whose member order is the dict's order."""
    path = Path(path)
    with open(path, "wb") as f:
        np.savez(f, **tensors)
    return path


def weighted_average(models: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """The float64 reference: weighted mean of every floating tensor (others are not averaged)."""
    w = np.asarray(weights, dtype=np.float64)
    out = {}
    for name, first in models[0].items():
        if np.asarray(first).dtype.kind == "f":
            stack = np.stack([np.asarray(m[name], dtype=np.float64) for m in models])
            out[name] = np.tensordot(w, stack, axes=1) / w.sum()
    return out


def assert_close_to_average(result: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], atol: float = 1e-6,
                            template: Mapping[str, np.ndarray] | None = None) -> None:
    """Every float tensor within ``atol`` of the reference; non-float tensors equal the template's."""
    for name, exp in expected.items():
        got = np.asarray(result[name], dtype=np.float64)
        assert got.shape == exp.shape, name
        err = float(np.max(np.abs(got - exp))) if exp.size else 0.0
        assert err <= atol, f"{name}: max error {err:.3g} > {atol}"
    if template is not None:
        for name, arr in template.items():
            if np.asarray(arr).dtype.kind != "f":
                np.testing.assert_array_equal(result[name], arr)


def release_bound(expected_clients: int, max_weight: float, value_bound: float, weights, peak: float) -> float:
    """The largest error of a released weighted average (issue 10: "exact within the release grid").

    A client rounds the decrypted weighted sums S and the summed weight W to the grid g of the
    number of contributions n (secagg.release) before dividing, so each is off by at most
    e = g/2 + 10 noise_std(n), and S'/W' - S/W = (e_S - A e_W) / W' is at most e (1 + |A|) / (W - e).
    W is the summed *encoded* weight: headroom * sum(weights) / max_weight, headroom =
    2^18 / (expected_clients * value_bound) (secagg.slots). ``peak`` bounds |A|; the last term is the
    float32 of a model file.
    """
    from secagg.release import grid, noise_std
    from secagg.slots import VALUE_LIMIT

    n = len(weights)
    e = grid(n) / 2 + 10 * noise_std(n)
    encoded = VALUE_LIMIT / (expected_clients * value_bound) * float(sum(weights)) / max_weight
    return e * (1 + peak) / (encoded - e) + peak * 2.0**-24


def release_tolerance(status, models: list[Mapping[str, np.ndarray]], weights, strict: bool = True) -> float:
    """The error a released average of ``models`` may have in ``status``'s round (:func:`release_bound`).

    ``strict``: the weights are close to the round's max weight (sample counts, or a max weight
    chosen for them), so the bound is also held to the old "exact to 1e-6".
    """
    peak = max(float(np.max(np.abs(v))) for v in weighted_average(models, weights).values() if v.size)
    bound = release_bound(status.expected, status.max_weight, status.value_bound, weights, peak)
    if strict:
        assert bound < 1e-6, f"the round's release grid allows errors up to {bound:.3g}: not a strict case"
    return bound


def sealed_update(key, status, client_id: str, tensors: Mapping[str, np.ndarray], weight: float = 1.0, tls=None):
    """(header, chunks) of an update exactly as secagg.submit builds them, for sending with the raw client."""
    from secagg.packing import ModelSpec, flatten
    from secagg.updates import seal_update

    update = seal_update(key, status, client_id, flatten(ModelSpec.of(tensors), tensors), weight, tls)
    return update.header, update.chunks


def reseal(key, status, client_id: str, pairs, per_chunk: int = 24, tls=None):
    """(header, chunks) of the (c0, seed) ``pairs`` with valid digests and a valid contribution record, as
    a client holding client.key could send them: for updates whose ciphertexts (or cut) a test changed."""
    from secagg import contribution, envelope

    pairs = list(pairs)
    chunks = envelope.split_chunks(pairs, per_chunk)
    digest = envelope.update_digest(c.digest for c in chunks)
    record = contribution.make(key, status.terms(), client_id, digest,
                               contribution.seeds_digest(seed for _, seed in pairs), tls)
    header = envelope.Header(status.round_id, client_id, key.key_id, status.spec_hash, len(pairs), len(chunks),
                             digest, record)
    return header, chunks


def ciphertext_pairs(chunks) -> list[tuple[bytes, bytes]]:
    """Every (c0, seed) of an update's chunks, in order."""
    return [pair for c in chunks for pair in zip(c.c0s, c.seeds)]


class Helpers:
    """Functions shared by the tests, exposed through the ``helpers`` fixture."""

    SMALL_LAYOUT = SMALL_LAYOUT
    random_tensors = staticmethod(random_tensors)
    save_npz = staticmethod(save_npz)
    weighted_average = staticmethod(weighted_average)
    assert_close_to_average = staticmethod(assert_close_to_average)
    sealed_update = staticmethod(sealed_update)
    release_bound = staticmethod(release_bound)
    release_tolerance = staticmethod(release_tolerance)
    reseal = staticmethod(reseal)
    ciphertext_pairs = staticmethod(ciphertext_pairs)


@pytest.fixture(scope="session")
def helpers() -> type[Helpers]:
    return Helpers


@pytest.fixture
def rng(request) -> np.random.Generator:
    # Seeded per test (by its name) so a failure reproduces.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# -- keys ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keypair(tmp_path_factory) -> KeyPaths:
    """The federation's key files (client.key, server.key)."""
    return secagg.keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory) -> KeyPaths:
    """A second, unrelated federation."""
    return secagg.keygen(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture(scope="session")
def client_key(keypair) -> ClientKey:
    return secagg.load_client_key(keypair.client)


@pytest.fixture(scope="session")
def server_key(keypair) -> ServerKey:
    return secagg.load_server_key(keypair.server)


@pytest.fixture(scope="session")
def other_client_key(other_keypair) -> ClientKey:
    return secagg.load_client_key(other_keypair.client)


# -- an in-process aggregator -------------------------------------------------------------------


@pytest.fixture
def server(keypair, tmp_path):
    """A running aggregator (secagg.serve) on 127.0.0.1 with a free port; stopped afterwards.

    Its minimum cohort is 1, so that tests of round mechanics can use one or two clients; the
    default of 3 and its enforcement are tested in tests/privacy/test_cohort.py.
    """
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "server-state", min_cohort=1)
    try:
        yield srv
    finally:
        srv.stop(grace=0)


@pytest.fixture
def npz_models(tmp_path, rng) -> Callable[..., tuple[list[Path], list[dict[str, np.ndarray]]]]:
    """``make(n, layout=SMALL_LAYOUT)``: n random npz models on disk, and their tensors."""

    def make(n: int, layout=SMALL_LAYOUT, prefix: str = "site") -> tuple[list[Path], list[dict[str, np.ndarray]]]:
        tensors = [random_tensors(rng, layout) for _ in range(n)]
        paths = [save_npz(tmp_path / f"{prefix}-{i}.npz", t) for i, t in enumerate(tensors)]
        return paths, tensors

    return make


# -- a `secagg serve` subprocess ------------------------------------------------------------------

SERVING = re.compile(r"secagg: serving on (\S+)")


def secagg_command(*args: str) -> list[str]:
    """The installed console script if on PATH next to this interpreter, else ``python -m secagg.cli``."""
    exe = Path(sys.executable).with_name("secagg")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "secagg.cli", *args]


class ServeProcess:
    """``secagg serve`` as a child process; its address is parsed from the "serving on" line."""

    def __init__(self, key: Path, state_dir: Path, listen: str = "127.0.0.1:0", timeout: float = 60.0,
                 extra: tuple[str, ...] = ()) -> None:
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            secagg_command("serve", "--key", str(key), "--listen", listen, "--state-dir", str(state_dir), *extra),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_quiet_env(),
        )
        found = threading.Event()
        self.address = ""

        def pump() -> None:  # keep reading stderr so the server never blocks on a full pipe
            for line in self.proc.stderr:
                self.log.append(line)
                m = SERVING.search(line)
                if m and not found.is_set():
                    self.address = m.group(1)
                    found.set()
            found.set()

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()
        found.wait(timeout)
        if not self.address:
            self.kill()
            raise RuntimeError("secagg serve did not start:\n" + "".join(self.log))

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind happens in the server."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._reader.join(10)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._reader.join(10)


def _quiet_env() -> dict[str, str]:
    # The user's environment as is (nothing that would hide output a user would see), unbuffered.
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, timeout: float = 180.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the ``secagg`` command; returns the completed process (text stdout/stderr)."""
    return subprocess.run(secagg_command(*args), capture_output=True, text=True, timeout=timeout,
                          env=env or _quiet_env())


@pytest.fixture
def serve_process(keypair, tmp_path):
    """``start(state_dir=..., listen=...)``: start ``secagg serve`` subprocesses; all are killed afterwards."""
    started: list[ServeProcess] = []

    def start(state_dir: Path | None = None, listen: str = "127.0.0.1:0", key: Path | None = None,
              extra: tuple[str, ...] = ()) -> ServeProcess:
        p = ServeProcess(key or keypair.server, state_dir or tmp_path / "serve-state", listen, extra=extra)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


def popen_cli(*args: str) -> subprocess.Popen:
    """Start the ``secagg`` command without waiting (text stdout/stderr pipes)."""
    return subprocess.Popen(secagg_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_quiet_env())


@pytest.fixture(scope="session")
def cli():
    """``cli(*args)``: run the secagg command and return the CompletedProcess."""
    return run_cli


@pytest.fixture(scope="session")
def cli_popen():
    """``cli_popen(*args)``: start the secagg command in the background; returns the Popen."""
    return popen_cli


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` passes (False). Not a timing assertion."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


Helpers.wait_for = staticmethod(wait_for)


def submit_each(address: str, round_id: str, key, pki, paths, weights, names, retry_for: float = 5.0) -> list:
    """Every named site submits at once with its own certificate (``secagg.submit``, which runs a masked
    round's stages itself); each one's Receipt, or the SecAggError it raised."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name, path, weight):
        try:
            return secagg.submit(address, round_id, key, name, path, weight, tls=pki.client(name), retry_for=retry_for)
        except secagg.SecAggError as exc:
            return exc

    with ThreadPoolExecutor(len(names)) as pool:
        return [f.result() for f in [pool.submit(one, n, p, w) for n, p, w in zip(names, paths, weights)]]


Helpers.submit_each = staticmethod(submit_each)


# -- TLS certificates (secagg certs) --------------------------------------------------------------


class PKI:
    """A development CA made by ``secagg.certs``: the aggregator's certificate (localhost, 127.0.0.1),
    an admin (CN admin, OU secagg-admin), clients site0..site5, and a second, unrelated CA."""

    SITES = ("site0", "site1", "site2", "site3", "site4", "site5")

    def __init__(self, root: Path) -> None:
        from secagg import certs

        self.dir, self.other_dir = root / "ca", root / "other-ca"
        self.ca = certs.init_ca(self.dir).cert
        self.server = certs.issue(self.dir, "server", server=True)
        self.certs = {name: certs.issue(self.dir, name) for name in self.SITES}
        self.certs["admin"] = certs.issue(self.dir, "admin", admin=True)
        self.other_ca = certs.init_ca(self.other_dir).cert
        self.other_certs = {"site0": certs.issue(self.other_dir, "site0"),
                            "server": certs.issue(self.other_dir, "server", server=True)}

    def server_tls(self, mutual: bool = True):
        """The aggregator's settings: mutual TLS (clients need a certificate from this CA) or TLS only."""
        return secagg.ServerTLS(self.server.cert, self.server.key, self.ca if mutual else None)

    def client(self, name: str | None):
        """A client trusting this CA, with ``name``'s certificate (None: no client certificate)."""
        if name is None:
            return secagg.ClientTLS(self.ca)
        return secagg.ClientTLS(self.ca, self.certs[name].cert, self.certs[name].key)

    def env(self, name: str) -> dict[str, str]:
        """The SECAGG_TLS_* variables for ``name``."""
        return {"SECAGG_TLS_CA": str(self.ca), "SECAGG_TLS_CERT": str(self.certs[name].cert),
                "SECAGG_TLS_KEY": str(self.certs[name].key)}


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mtls_server(keypair, pki, tmp_path):
    """A running aggregator on 127.0.0.1 with mutual TLS (credentials enforced); stopped afterwards."""
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "mtls-state", tls=pki.server_tls())
    try:
        yield srv
    finally:
        srv.stop(grace=0)
