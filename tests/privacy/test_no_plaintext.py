"""Audit 2: no plaintext weights reach the aggregator.

Three sites submit models full of distinctive values to a ``secagg serve`` subprocess through a
recording TCP relay. Neither the bytes the aggregator receives (or sends), nor any file in its state
dir (mid-round and after close), nor its stdout/stderr contain any encoding of those values: the raw
values or the weighted values a client actually encrypts, as float32 or float64 in either byte
order, or as decimal text. The same search finds every one of those encodings in plaintext.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np

import secagg
from secagg import slots, store
from secagg.packing import ModelSpec, flatten
from secagg.updates import checks

from .conftest import RecordingRelay, found, windows

VALUES = {"1234.5678": 1234.5678, "-8765.4321": -8765.4321, "1000*pi": 1000 * math.pi, "-100*e": -100 * math.e}
VALUE_BOUND = 10_000.0  # the round's bound on |parameter|: above every distinctive value
MAX_WEIGHT = 20.0
WEIGHTS = (3.0, 7.0, 11.0)
ROUND = "plaintext-check"


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A float32 kernel tiled with the distinctive values, float64 ones in 'odd', random elsewhere."""
    tile = np.array(list(VALUES.values()))
    return {
        "dense/kernel": np.resize(tile, (32, 32)).astype(np.float32),
        "dense/bias": rng.standard_normal(32).astype(np.float32),
        "odd": np.concatenate([tile, rng.standard_normal(5)]),
        "steps": np.asarray(7, dtype=np.int64),
    }


def _binary(kind: str, values: list[float], pairs: bool = True) -> dict[str, bytes]:
    """float64 of each value and float32 of each value with its neighbour in the tile, both byte orders.

    float32 is searched as 8-byte neighbour pairs: any 4 bytes occur by chance in about one of 10^4
    haystacks of this size, 8 bytes practically never; a float32 copy of the kernel contains every pair.
    """
    out = {}
    for i, name in enumerate(VALUES):
        for order, prefix in (("LE", "<"), ("BE", ">")):
            out[f"{kind} {name} float64 {order}"] = np.array(values[i], dtype=prefix + "f8").tobytes()
            if pairs:
                pair = [values[i], values[(i + 1) % len(values)]]
                out[f"{kind} {name} float32 {order}"] = np.array(pair, dtype=prefix + "f4").tobytes()
    return out


def _text(kind: str, values: list[float]) -> dict[str, bytes]:
    out = {}
    for name, v in zip(VALUES, values):
        for form in (repr(float(v)), f"{v:.4f}", f"{v:.2f}", str(np.float32(v)), repr(float(np.float32(v)))):
            out[f"{kind} {name} text {form!r}"] = form.encode()
    return out


def _needles(models: list[dict[str, np.ndarray]], status, key) -> tuple[dict[str, bytes], list[np.ndarray]]:
    """Every encoding searched for, and each client's encoded vector (what it encrypts)."""
    exact = list(VALUES.values())
    as_float32 = [float(np.float32(v)) for v in exact]  # the kernel's values, widened by flatten
    needles = _binary("value", exact) | _binary("float32 value", as_float32) | _text("value", exact)
    spec = ModelSpec.of(models[0])
    bounds = slots.Bounds(status.expected, status.max_weight, status.value_bound)
    encoded = []
    for i, (model, weight) in enumerate(zip(models, WEIGHTS)):
        theta = flatten(spec, model)
        # [w*theta, w, 0..., count 1, 16 check slots], as secagg.submit encrypts it
        e = slots.encode_update(theta, weight, bounds, checks(key, status.round_id))
        encoded.append(e)
        in_kernel = [int(np.flatnonzero(theta == v)[0]) for v in as_float32]
        in_odd = [int(np.flatnonzero(theta == v)[0]) for v in exact]
        needles |= _binary(f"site-{i} weighted kernel value", [float(e[j]) for j in in_kernel])
        needles |= _binary(f"site-{i} weighted float64 value", [float(e[j]) for j in in_odd], pairs=False)
        needles |= _text(f"site-{i} weighted value", [float(e[j]) for j in in_odd])
        # The check slots: secret linear combinations of the data, in plaintext they would leak it.
        check = [float(e[slots.COUNT_SLOT + 1 + k]) for k in range(len(VALUES))]
        needles |= _binary(f"site-{i} check slot", check, pairs=False) | _text(f"site-{i} check slot", check)
    return needles, encoded


def _files(root: Path, when: str) -> dict[str, bytes]:
    return {f"{when}: {p.relative_to(root)}": p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _plaintext_stream(paths: list[Path], models, encoded: list[np.ndarray]) -> bytes:
    """Plaintext as a careless client could send it: model files, raw and weighted vectors, text."""
    spec = ModelSpec.of(models[0])
    parts = [p.read_bytes() for p in paths]
    for model, e in zip(models, encoded):
        theta = flatten(spec, model)
        parts += [a.astype(dt).tobytes() for a in (theta, e) for dt in ("<f8", ">f8", "<f4", ">f4")]
        parts += [repr(a.tolist()).encode() + repr(a.astype(np.float32).tolist()).encode() for a in (theta, e)]
        parts += [" ".join(f"{x:.4f} {x:.2f} " + str(np.float32(x)) for x in a).encode() for a in (theta, e)]
    return b"".join(parts)


def test_no_plaintext_weights_reach_the_aggregator(aggregator_process, keypair, tmp_path, helpers, rng):
    models = [_model(rng) for _ in WEIGHTS]
    paths = [helpers.save_npz(tmp_path / f"site-{i}.npz", m) for i, m in enumerate(models)]
    agg = aggregator_process()
    relay = RecordingRelay(agg.address)
    try:
        status = secagg.create_round(relay.address, ROUND, template=paths[0], clients=3, max_weight=MAX_WEIGHT,
                                     value_bound=VALUE_BOUND)
        needles, encoded = _needles(models, status, secagg.load_client_key(keypair.client))

        # Positive controls: the search finds the raw values in the model files submitted, and every
        # needle in a plaintext stream that went through a recording relay like the one in front of
        # the aggregator.
        for path in paths:
            in_file = found(needles, path.read_bytes())
            assert {f"value {n} float64 LE" for n in VALUES} <= set(in_file)  # the float64 tensor
            assert {f"float32 value {n} float32 LE" for n in VALUES} <= set(in_file)  # the float32 kernel
        plaintext = _plaintext_stream(paths, models, encoded)
        with RecordingRelay(None) as sink:
            host, port = sink.address.split(":")
            with socket.create_connection((host, int(port))) as s:
                s.sendall(plaintext)
            assert helpers.wait_for(lambda: len(sink.received()) == len(plaintext))
            missed = set(needles) - set(found(needles, sink.received()))
        assert not missed, f"the search misses plaintext encodings: {sorted(missed)}"

        for i in range(2):
            secagg.submit(relay.address, ROUND, keypair.client, f"site-{i}", paths[i], weight=WEIGHTS[i])
        accepted = agg.state_dir / "rounds" / ROUND / "accepted"
        assert sorted(p.name for p in accepted.iterdir()) == ["site-0", "site-1"]
        haystacks = _files(agg.state_dir, "state dir, 2 of 3 accepted")
        # The relay carried the real updates: the ciphertexts the aggregator stored went through it.
        stored = next(store.iter_blobs(accepted / "site-0"))
        assert sum(w in relay.received() for w in windows(stored, 64, 20, 200)) >= 18

        secagg.submit(relay.address, ROUND, keypair.client, "site-2", paths[2], weight=WEIGHTS[2])
        average = secagg.fetch_average(relay.address, ROUND, keypair.client)
        haystacks |= _files(agg.state_dir, "state dir, closed")
        haystacks["bytes the aggregator received"] = relay.received()
        haystacks["bytes the aggregator sent"] = relay.sent()
        haystacks["aggregator stdout and stderr"] = agg.output()
    finally:
        relay.close()

    # The round worked, and the sites got their values back (every site has the same tile).
    assert average.contributions == 3
    assert any(name.endswith("aggregate") for name in haystacks) and b"round closed" in haystacks[
        "aggregator stdout and stderr"]
    np.testing.assert_allclose(average.vector[:4], np.float32(list(VALUES.values())), rtol=1e-6)

    leaks = {where: found(needles, data) for where, data in haystacks.items()}
    leaks = {where: labels for where, labels in leaks.items() if labels}
    assert not leaks, "plaintext weights on the aggregator's side: " + "; ".join(
        f"{where}: {len(labels)} encodings, e.g. {labels[0]}" for where, labels in leaks.items())
