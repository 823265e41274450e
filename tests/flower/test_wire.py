"""secagg's messages packed into Flower Arrays: round trips, and every malformed packing refused before an add."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from flwr.app import Array

from secagg.errors import EnvelopeError, SecAggError
from secagg.flower import wire
from secagg.packing import ModelSpec
from secagg.rounds import Aggregator, RoundConfig
from secagg.updates import seal_update

N = 9000  # two ciphertexts: more than one frame of chunks is not needed, more than one ciphertext is


@pytest.fixture
def round_and_update(server_key, client_key, tmp_path):
    core = Aggregator(server_key, tmp_path / "state", min_cohort=1)
    spec = ModelSpec.of({"w": np.zeros(N, np.float32)})
    status = core.create_round(RoundConfig("r1", spec, 1, 1, None, 10.0, 10.0, key_id=client_key.key_id))
    theta = np.random.default_rng(0).normal(size=N)
    sealed = seal_update(client_key, status, "site-a", theta, 2.0)
    return core, status, spec, sealed, theta


def _frames(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4:pos + 4 + size])
        pos += 4 + size
    return out


def _packed(frames: list[bytes], stype=wire.UPDATE_STYPE) -> Array:
    data = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    return Array(dtype="uint8", shape=(len(data),), stype=stype, data=data)


def test_an_update_round_trips_into_the_aggregator_and_the_sum_back(round_and_update, client_key):
    from secagg.api import open_served

    core, status, spec, sealed, theta = round_and_update
    packed = wire.pack_update(sealed.header, sealed.chunks)
    # The packing adds next to nothing to the ciphertexts (8 bytes per slot of 8192 per ciphertext).
    assert packed.stype == wire.UPDATE_STYPE
    assert sealed.wire_bytes < len(packed.data) < sealed.wire_bytes + 2048
    header, chunks = wire.read_update(packed)
    assert core.submit(header, chunks).submitted == 1
    agg = wire.pack_aggregate(core.aggregate("r1"))
    head, served = wire.read_aggregate(agg)
    average = open_served(client_key, core.status("r1"), spec, head, served, min_cohort=1)
    assert np.abs(average.vector - theta).max() < 1e-6


@pytest.mark.parametrize("damage", ["flip", "reorder", "trailing", "no-header", "two-headers", "truncated", "stype"])
def test_a_damaged_update_is_refused_and_nothing_is_added(round_and_update, damage):
    core, status, spec, sealed, theta = round_and_update
    packed = wire.pack_update(sealed.header, sealed.chunks)
    frames = _frames(packed.data)
    assert len(frames) >= 2
    if damage == "flip":
        last = bytearray(frames[-1])
        last[len(last) // 2] ^= 0x40
        bad = _packed(frames[:-1] + [bytes(last)])
    elif damage == "reorder":
        bad = _packed([frames[1], frames[0], *frames[2:]])
    elif damage == "trailing":
        bad = Array(dtype="uint8", shape=(len(packed.data) + 2,), stype=wire.UPDATE_STYPE, data=packed.data + b"\0\0")
    elif damage == "no-header":
        bad = _packed(frames[1:])
    elif damage == "two-headers":
        bad = _packed([frames[0], frames[0], *frames[1:]])
    elif damage == "truncated":
        bad = Array(dtype="uint8", shape=(len(packed.data) - 7,), stype=wire.UPDATE_STYPE, data=packed.data[:-7])
    else:
        bad = Array(dtype="uint8", shape=(len(packed.data),), stype="numpy.ndarray", data=packed.data)
    with pytest.raises(SecAggError):
        header, chunks = wire.read_update(bad)
        core.submit(header, chunks)
    assert core.status("r1").submitted == 0
    # The genuine update is still accepted afterwards: nothing of the bad one stuck.
    header, chunks = wire.read_update(packed)
    assert core.submit(header, chunks).submitted == 1


def test_a_damaged_aggregate_is_refused(round_and_update):
    core, status, spec, sealed, theta = round_and_update
    header, chunks = wire.read_update(wire.pack_update(sealed.header, sealed.chunks))
    core.submit(header, chunks)
    packed = wire.pack_aggregate(core.aggregate("r1"))
    frames = _frames(packed.data)
    for bad in (_packed(frames[1:], wire.AGGREGATE_STYPE), _packed([frames[0], frames[0]], wire.AGGREGATE_STYPE),
                _packed([frames[0], b"\xff\xff\xff"], wire.AGGREGATE_STYPE), _packed(frames, wire.UPDATE_STYPE)):
        with pytest.raises(EnvelopeError):
            head, served = wire.read_aggregate(bad)
            list(served)


def test_round_terms_round_trip_and_an_unknown_format_is_refused(round_and_update):
    core, status, spec, sealed, theta = round_and_update
    terms = wire.terms_record(status, spec)
    back, back_spec = wire.read_status(terms, "round-status")
    assert back == status and back_spec == spec
    with pytest.raises(EnvelopeError, match="global-status"):
        wire.read_status(terms, "global-status")
    terms["format"] = 3
    with pytest.raises(EnvelopeError, match="format"):
        wire.read_status(terms, "round-status")
