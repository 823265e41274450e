"""Audit 1: the aggregator cannot decrypt.

Its key file holds no secret key (format 2: no SEAL blob at all, only the key id and the public
parameters), the key it loads cannot decrypt a real submission, it refuses the client's key, and
the running ``secagg serve`` process never has the secret key in memory, nor SEAL itself.
"""

from __future__ import annotations

import json
import secrets
import struct
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as seal

import secagg
from secagg import ciphertexts, slots, store
from secagg.errors import AggregateCheckError, KeyFileError
from secagg.keys import ClientKey, ServerKey, _save_to_bytes, _SealParameters
from secagg.rounds import Aggregator
from secagg.transport.client import AggregatorClient
from secagg.updates import checks

from .conftest import N, add_mod_q, search_process_memory, windows

PUBLIC_PARAMETERS = ("poly_modulus_degree", "coeff_modulus_bits", "scale_bits", "data_prime")


def _key_file(path: Path) -> tuple[dict, dict[str, bytes], int]:
    """(header, blobs, bytes accounted for), parsed from the documented layout, not with secagg's reader:
    8-byte magic, 4-byte big-endian header length, JSON header, then the blobs it lists."""
    data = path.read_bytes()
    assert data[:8] == b"SECAGGK1"
    (n,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    blobs, pos = {}, 12 + n
    for name, size in header["blobs"]:
        blobs[name] = data[pos : pos + size]
        pos += size
    return header, blobs, pos


def _coefficients(secret_key: seal.SecretKey) -> bytes:
    """The secret key polynomial as it lies in memory: RNS coefficients (NTT form), uint64 little-endian."""
    poly = secret_key.data()
    return np.array([poly[i] for i in range(poly.coeff_count())], dtype="<u8").tobytes()


def _secret_keys_reachable(obj, depth: int = 3) -> list[seal.SecretKey]:
    """SEAL secret keys reachable from ``obj`` through attributes."""
    if isinstance(obj, seal.SecretKey):
        return [obj]
    if depth == 0 or not hasattr(obj, "__dict__"):
        return []
    return [k for v in vars(obj).values() for k in _secret_keys_reachable(v, depth - 1)]


def _seal_objects_reachable(obj, depth: int = 3) -> list:
    """Any SEAL object (context, key, encoder...) reachable from ``obj`` through attributes."""
    if type(obj).__module__ == "_sealapi_cpp":
        return [obj]
    if depth == 0 or not hasattr(obj, "__dict__"):
        return []
    return [o for v in vars(obj).values() for o in _seal_objects_reachable(v, depth - 1)]


def _all_windows(data: bytes, size: int) -> set[bytes]:
    return {data[i : i + size] for i in range(len(data) - size + 1)}


def test_server_key_file_holds_no_secret_key(keypair, client_key):
    server_bytes, client_bytes = keypair.server.read_bytes(), keypair.client.read_bytes()
    server_header, server_blobs, server_end = _key_file(keypair.server)
    client_header, client_blobs, _ = _key_file(keypair.client)
    # Format 2: no blob at all; the public parameters are in the JSON header.
    assert server_header["kind"] == "server" and server_header["format"] == 2 and server_blobs == {}
    assert server_end == len(server_bytes), "server.key has bytes beyond the blobs its header lists"
    # What the two files legitimately share: the key id and the public parameters, which the client's
    # SEAL parameter blob encodes too.
    assert server_header["key_id"] == client_header["key_id"]
    assert {k: server_header[k] for k in PUBLIC_PARAMETERS} == {k: client_header[k] for k in PUBLIC_PARAMETERS}
    seal_params = _SealParameters(client_blobs["params"])
    assert seal_params.context.first_context_data().parms().coeff_modulus()[0].value() == server_header["data_prime"]

    serialized = client_blobs["secret_key"]  # the secret key exactly as client.key stores it
    in_memory = _coefficients(client_key.secret_key)
    assert len(serialized) > 100_000 and len(in_memory) == 8192 * 2 * 8
    # Positive control: the search finds the secret in client.key, in both forms.
    assert serialized in client_bytes
    client_windows = _all_windows(client_bytes, 32)
    assert sum(in_memory[i : i + 32] in client_windows for i in range(0, len(in_memory), 32)) >= 0.99 * len(in_memory) / 32
    # server.key: not one 32-byte window of the secret, at any offset, in either form.
    server_windows = _all_windows(server_bytes, 32)
    assert not any(serialized[i : i + 32] in server_windows for i in range(len(serialized) - 31))
    assert not any(in_memory[i : i + 32] in server_windows for i in range(len(in_memory) - 31))

    # Loaded, it is a ServerKey holding no SEAL object at all (the same search finds the client's).
    key = secagg.load_server_key(keypair.server)
    assert type(key) is ServerKey and not hasattr(key, "secret_key")
    assert _secret_keys_reachable(key) == [] and _seal_objects_reachable(key) == []
    assert len(_secret_keys_reachable(client_key)) == 1 and _seal_objects_reachable(client_key)


def test_server_key_cannot_decrypt_a_submitted_update(server, keypair, client_key, tmp_path, helpers, rng):
    models = [helpers.random_tensors(rng) for _ in range(2)]
    secagg.create_round(server.address, "blind", template=models[0], clients=3)
    for i, model in enumerate(models):
        secagg.submit(server.address, "blind", keypair.client, f"site-{i}", model, weight=10.0)
    # The aggregator's own copy of a submission, from its state dir (the round is still collecting):
    # per ciphertext the first polynomial and the seed of the second, nothing else.
    (stored,) = store.iter_blobs(tmp_path / "server-state" / "rounds" / "blind" / "accepted" / "site-0")
    c0, seed = stored[: N * 8], stored[N * 8 :]
    assert len(seed) == 64
    num_params = server.core.round_config("blind").spec.num_params
    # Positive control: with client.key it decrypts to a real update, count slot 1, checks holding.
    reals = ciphertexts.decrypt(client_key, [c0], [[seed]])
    assert abs(reals[slots.COUNT_SLOT] - 1.0) < 1e-6
    slots.decode_aggregate(reals, num_params, 1, checks(client_key, "blind"))

    key = secagg.load_server_key(keypair.server)
    with pytest.raises(AttributeError, match="'ServerKey' object has no attribute 'context'"):
        ciphertexts.decrypt(key, [c0], [[seed]])
    # In SEAL itself, on the public parameters: the only secret key one can make without key material
    # is empty, and refused.
    public = _SealParameters()
    with pytest.raises(ValueError, match="secret key is not valid for encryption parameters"):
        seal.Decryptor(public.context, seal.SecretKey())
    # A secret key the aggregator generates from the public parameters decrypts to garbage (SEAL does
    # not bind ciphertexts to keys, so it raises nothing) and the count check refuses it.
    own_secret = seal.KeyGenerator(public.context).secret_key()
    own = ClientKey(key.key_id, public, own_secret, _save_to_bytes(own_secret))
    garbage = ciphertexts.decrypt(own, [c0], [[seed]])
    assert np.median(np.abs(garbage)) > 1e6 and abs(garbage[slots.COUNT_SLOT] - 1.0) > 1.0
    with pytest.raises(AggregateCheckError, match="counts .* contributions but the round lists 1"):
        slots.decode_aggregate(garbage, num_params, 1, checks(own, "blind"))


def test_aggregator_refuses_the_client_key(keypair, client_key, tmp_path, cli):
    state = tmp_path / "state"
    with pytest.raises(KeyFileError, match="never the client's secret key"):
        Aggregator(client_key, state)
    sneaky = ServerKey(client_key.key_id, client_key.parameters)
    sneaky.secret_key = client_key.secret_key  # a server key with a secret attached
    with pytest.raises(KeyFileError, match="never the client's secret key"):
        Aggregator(sneaky, state)
    assert not state.exists(), "the aggregator touched its state dir before refusing the key"
    with pytest.raises(KeyFileError, match="contains the secret key; give the aggregator server.key"):
        secagg.load_server_key(keypair.client)
    with pytest.raises(KeyFileError, match="contains the secret key"):
        secagg.serve(keypair.client, "127.0.0.1:0", state)
    run = cli("serve", "--key", str(keypair.client), "--listen", "127.0.0.1:0", "--state-dir", str(state), timeout=60)
    assert run.returncode == 1
    assert "contains the secret key; give the aggregator server.key" in run.stderr
    assert "serving on" not in run.stderr


def test_running_aggregator_never_holds_the_secret_key(aggregator_process, keypair, client_key, helpers, rng):
    agg = aggregator_process()
    _, client_blobs, _ = _key_file(keypair.client)
    serialized, in_memory = client_blobs["secret_key"], _coefficients(client_key.secret_key)
    # 64-byte windows of the secret key's polynomial data: as client.key serializes it (past its
    # headers), and as SEAL holds it in memory (coefficient-aligned, in both RNS components).
    secret = {f"serialized secret key @{i}": w for i, w in enumerate(windows(serialized, 64, 8, 256, len(serialized) - 64))}
    secret |= {f"in-memory secret key @{i}": w for i, w in enumerate(windows(in_memory, 64, 8))}

    round_id = f"memscan-{secrets.token_hex(8)}"
    models = [helpers.random_tensors(rng) for _ in range(3)]
    status = secagg.create_round(agg.address, round_id, template=models[0], clients=3)
    submitted = []
    with AggregatorClient(agg.address) as client:
        for i in range(2):
            header, chunks = helpers.sealed_update(client_key, status, f"site-{i}", models[i], 5.0 + i)
            assert client.submit(header, chunks).submitted == i + 1
            submitted.append(chunks[0].c0s[0])
    # Positive control, the same kind of data as the key: the aggregator's running sum of the two
    # updates' first polynomials is live in its memory as uint64 words mod q (NTT form), exactly
    # like a secret key's coefficients; compute it here to know its bytes.
    running_sum = add_mod_q(*submitted)
    assert len(running_sum) == 8192 * 8
    controls = {"round id": round_id.encode()}
    controls |= {f"running encrypted sum @{i}": w for i, w in enumerate(windows(running_sum, 64, 4))}

    try:
        hits = search_process_memory(agg.pid, secret | controls)
    except PermissionError as exc:
        pytest.skip(f"the kernel does not let the test read its child's memory ({exc}); the scan cannot run here")
    assert set(controls) <= hits, f"the scan missed its positive controls: {sorted(set(controls) - hits)}"
    leaked = sorted(hits & set(secret))
    assert not leaked, "the secret key is in the aggregator's memory"
    # The aggregator does not even load SEAL (format 2 adds with numpy); this test process does.
    assert _seal_libraries(agg.pid) == [] and _seal_libraries("self") != []

    # After the round closes (sum written, individual updates dropped) and the sum is fetched.
    secagg.submit(agg.address, round_id, keypair.client, "site-2", models[2], weight=7.0)
    average = secagg.fetch_average(agg.address, round_id, keypair.client)
    assert average.contributions == 3
    hits = search_process_memory(agg.pid, secret | {"round id": round_id.encode()})
    assert "round id" in hits
    leaked = sorted(hits & set(secret))
    assert not leaked, "the secret key is in the aggregator's memory after the round"
    assert _seal_libraries(agg.pid) == []


def _seal_libraries(pid) -> list[str]:
    """The TenSEAL/SEAL shared objects mapped into process ``pid``."""
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1] for line in f if "seal" in line.split()[-1].lower()})
