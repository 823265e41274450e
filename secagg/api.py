"""The Python API: the few names a user needs to run a round. The CLI is a thin layer over it.

Data flows one way: model file -> arrays -> flat vector -> [w*theta, w, 1] -> seeded ciphertexts
-> envelope -> aggregator (adds) -> encrypted sum -> decrypt -> checks -> average -> model file.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from secagg import ciphertexts, envelope
from secagg.ciphertexts import Bounds
from secagg.errors import EnvelopeError, OverflowRiskError, KeyFileError, ModelFormatError, RoundStateError, SecAggError, TransportError
from secagg.keys import ClientKey, ServerKey, load_client_key, load_server_key
from secagg.models import read_model, write_model
from secagg.packing import ModelSpec, flatten, unflatten
from secagg.rounds import Aggregator, RoundStatus
from secagg.transport import secagg_pb2 as pb
from secagg.transport.client import AggregatorClient
from secagg.transport.server import Server

Progress = Callable[[str, int, int], None]
ModelLike = str | os.PathLike | Mapping[str, np.ndarray]
KeyLike = str | os.PathLike | ClientKey


@dataclasses.dataclass(frozen=True)
class Receipt:
    """What :func:`submit` did: the aggregator's acknowledgement and what it cost."""

    round_id: str
    client_id: str
    submitted: int
    already_accepted: bool
    num_params: int
    wire_bytes: int
    encrypt_seconds: float
    send_seconds: float


@dataclasses.dataclass(frozen=True)
class Average:
    """A decrypted, checked aggregate: the weighted mean as a flat vector and its context."""

    spec: ModelSpec
    vector: np.ndarray
    contributions: int
    clients: tuple[str, ...]
    total_weight: float


def serve(server_key: str | os.PathLike | ServerKey, listen: str, state_dir: str | os.PathLike) -> Server:
    """Start an aggregator on ``listen`` ("host:port"; port 0 picks a free one). Returns the running server."""
    key = server_key if isinstance(server_key, ServerKey) else load_server_key(server_key)
    return Server(Aggregator(key, state_dir), listen).start()


def create_round(
    server: str,
    round_id: str,
    template: ModelLike,
    clients: int,
    min_clients: int | None = None,
    deadline: float | None = None,
    max_weight: float | None = None,
    value_bound: float | None = None,
) -> RoundStatus:
    """Create a round for the template's architecture. Only names, shapes and dtypes are sent."""
    # The aggregator checks the limits; negative numbers cannot even travel in the request's unsigned fields.
    for option, value in (("--clients", clients), ("--min-clients", min_clients or 0)):
        if value < 0:
            raise SecAggError(f"{option} must be at least 1, got {value}")
    if deadline is not None and not deadline > 0:  # 0 would silently mean "no deadline" on the wire
        raise SecAggError(f"--deadline must be a positive number of seconds, got {deadline}; leave it out for none")
    for name, value in (("max weight", max_weight), ("value bound", value_bound)):
        if value is not None and not value > 0:  # 0 would silently mean "the default" on the wire
            raise OverflowRiskError(f"{name} must be a positive number, got {value}; leave it out for the default")
    spec = ModelSpec.of(_tensors(template))
    request = pb.CreateRoundRequest(
        round_id=round_id, model_spec_json=spec.to_json(), expected_clients=clients, min_clients=min_clients or 0,
        deadline_seconds=deadline or 0.0, max_weight=max_weight or 0.0, value_bound=value_bound or 0.0,
    )
    with AggregatorClient(server) as client:
        return client.create_round(request)[0]


def round_status(server: str, round_id: str) -> RoundStatus:
    """The round's state, number of submissions and who submitted."""
    with AggregatorClient(server) as client:
        return client.status(round_id)[0]


def submit(
    server: str,
    round_id: str,
    key: KeyLike,
    client_id: str,
    model: ModelLike,
    weight: float = 1.0,
    progress: Progress | None = None,
    retry_for: float = 60.0,
) -> Receipt:
    """Encrypt ``model`` (times ``weight``) under the federation key and submit it to the round.

    If the aggregator is unreachable mid-way (restart), the same encrypted bytes are resent for up
    to ``retry_for`` seconds; the aggregator recognises a resend and counts it once.
    """
    ckey = _client_key(key)
    envelope.check_id("client", client_id)
    tensors = _tensors(model)
    with AggregatorClient(server) as client:
        status, spec = _round_for(client, round_id, ckey)
        if status.state != "collecting":
            raise RoundStateError(f"round {round_id!r} is {status.state}; it accepts no more updates")
        theta = flatten(spec, tensors)
        t0 = time.perf_counter()
        vector = ciphertexts.encode_update(theta, float(weight), _bounds(status))
        blobs = ciphertexts.encrypt(ckey, vector, progress=progress)
        t1 = time.perf_counter()
        header, chunks = envelope.seal_update(round_id, client_id, ckey.key_id, spec.hash, blobs)
        reply = _with_retries(lambda: client.submit(header, _report(chunks, progress, "send")), retry_for)
        t2 = time.perf_counter()
    return Receipt(round_id, client_id, reply.submitted, reply.already_accepted, spec.num_params,
                   sum(map(len, blobs)) + sum(len(c.sha256) for c in chunks) + len(header.digest), t1 - t0, t2 - t1)


def fetch_average(server: str, round_id: str, key: KeyLike, wait: float = 0.0,
                  progress: Progress | None = None) -> Average:
    """Download the round's encrypted sum, decrypt it, check it, and return the weighted mean."""
    ckey = _client_key(key)
    end = time.monotonic() + wait
    with AggregatorClient(server) as client:
        status, spec = _round_for(client, round_id, ckey)
        while True:
            try:
                head, chunks = client.fetch(round_id, max(0.0, end - time.monotonic()))
                break
            except RoundStateError as exc:
                if "still collecting" not in str(exc) or time.monotonic() >= end:
                    raise
        if head.key_id != ckey.key_id or head.spec_hash != spec.hash:
            raise EnvelopeError("the aggregate's header does not match the round's key id or model spec")
        header = envelope.Header(round_id, "", head.key_id, head.spec_hash, head.num_ciphertexts, head.num_chunks,
                                 head.digest)
        blobs = list(envelope.iter_chunks(header, _report(chunks, progress, "receive", head.num_chunks)))
    vector = ciphertexts.decrypt(ckey, blobs, spec.num_params + ciphertexts.EXTRA_SLOTS)
    mean, total_weight = ciphertexts.decode_aggregate(vector, head.contributions, _bounds(status))
    return Average(spec, mean, head.contributions, tuple(head.clients), total_weight)


def fetch(
    server: str,
    round_id: str,
    key: KeyLike,
    template: str | os.PathLike,
    out: str | os.PathLike,
    wait: float = 0.0,
    progress: Progress | None = None,
) -> Path:
    """Fetch the round's weighted average and write it as a model file in the template's format.

    Integer tensors (counters) are not aggregated; they are copied from the template.
    """
    average = fetch_average(server, round_id, key, wait, progress)
    template_tensors = read_model(template)
    actual = ModelSpec.of(template_tensors)
    if actual != average.spec:
        raise ModelFormatError(
            f"template {template} does not match the round's architecture: {average.spec.describe_difference(actual)}"
        )
    return write_model(template, unflatten(average.spec, average.vector, template_tensors), out)


def _tensors(model: ModelLike) -> Mapping[str, np.ndarray]:
    return model if isinstance(model, Mapping) else read_model(model)


def _client_key(key: KeyLike) -> ClientKey:
    if isinstance(key, ClientKey):
        return key
    return load_client_key(key)


def _round_for(client: AggregatorClient, round_id: str, key: ClientKey) -> tuple[RoundStatus, ModelSpec]:
    status, spec_json = client.status(round_id)
    if status.key_id != key.key_id:
        raise KeyFileError(
            f"round {round_id!r} uses key {status.key_id} but {key.key_id} was given; "
            "use the client.key from the same 'secagg keygen' as the aggregator's server.key"
        )
    return status, ModelSpec.from_json(spec_json)


def _bounds(status: RoundStatus) -> Bounds:
    return Bounds(status.expected, status.max_weight, status.value_bound)


def _report(chunks, progress: Progress | None, stage: str, total: int | None = None):
    total = len(chunks) if total is None else total
    for i, c in enumerate(chunks):
        yield c
        if progress:
            progress(stage, i + 1, total)


def _with_retries(call, retry_for: float):
    end = time.monotonic() + retry_for
    delay = 0.2
    while True:
        try:
            return call()
        except TransportError:
            if time.monotonic() + delay > end:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
