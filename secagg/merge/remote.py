"""Run a merge method as one site of a real federation (``secagg merge``).

Every site runs the same command with its own model and data. Each exchange of the method becomes
a round ``<round>.<k>.<step>`` on the aggregator; whichever site arrives first creates it (the
others find it existing and check it matches), every site submits its encrypted contribution and
waits for the round to close, then decrypts the average and goes on. Every site contributes to every exchange.
When the aggregator runs mutual TLS only admin certificates create rounds: sites without one wait
for a site with one to create each step's round. With ``masking`` every step's round is masked
(:mod:`secagg.masking`), each stage waiting up to ``wait`` seconds for the other sites.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from secagg.api import create_round, fetch_average, round_spec, round_status, submit
from secagg.errors import AuthError, RoundExistsError, RoundNotFoundError, RoundStateError, SecAggError
from secagg.keys import ClientKey
from secagg.masking.settings import MaskSettings
from secagg.merge.methods import INIT_EPOCHS, INIT_WARMUP_ROUNDS, Site, run_method
from secagg.merge.protocol import SiteProtocol, check_contribution, single_threaded_blas
from secagg.packing import ModelSpec, unflatten
from secagg.transport.tls import ClientTLS


def run_site(
    server: str,
    round_id: str,
    key: ClientKey,
    client_id: str,
    site: Site,
    method: str,
    clients: int,
    finetune_rounds: int = 0,
    finetune_epochs: int = 1,
    wait: float = 3600.0,
    max_weight: float = 1e5,
    init_epochs: int = INIT_EPOCHS,
    init_warmup: int = INIT_WARMUP_ROUNDS,
    *,
    tls: ClientTLS | None = None,
    progress: Callable[[str, str], None] | None = None,
    policy=None,
    min_cohort: int = 3,
    masking: bool = False,
    same_architecture: bool = False,
):
    """Drive this site's merge protocol against ``server``; returns (global model, info) like ``simulate``.

    ``tls``: this site's TLS settings (None: the ``SECAGG_TLS_*`` variables, if set). ``progress(step,
    detail)`` is told while this site waits for the others (step ``"wait"``). ``policy``: this site's
    own DP rules (:class:`secagg.site_policy.SitePolicy`), applied to every step's round.
    ``min_cohort``: this site's own minimum number of contributions to any average it accepts.
    ``masking``: every exchange is a masked round (needs mutual TLS). ``same_architecture``: ``auto``
    keeps to the sites' architecture.
    """
    protocol = run_method(site, method, finetune_rounds, finetune_epochs, init_epochs, init_warmup, same_architecture)
    return run_protocol(server, round_id, key, client_id, protocol, clients, wait, max_weight, tls=tls,
                        progress=progress, policy=policy, min_cohort=min_cohort, masking=masking)


def run_protocol(server: str, round_id: str, key: ClientKey, client_id: str, protocol: SiteProtocol, clients: int,
                 wait: float = 3600.0, max_weight: float = 1e5, *, tls: ClientTLS | None = None,
                 progress: Callable[[str, str], None] | None = None, policy=None, min_cohort: int = 3,
                 masking: bool = False):
    """Drive any site protocol generator against ``server``; returns its result."""
    masked = MaskSettings(stage_seconds=wait) if masking else None
    with single_threaded_blas():
        return _drive(server, round_id, key, client_id, protocol, clients, wait, max_weight, tls, progress, policy,
                      min_cohort, masked)


#: While waiting for the other sites, say how many submitted this often (seconds).
WAIT_REPORT_SECONDS = 15.0


def _drive(server, round_id, key, client_id, protocol, clients, wait, max_weight, tls, progress, policy, min_cohort,
           masking):
    step = 0
    try:
        exchange = next(protocol)
        while True:
            sub_round = f"{round_id}.{step}.{exchange.name}"[:64]
            template = exchange.tensors
            check_contribution(exchange.name, client_id, template, exchange.value_bound)
            _ensure_round(server, sub_round, template, clients, exchange.value_bound, max_weight, wait, tls, masking)
            submit(server, sub_round, key, client_id, template, exchange.weight, policy=policy, tls=tls,
                   min_cohort=min_cohort)
            average = _await_average(server, sub_round, key, wait, tls, progress, min_cohort)
            exchange = protocol.send(unflatten(average.spec, average.vector, template))
            step += 1
    except StopIteration as stop:
        return stop.value


def _await_average(server, round_id, key, wait, tls, progress, min_cohort):
    """The round's decrypted average once every site submitted, reporting who is still missing meanwhile."""
    end = time.monotonic() + wait
    while True:
        slice_ = min(WAIT_REPORT_SECONDS, max(0.0, end - time.monotonic())) if progress else max(0.0, end - time.monotonic())
        try:
            return fetch_average(server, round_id, key, wait=slice_, min_cohort=min_cohort, tls=tls)
        except RoundStateError as exc:
            if "still collecting" not in str(exc) or time.monotonic() >= end:
                if "still collecting" in str(exc):
                    status = round_status(server, round_id, tls=tls)
                    raise RoundStateError(
                        f"round {round_id!r}: only {status.submitted} of {status.expected} sites submitted within "
                        f"--wait {wait:g} s ({', '.join(status.clients) or 'none'}); start the missing sites with the "
                        "same --round and --method, or raise --wait") from None
                raise
            status = round_status(server, round_id, tls=tls)
            progress("wait", f"round {round_id}: {status.submitted} of {status.expected} sites have submitted")


def _ensure_round(server, round_id, template, clients, value_bound, max_weight, wait, tls, masking=None) -> None:
    try:
        create_round(server, round_id, template=template, clients=clients, value_bound=value_bound,
                     max_weight=max_weight, masking=masking, tls=tls)
        return
    except RoundExistsError:
        status = round_status(server, round_id, tls=tls)
    except AuthError as refused:
        status = _wait_for_round(server, round_id, wait, tls, refused)
    leftover = (f"all sites must run the same --method with the same --clients; if round {round_id!r} is left over "
                "from an earlier run, cancel it ('secagg round cancel') or start again with a new --round")
    if bool(status.masking) != (masking is not None):
        raise SecAggError(f"round {round_id!r} exists but does not match this step: it is "
                          f"{'masked' if status.masking else 'not masked'}; every site runs with --masking, or none; "
                          f"{leftover}")
    if status.expected != clients:
        raise SecAggError(f"round {round_id!r} exists but does not match this step: it expects {status.expected} "
                          f"sites, this site runs with --clients {clients}; {leftover}")
    spec = ModelSpec.of(template)
    if status.spec_hash != spec.hash:  # structural: sites whose layers are named differently agree
        theirs = round_spec(server, round_id, tls=tls)
        if not theirs.matches(spec):  # (the hashes also differ when only one side knows the layer types)
            raise SecAggError(
                f"round {round_id!r} exists but does not match this step: its exchange differs "
                f"{theirs.describe_difference(spec, 'the round', 'this site')}. Layer names may differ, but every "
                f"site's model must be built with the same code; {leftover}"
            )


def _wait_for_round(server, round_id, wait, tls, refused: AuthError):
    """This site may not create rounds: wait up to ``wait`` seconds for a site that may to create it."""
    end = time.monotonic() + wait
    while True:
        try:
            return round_status(server, round_id, tls=tls)
        except RoundNotFoundError:
            if time.monotonic() >= end:
                raise AuthError(f"{refused}; no site with an admin certificate created round {round_id!r} within "
                                f"{wait:g} s: give at least one site an admin certificate") from None
            time.sleep(0.5)
