"""The Python API: the few names a user needs to run a round. The CLI is a thin layer over it.

Data flows one way: model file -> arrays -> flat vector -> [w*theta, w, 1] -> seeded ciphertexts
-> envelope -> aggregator (adds) -> encrypted sum -> decrypt -> checks -> average -> model file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from secagg import envelope
from secagg.envelope import Chunk
from secagg.errors import (
    BusyError,
    KeyFileError,
    OverflowRiskError,
    RoundExistsError,
    RoundStateError,
    SecAggError,
    TransportError,
)
from secagg.keys import ClientKey, ServerKey, load_client_key, load_server_key
from secagg.metrics import Metrics
from secagg.models import read_model, write_model
from secagg.packing import ModelSpec, check_matches, unflatten
from secagg.privacy.mechanism import DPConfig
from secagg.submission import plaintext_update
from secagg.masking.settings import MaskSettings
from secagg.updates import Average, encrypt_update, open_aggregate, open_chunks, seal_ciphertexts
from secagg.rounds import DEFAULT_MAX_PARAMS, DEFAULT_MIN_COHORT, Aggregator, RoundStatus, RoundSummary
from secagg.transport import secagg_pb2 as pb
from secagg.transport.client import AggregatorClient
from secagg.transport.admission import Limits
from secagg.transport.server import Server, record_from_pb
from secagg.transport.tls import ClientTLS, ServerTLS

if TYPE_CHECKING:
    from secagg.site_policy import SitePolicy

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
    dp: DPConfig | None = None  # the DP applied before encryption (the round's, or the site's own local DP)
    #: The precision of the round's released average if every site used this weight (secagg.release):
    #: the round's release_precision * max_weight / weight. Far above 1e-6 means --max-weight wastes range.
    precision: float = 0.0
    masked: bool = False  # the round was masked (secagg.masking): the update left with its pairwise masks
    mask_seconds: float = 0.0  # time spent adding the masks (not waiting for the other sites)


def serve(server_key: str | os.PathLike | ServerKey, listen: str, state_dir: str | os.PathLike,
          min_cohort: int = DEFAULT_MIN_COHORT, epsilon_budget: float | None = None, delta: float | None = None,
          *, max_params: int = DEFAULT_MAX_PARAMS, tls: ServerTLS | None = None, insecure: bool = False,
          metrics_port: int | None = None, metrics_host: str | None = None, health_listen: str | None = None,
          allow_non_dp_rounds: bool = False, limits: Limits | None = None, ingest_workers: int = 0) -> Server:
    """Start an aggregator on ``listen`` ("host:port"; port 0 picks a free one). Returns the running server.

    ``tls`` with a ``ca`` is mutual TLS: every client needs a certificate from that CA, a client may
    submit only as its certificate's name, and creating rounds needs an admin certificate. Without
    it nobody's identity is checked, so other addresses than loopback need ``insecure=True``.
    The gRPC port also answers health checks and reflection. ``metrics_port``: serve Prometheus
    metrics at ``server.metrics_url`` (0 picks a port). ``health_listen``: a plaintext port with health
    checks only, for probes without a client certificate. ``allow_non_dp_rounds``: with an
    ``epsilon_budget``, rounds without DP are refused unless this is set. ``limits``: how many uploads
    and waiting calls it serves at once, per client, and how long an upload may stay silent
    (:mod:`secagg.transport.admission`); beyond, calls are refused with a retry hint instead of queueing.
    ``ingest_workers``: receive uploads in that many worker processes (:mod:`secagg.transport.ingest`).
    """
    key = server_key if isinstance(server_key, ServerKey) else load_server_key(server_key)
    metrics = Metrics()
    ca_pem = tls.ca.read_bytes() if tls is not None and tls.ca is not None else None
    core = Aggregator(key, state_dir, min_cohort=min_cohort, max_params=max_params, epsilon_budget=epsilon_budget,
                      delta=delta, observer=metrics, ca_pem=ca_pem, allow_non_dp=allow_non_dp_rounds)
    return Server(core, listen, tls=tls, insecure=insecure, limits=limits, metrics=metrics,
                  metrics_port=metrics_port, metrics_host=metrics_host, health_listen=health_listen,
                  ingest_workers=ingest_workers).start()


def create_round(
    server: str,
    round_id: str,
    template: ModelLike,
    clients: int,
    min_clients: int | None = None,
    deadline: float | None = None,
    max_weight: float | None = None,
    value_bound: float | None = None,
    dp: DPConfig | None = None,
    enroll: tuple[str, ...] | list[str] = (),
    *,
    masking: MaskSettings | None = None,
    tls: ClientTLS | None = None,
    retry_for: float = 60.0,
) -> RoundStatus:
    """Create a round for the template's architecture. Only names, shapes, dtypes and layer types are sent.

    The round matches models by structure: any model with the template's tensors in the same order,
    shapes, dtypes (and layer types, where the files tell them) may submit, whatever its names.

    ``dp``: client-level differential privacy for the round; every submission is clipped and noised
    with it, and the aggregator charges the round to the federation's privacy budget. ``enroll``:
    the clients allowed to submit (empty: any). ``masking``: pairwise masking under the encryption
    (:mod:`secagg.masking`): no coalition of the aggregator with fewer than the threshold of sites can
    read a site's update; needs mutual TLS, and no ``deadline`` (each stage is timed instead).
    For ``retry_for`` seconds the aggregator may be unreachable (as for every call of this module); a
    retry that finds the round created by its own earlier attempt (whose reply was lost) returns it.
    """
    # The aggregator checks the limits; negative numbers cannot even travel in the request's unsigned fields.
    for option, value in (("--clients", clients), ("--min-clients", min_clients or 0)):
        if value < 0:
            raise SecAggError(f"{option} must be at least 1, got {value}")
    if deadline is not None and not deadline > 0:  # 0 would silently mean "no deadline" on the wire
        raise SecAggError(f"--deadline must be a positive number of seconds, got {deadline}; leave it out for none")
    for name, value in (("max weight", max_weight), ("value bound", value_bound)):
        if value is not None and not value > 0:  # 0 would silently mean "the default" on the wire
            raise OverflowRiskError(f"{name} must be a positive number, got {value}; leave it out for the default")
    if dp is not None:
        dp.validate()
    spec = ModelSpec.of(_tensors(template))
    request = pb.CreateRoundRequest(
        round_id=round_id, model_spec_json=spec.to_json(), expected_clients=clients, min_clients=min_clients or 0,
        deadline_seconds=deadline or 0.0, max_weight=max_weight or 0.0, value_bound=value_bound or 0.0,
        dp_json=json.dumps(dp.to_dict()) if dp else "", enrolled=list(enroll),
        masking_json=json.dumps(masking.to_dict()) if masking is not None else "",
    )
    with AggregatorClient(server, tls=tls) as client:
        def created_earlier() -> RoundStatus | None:
            mine = client.status(round_id)[0]
            return mine if (mine.spec_hash, mine.expected) == (spec.hash, clients) else None

        return _retried_change(lambda: client.create_round(request)[0], RoundExistsError, created_earlier, retry_for)


def round_status(server: str, round_id: str, *, tls: ClientTLS | None = None, retry_for: float = 60.0) -> RoundStatus:
    """The round's state, number of submissions and who submitted."""
    with AggregatorClient(server, tls=tls) as client:
        return _with_retries(lambda: client.status(round_id)[0], retry_for, transient_only=True)


def round_spec(server: str, round_id: str, *, tls: ClientTLS | None = None, retry_for: float = 60.0) -> ModelSpec:
    """The architecture the round was created for (tensor names, shapes, dtypes, layer types; no values)."""
    with AggregatorClient(server, tls=tls) as client:
        return ModelSpec.from_json(_with_retries(lambda: client.status(round_id)[1], retry_for, transient_only=True))


def cancel_round(server: str, round_id: str, reason: str = "", *, tls: ClientTLS | None = None,
                 retry_for: float = 60.0) -> RoundStatus:
    """Cancel a collecting round that can never complete; it fails with the reason ``cancelled: <reason>``.

    Its accepted updates are deleted and whoever waits to fetch it gets a :class:`RoundStateError`
    with that reason. Under mutual TLS this needs an admin certificate. A closed or failed round
    cannot be cancelled (``RoundStateError``); a retry that finds the round cancelled by its own
    earlier attempt (whose reply was lost) returns its status.
    """
    with AggregatorClient(server, tls=tls) as client:
        def cancelled_earlier() -> RoundStatus | None:
            now = client.status(round_id)[0]
            return now if now.state == "failed" and now.reason.startswith("cancelled: ") else None

        return _retried_change(lambda: client.cancel_round(round_id, reason), RoundStateError, cancelled_earlier,
                               retry_for)


def list_rounds(server: str, *, tls: ClientTLS | None = None, retry_for: float = 60.0) -> list[RoundSummary]:
    """Every round the aggregator holds, oldest first: id, state, submitted/expected, creation time, reason."""
    with AggregatorClient(server, tls=tls) as client:
        return _with_retries(client.list_rounds, retry_for, transient_only=True)


def submit(
    server: str,
    round_id: str,
    key: KeyLike,
    client_id: str,
    model: ModelLike,
    weight: float = 1.0,
    progress: Progress | None = None,
    retry_for: float = 60.0,
    dp_reference: ModelLike | None = None,
    local_dp: DPConfig | None = None,
    rng: np.random.Generator | None = None,
    *,
    policy: SitePolicy | None = None,
    min_cohort: int = DEFAULT_MIN_COHORT,
    tls: ClientTLS | None = None,
) -> Receipt:
    """Encrypt ``model`` (times ``weight``) under the federation key and submit it to the round.

    If the round has DP settings, the model is clipped and noised with them before encryption:
    relative to ``dp_reference`` (a model every site knows, e.g. the previous global model) if
    given, else as a whole vector. ``local_dp`` lets a site add local DP of its own to a round
    without DP settings. DP submissions use equal weights (``weight`` must stay 1).
    The model matches the round by structure (:mod:`secagg.packing`): its tensor names may differ
    from the template's. For ``retry_for`` seconds the aggregator may be unreachable: at first
    contact (a site started before the aggregator) and mid-way (a restart), when the same encrypted
    bytes are resent; the aggregator recognises a resend and counts it once. ``policy``: this site's
    own DP rules (:class:`secagg.site_policy.SitePolicy`), checked against the round before anything
    is encrypted, whatever the aggregator says. The update carries a tag (and, with a client
    certificate, a signature) binding it to this round, client and the round's settings
    (:mod:`secagg.contribution`).

    In a masked round (:mod:`secagg.masking`) it runs every stage itself and returns once it has
    revealed the shares that unmask the sum: it needs this site's certificate (``tls``), and it
    reveals shares only for sums of at least ``min_cohort`` sites.
    """
    ckey = _client_key(key)
    tls = tls if tls is not None else ClientTLS.from_env()
    envelope.check_id("client", client_id)
    tensors = _tensors(model)
    with AggregatorClient(server, tls=tls) as client:
        status, spec = _first_contact(client, round_id, ckey, retry_for)
        if status.state != "collecting":
            why = f" ({status.reason})" if status.reason else ""
            raise RoundStateError(f"round {round_id!r} is {status.state}{why}; it accepts no more updates")
        plaintext = plaintext_update(ckey.key_id, status, spec, tensors, weight, local_dp=local_dp, rng=rng,
                                     policy=policy, dp_reference=None if dp_reference is None else _tensors(dp_reference))
        theta, dp, plain = plaintext.theta, plaintext.dp, plaintext.digest
        site = None
        if status.masking:
            from secagg.masking import flow

            site = flow.start(status, client_id, ckey.parameters.data_prime, tls, min_cohort)
        t0 = time.perf_counter()
        cts = encrypt_update(ckey, status, theta, float(weight), progress)
        mask_seconds = 0.0
        if site is not None:
            calls = flow.StageCalls(lambda stage, payload, wait: _with_retries(
                lambda: client.mask_stage(round_id, client_id, stage, payload, wait), retry_for), site.settings, progress)
            flow.exchange_keys(site, calls)
            tm = time.perf_counter()
            cts = [(site.mask(i, c0), seed) for i, (c0, seed) in enumerate(cts)]
            mask_seconds = time.perf_counter() - tm
        update = seal_ciphertexts(ckey, status, client_id, cts, tls)
        t1 = time.perf_counter()
        header, chunks = update.header, update.chunks
        if policy is not None:
            policy.record(status, ckey.key_id, local_dp=local_dp, update=plain)  # spent once the update leaves
        reply = _with_retries(lambda: client.submit(header, _report(chunks, progress, "send")), retry_for)
        t2 = time.perf_counter()
        if site is not None:
            flow.unmask(site, calls)
    return Receipt(round_id, client_id, reply.submitted, reply.already_accepted, spec.num_params, update.wire_bytes,
                   t1 - t0, t2 - t1, dp, status.release_precision * status.max_weight / float(weight),
                   site is not None, mask_seconds)


def fetch_average(server: str, round_id: str, key: KeyLike, wait: float = 0.0,
                  progress: Progress | None = None, *, retry_for: float = 60.0, min_cohort: int = DEFAULT_MIN_COHORT,
                  tls: ClientTLS | None = None) -> Average:
    """Download the round's encrypted sum, check everything about it, decrypt it, and return the weighted mean.

    Nothing the aggregator serves is trusted: the contributors' records (distinct, enrolled, at least
    ``min_cohort`` of them: this site's own minimum; every tag, and every signature under mutual
    TLS), every ciphertext's count and integrity checks (:mod:`secagg.slots`). The second
    polynomials are rebuilt here from the contributors' seeds. The result is rounded to the round's
    release grid (:mod:`secagg.release`) before it leaves this function. Waits up to ``wait`` seconds
    for the round to close; an aggregator that does not answer yet is tried again for ``retry_for`` seconds.
    """
    ckey = _client_key(key)
    tls = tls if tls is not None else ClientTLS.from_env()
    with AggregatorClient(server, tls=tls) as client:
        status, spec = _first_contact(client, round_id, ckey, retry_for)
        end = time.monotonic() + wait
        while True:
            try:
                head, chunks = client.fetch(round_id, max(0.0, end - time.monotonic()))
                break
            except RoundStateError as exc:
                if "still collecting" not in str(exc) or time.monotonic() >= end:
                    raise
            except BusyError:  # the aggregator serves as many fetches as it allows: back off and ask again
                if time.monotonic() >= end + retry_for:
                    raise
                time.sleep(1.0)
        return open_served(ckey, status, spec, head, _report(chunks, progress, "receive", head.num_chunks), tls=tls,
                           min_cohort=min_cohort, progress=progress)


def open_served(key: ClientKey, status: RoundStatus, spec: ModelSpec, head: pb.AggregateHeader,
                chunks: Iterable[Chunk], *, tls: ClientTLS | None = None, min_cohort: int = DEFAULT_MIN_COHORT,
                progress: Progress | None = None) -> Average:
    """Check, decrypt and release an encrypted sum as served (its header and chunks), whoever carried it.

    The transport-free end of :func:`fetch_average` (the Flower mod calls it too): every record and
    ciphertext is checked (:func:`secagg.updates.open_aggregate`) before anything is released.
    """
    records = [record_from_pb(r) for r in head.records]
    pairs = list(open_chunks(key, status, head, len(records), chunks))
    return open_aggregate(key, status, spec, records, pairs, tls, min_cohort, progress)


def fetch(
    server: str,
    round_id: str,
    key: KeyLike,
    template: str | os.PathLike,
    out: str | os.PathLike,
    wait: float = 0.0,
    progress: Progress | None = None,
    *,
    retry_for: float = 60.0,
    min_cohort: int = DEFAULT_MIN_COHORT,
    tls: ClientTLS | None = None,
) -> Path:
    """Fetch the round's weighted average and write it as a model file in the template's format.

    The file has the template's tensor names (matched to the round by position, so any site's own
    model serves as template). Integer tensors (counters) are not aggregated; they are copied from
    the template.
    """
    template_tensors = read_model(template)  # a bad template fails before any waiting
    average = fetch_average(server, round_id, key, wait, progress, retry_for=retry_for, min_cohort=min_cohort, tls=tls)
    check_matches(average.spec, ModelSpec.of(template_tensors), f"template {template}",
                  f"template {template} does not match the round's architecture")
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


def _first_contact(client: AggregatorClient, round_id: str, key: ClientKey,
                   retry_for: float) -> tuple[RoundStatus, ModelSpec]:
    """The round's status and spec; an aggregator that does not answer (yet) is tried for ``retry_for`` seconds."""
    return _with_retries(lambda: _round_for(client, round_id, key), retry_for, transient_only=True)


def _report(chunks, progress: Progress | None, stage: str, total: int | None = None):
    total = len(chunks) if total is None else total
    for i, c in enumerate(chunks):
        yield c
        if progress:
            progress(stage, i + 1, total)


def _retried_change(call, refusal: type[SecAggError], done_earlier, retry_for: float):
    """``call()`` (a change: create, cancel) with :func:`_with_retries`. A retry that the aggregator
    refuses with ``refusal`` may have met the change made by an earlier attempt whose reply was lost:
    ``done_earlier()`` returns that result if it is ours (None if not, and the refusal stands)."""
    attempts = 0

    def attempt():
        nonlocal attempts
        attempts += 1
        try:
            return call()
        except refusal:
            found = done_earlier() if attempts > 1 else None
            if found is None:
                raise
            return found

    return _with_retries(attempt, retry_for, transient_only=True)


def _with_retries(call, retry_for: float, transient_only: bool = False):
    """``call()``, again with backoff while it raises TransportError, for up to ``retry_for`` seconds.

    Other errors (auth, unknown round, ...) cannot heal and are raised at once; with
    ``transient_only`` so are transport errors of the settings (a failed TLS handshake).
    """
    end = time.monotonic() + retry_for
    delay = 0.2
    while True:
        try:
            return call()
        except TransportError as exc:
            if (transient_only and not exc.transient) or time.monotonic() + delay > end:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
