"""Key files: what keygen writes, what each kind holds, and that damaged files are refused."""

from __future__ import annotations

import json
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest
import tenseal.sealapi as seal

import secagg
from secagg import ciphertexts, keys
from secagg.contribution import CHECK_LABEL, TAG_LABEL
from secagg.errors import AggregateCheckError, KeyFileError
from secagg.keys import ClientKey, Parameters, ServerKey, load_client_key, load_key, load_server_key
from secagg.rounds import Aggregator
from secagg.slots import Bounds, Checks, decode_aggregate, encode_update


def _blobs(path):
    """(header, {name: bytes}) of a key file, parsed independently of secagg.keys."""
    data = path.read_bytes()
    assert data[:8] == keys.MAGIC
    (n,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    pos, out = 12 + n, {}
    for name, size in header["blobs"]:
        out[name] = data[pos : pos + size]
        pos += size
    assert pos == len(data)
    return header, out


def test_keygen_writes_client_key_0600_and_server_key(keypair):
    assert keypair.client.name == "client.key" and keypair.server.name == "server.key"
    assert stat.S_IMODE(keypair.client.stat().st_mode) == 0o600
    assert keypair.server.is_file()
    ck, sk = load_client_key(keypair.client), load_server_key(keypair.server)
    assert isinstance(ck, ClientKey) and type(sk) is ServerKey
    assert ck.key_id == sk.key_id and len(ck.key_id) == 32
    assert type(load_key(keypair.server)) is ServerKey and isinstance(load_key(keypair.client), ClientKey)


def test_key_ids_of_two_keygens_differ(keypair, other_keypair):
    assert load_server_key(keypair.server).key_id != load_server_key(other_keypair.server).key_id
    assert load_client_key(keypair.client).key_id != load_client_key(other_keypair.client).key_id


def test_server_key_contains_no_secret(keypair):
    client_header, client_blobs = _blobs(keypair.client)
    server_header, server_blobs = _blobs(keypair.server)
    secret = client_blobs["secret_key"]
    assert len(secret) > 1000
    assert secret not in keypair.server.read_bytes()
    assert server_blobs == {} and server_header["kind"] == "server" and server_header["format"] == 2
    assert client_header["kind"] == "client"
    # The aggregator's parameters are plain numbers in the header (no SEAL blob): the ones the client's
    # SEAL parameters are (checked when the client key loads), so its sums are of the right polynomials.
    assert (server_header["poly_modulus_degree"], server_header["data_prime"], server_header["scale_bits"]) == (
        8192, keys.DATA_PRIME, 40)

    with pytest.raises(KeyFileError, match="server key"):
        load_client_key(keypair.server)
    server_key = load_server_key(keypair.server)
    assert not hasattr(server_key, "secret_key") and not hasattr(server_key, "derive")
    assert server_key.parameters == Parameters() == load_client_key(keypair.client).parameters


def test_the_aggregator_needs_no_tenseal(keypair, tmp_path):
    """server.key loads, and an aggregator starts and creates a round, in a process where TenSEAL cannot
    be imported."""
    script = f"""
import sys
sys.modules["tenseal"] = None  # any import of tenseal now raises ImportError
sys.modules["tenseal.sealapi"] = None
from secagg.keys import load_server_key
from secagg.packing import ModelSpec, TensorSpec
from secagg.rounds import Aggregator, RoundConfig
key = load_server_key({str(keypair.server)!r})
agg = Aggregator(key, {str(tmp_path / "state")!r})
spec = ModelSpec((TensorSpec("w", (10,), "float32"),))
print(agg.create_round(RoundConfig("r", spec, 3, 3, None)).state)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "collecting"


def test_derived_keys_are_per_purpose_and_per_federation(client_key, other_client_key):
    tag, check = client_key.derive(TAG_LABEL), client_key.derive(CHECK_LABEL)
    assert len(tag) == len(check) == 32 and tag != check
    assert client_key.derive(TAG_LABEL) == tag  # every site of the federation derives the same key
    assert other_client_key.derive(TAG_LABEL) != tag
    assert len(client_key.derive(TAG_LABEL, 64)) == 64
    # Nothing public is enough: the key id and parameters are the server key's, and it derives nothing.
    assert tag not in (client_key.key_id.encode(), bytes.fromhex(client_key.key_id))


def test_aggregator_refuses_client_key(keypair, tmp_path):
    with pytest.raises(KeyFileError, match="secret key"):
        load_server_key(keypair.client)
    with pytest.raises(KeyFileError, match="never the client's secret key"):
        Aggregator(load_client_key(keypair.client), tmp_path / "state")
    with pytest.raises(KeyFileError):
        secagg.serve(keypair.client, "127.0.0.1:0", tmp_path / "state2")
    assert not (tmp_path / "state").exists()


def test_a_different_secret_key_of_the_same_params_decrypts_garbage(client_key, rng):
    """What the aggregator would need to read an update is the secret key; any other key gives garbage,
    and the count slots say so."""
    bounds = Bounds(3, 1000.0, 10.0)
    theta = np.linspace(-1, 1, 5000)
    checks = Checks(client_key.derive(CHECK_LABEL), "r1")
    cts = ciphertexts.encrypt(client_key, encode_update(theta, 10.0, bounds, checks))
    c0s, seeds = [c for c, _ in cts], [[s] for _, s in cts]

    # The right key: exact (sanity check that the test can tell the two apart).
    right = ciphertexts.decrypt(client_key, c0s, seeds)
    sums = decode_aggregate(right, theta.size, 1, checks)
    w = bounds.headroom * 10.0 / 1000.0
    assert np.max(np.abs(sums[:-1] / sums[-1] - theta)) < 1e-6 and abs(sums[-1] - w) < 1e-6

    # A fresh secret key with the federation's very parameters (and even its key id).
    other_secret = seal.KeyGenerator(client_key.context).secret_key()
    impostor = ClientKey(client_key.key_id, client_key.params, other_secret, b"not the federation's secret")
    wrong = ciphertexts.decrypt(impostor, c0s, seeds)
    assert np.max(np.abs(wrong[: theta.size] - right[: theta.size])) > 1.0
    with pytest.raises(AggregateCheckError, match="wrong client.key"):
        decode_aggregate(wrong, theta.size, 1, checks)


def test_keygen_refuses_to_overwrite(tmp_path):
    paths = secagg.keygen(tmp_path)
    before = (paths.client.read_bytes(), paths.server.read_bytes())
    with pytest.raises(KeyFileError, match="already exists"):
        secagg.keygen(tmp_path)
    assert (paths.client.read_bytes(), paths.server.read_bytes()) == before
    # Also when only one of the two files is there: nothing is written.
    paths.client.unlink()
    with pytest.raises(KeyFileError, match="already exists"):
        secagg.keygen(tmp_path)
    assert not paths.client.exists() and paths.server.read_bytes() == before[1]


def _with_header(data: bytes, change) -> bytes:
    (n,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    change(header)
    head = json.dumps(header).encode()
    return data[:8] + struct.pack(">I", len(head)) + head + data[12 + n :]


# The server key (format 2) keeps its parameters in the header, so its header is damaged in more ways.
# (A client key's parameters are its SEAL blob, checked against its key id; its header's copy is unused.)
DAMAGE = [
    ("client", "empty"), ("client", "magic"), ("client", "header-cut"), ("client", "blob-cut"),
    ("client", "header-json"), ("client", "missing-blob"),
    ("server", "empty"), ("server", "magic"), ("server", "header-cut"), ("server", "blob-cut"),
    ("server", "header-json"), ("server", "other-prime"), ("server", "other-degree"),
    ("server", "no-key-id"), ("server", "degree-text"), ("server", "degree-null"),
]


@pytest.mark.parametrize("which, damage", DAMAGE)
def test_corrupt_or_truncated_key_files_are_refused(keypair, tmp_path, which, damage):
    src = keypair.client if which == "client" else keypair.server
    data = src.read_bytes()
    (n,) = struct.unpack(">I", data[8:12])
    if damage == "empty":
        bad = b""
    elif damage == "magic":
        bad = b"NOTAKEY!" + data[8:]
    elif damage == "header-cut":
        bad = data[: 12 + n // 2]
    elif damage == "blob-cut":  # the server key has no blob: this cuts its header
        bad = data[:-100]
    elif damage == "header-json":
        bad = data[:12] + b"{" * n + data[12 + n :]
    elif damage == "missing-blob":  # a well-formed header that lists no params
        bad = _with_header(data, lambda h: h.update(blobs=[b for b in h["blobs"] if b[0] != "params"]))
    elif damage == "other-prime":
        bad = _with_header(data, lambda h: h.update(data_prime=12289))
    elif damage == "other-degree":
        bad = _with_header(data, lambda h: h.update(poly_modulus_degree=16384))
    elif damage == "no-key-id":
        bad = _with_header(data, lambda h: h.pop("key_id"))
    elif damage == "degree-text":
        bad = _with_header(data, lambda h: h.update(poly_modulus_degree="8192x"))
    else:
        bad = _with_header(data, lambda h: h.update(poly_modulus_degree=None))
    path = tmp_path / src.name
    path.write_bytes(bad)
    loader = load_client_key if which == "client" else load_server_key
    with pytest.raises(KeyFileError):
        loader(path)


def test_flipped_secret_key_byte_is_refused(keypair, tmp_path):
    data = bytearray(keypair.client.read_bytes())
    data[-50] ^= 0xFF
    path = tmp_path / "client.key"
    path.write_bytes(bytes(data))
    with pytest.raises(KeyFileError, match="does not match|damaged"):
        load_client_key(path)


def test_missing_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_client_key(tmp_path / "nope.key")
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_server_key(tmp_path / "nope.key")
