"""Key files: what keygen writes, what each kind holds, and that damaged files are refused."""

from __future__ import annotations

import json
import stat
import struct

import numpy as np
import pytest
import tenseal.sealapi as seal

import secagg
from secagg import ciphertexts, keys
from secagg.errors import AggregateCheckError, KeyFileError
from secagg.keys import ClientKey, ServerKey, load_client_key, load_key, load_server_key
from secagg.rounds import Aggregator


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
    assert "secret_key" not in server_blobs and server_header["kind"] == "server"
    assert client_header["kind"] == "client"
    # The parameters are the same, so the server can parse and add ciphertexts.
    assert server_blobs["params"] == client_blobs["params"]

    with pytest.raises(KeyFileError, match="server key"):
        load_client_key(keypair.server)
    server_key = load_server_key(keypair.server)
    assert not hasattr(server_key, "secret_key")


def test_aggregator_refuses_client_key(keypair, tmp_path):
    with pytest.raises(KeyFileError, match="secret key"):
        load_server_key(keypair.client)
    with pytest.raises(KeyFileError, match="never the client's secret key"):
        Aggregator(load_client_key(keypair.client), tmp_path / "state")
    with pytest.raises(KeyFileError):
        secagg.serve(keypair.client, "127.0.0.1:0", tmp_path / "state2")
    assert not (tmp_path / "state").exists()


def test_a_different_secret_key_of_the_same_params_decrypts_garbage(client_key):
    """What the aggregator would need to read an update is the secret key; any other key gives garbage."""
    bounds = ciphertexts.Bounds(3, 1000.0, 10.0)
    theta = np.linspace(-1, 1, 5000)
    blobs = ciphertexts.encrypt(client_key, ciphertexts.encode_update(theta, 10.0, bounds))

    # The right key: exact (sanity check that the test can tell the two apart).
    right = ciphertexts.decrypt(client_key, blobs, theta.size + ciphertexts.EXTRA_SLOTS)
    mean, weight = ciphertexts.decode_aggregate(right, 1, bounds)
    assert np.max(np.abs(mean - theta)) < 1e-6 and abs(weight - 10.0) < 1e-6

    # A fresh secret key with the federation's very parameters (and even its key id).
    other_secret = seal.KeyGenerator(client_key.context).secret_key()
    impostor = ClientKey(client_key.key_id, client_key.params, other_secret)
    wrong = ciphertexts.decrypt(impostor, blobs, theta.size + ciphertexts.EXTRA_SLOTS)
    assert np.max(np.abs(wrong[: theta.size] - right[: theta.size])) > 1.0
    with pytest.raises(AggregateCheckError, match="wrong client.key"):
        ciphertexts.decode_aggregate(wrong, 1, bounds)


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


@pytest.mark.parametrize("which", ["client", "server"])
@pytest.mark.parametrize("damage", ["empty", "magic", "header-cut", "blob-cut", "header-json", "missing-blob"])
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
    elif damage == "blob-cut":
        bad = data[:-100]
    elif damage == "header-json":
        bad = data[:12] + b"{" * n + data[12 + n :]
    else:  # a well-formed header that lists no params
        header = json.loads(data[12 : 12 + n])
        header["blobs"] = [b for b in header["blobs"] if b[0] != "params"]
        head = json.dumps(header).encode()
        bad = data[:8] + struct.pack(">I", len(head)) + head
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
