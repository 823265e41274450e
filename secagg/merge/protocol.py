"""Merge protocols: what each site contributes to each encrypted average, and who runs them.

A merge method is written once, from one site's point of view, as a generator: it yields an
:class:`Exchange` (its contribution to the next encrypted weighted average) and receives the
decrypted average back, until it returns the global network. Every site runs the same generator
on its own model and data; since all of them receive the same averages, they all build the same
global model, and no site ever sees another site's model or data.

:class:`Federation` drives such generators for a simulation: a real aggregator on loopback, a
fresh federation key, one round per exchange, every update really encrypted. A deployment drives
one generator per site process against a remote aggregator instead.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from secagg.api import create_round, fetch_average, serve, submit
from secagg.errors import PrivacyError, SecAggError
from secagg.keys import keygen, load_client_key
from secagg.packing import unflatten

Tensors = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One site's contribution to one encrypted weighted average.

    ``tensors`` are averaged across sites with weights ``weight`` (usually the site's sample
    count). ``value_bound`` caps |value| for the round's overflow check: statistics (Gram
    matrices, scores) use larger bounds than weights. Every site contributes to every exchange: a
    round with fewer contributors would let the others read one site's values off the sum.

    ``privacy`` says what the tensors are, for client-level DP (:class:`Federation` with ``dp``):
    ``"weights"`` (model weights: clipped relative to ``reference``, a model every site knows, and
    noised), ``"public"`` (independent of any site's data, e.g. a seeded initialization: sent as is)
    ``"rows"`` (sums of row-clipped second moments, :class:`secagg.privacy.statistics.RowSums`: noised
    under row-level DP) or ``"stats"`` (other data statistics, which DP does not cover in this version).
    """

    name: str
    tensors: Tensors | None
    weight: float = 1.0
    value_bound: float = 100.0
    privacy: str = "stats"
    reference: Tensors | None = None


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one encrypted exchange cost."""

    name: str
    round_id: str
    contributors: int
    num_params: int
    wire_bytes: int
    seconds: float


SiteProtocol = Generator[Exchange, dict[str, np.ndarray], Any]


def check_contribution(step: str, client_id: str, tensors: Tensors, value_bound: float) -> None:
    """Refuse a contribution the step's round cannot carry, in the merge's terms (no round options to change).

    The rounds of a merge have fixed bounds (model weights 100, statistics of normalized data 100,
    Fisher-weighted sums 1e4), so the round-level advice (``--value-bound``) would point to an option
    ``simulate``/``merge`` do not have.
    """
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype.kind != "f" or not arr.size:
            continue
        if not np.all(np.isfinite(arr)):
            raise SecAggError(f"merge step {step!r}: {client_id}'s {name!r} has NaN or infinite values; the model or "
                              "its data diverged, so nothing was sent")
        peak = float(np.max(np.abs(arr)))
        if peak > value_bound:
            raise SecAggError(
                f"merge step {step!r}: {client_id}'s {name!r} reaches {peak:.4g}, beyond this step's bound "
                f"{value_bound:g} (model weights up to 100, statistics of normalized data up to 100); normalize the sites' "
                "data (secagg scaler) or keep weights smaller (regularization), then merge again")


def single_threaded_blas():
    """A context in which numpy's BLAS uses one thread.

    The merge statistics are many small, tall-and-skinny matrix products; a multi-threaded
    OpenBLAS spends far longer synchronizing its threads on them than computing (measured 0.72 s
    against 0.007 s for a 49152x32 Gram product on a busy 2-core machine), and the encryption
    and gRPC threads need the cores anyway.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional speed-up, not a requirement
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class Federation:
    """A real aggregator on 127.0.0.1 with a fresh key, and all sites' clients, in one process.

    ``masking``: every exchange is a masked round (:mod:`secagg.masking`), as ``secagg merge
    --masking`` runs it: the aggregator runs mutual TLS with a throwaway CA, every site has its own
    certificate and runs its stages in its own thread. (In one process it protects nobody from
    anybody; it shows what masking costs and that it changes no result.)
    """

    def __init__(self, workdir: str | Path | None = None, max_weight: float = 1e6, dp=None,
                 masking: bool = False) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="secagg-sim-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        paths = keygen(self.workdir / "keys")
        self.key = load_client_key(paths.client)
        self.masking = masking
        self._tls: dict[str, Any] = {}
        server_tls = self._init_pki() if masking else None
        # A simulation holds every site's model in this one process; the minimum cohort protects
        # sites from each other, which a simulation does not have, so two sites are allowed here.
        self.server = serve(paths.server, "127.0.0.1:0", self.workdir / "state", min_cohort=1, tls=server_tls)
        self.dp = dp  # secagg.privacy.DPConfig for every "weights" exchange, or None
        self.max_weight = max_weight
        self.steps: list[StepRecord] = []

    def _init_pki(self):
        from secagg import certs
        from secagg.transport.tls import ServerTLS

        self._pki = self.workdir / "pki"
        ca = certs.init_ca(self._pki)
        server = certs.issue(self._pki, "server", server=True)
        return ServerTLS(server.cert, server.key, ca.cert)

    def tls(self, name: str):
        """The client TLS settings of site ``name`` (or the round creator "admin"); None without masking."""
        if not self.masking:
            return None
        if name not in self._tls:
            from secagg import certs
            from secagg.transport.tls import ClientTLS

            issued = certs.issue(self._pki, name, admin=(name == "admin"))
            self._tls[name] = ClientTLS(self._pki / "ca.crt", issued.cert, issued.key)
        return self._tls[name]

    def close(self) -> None:
        self.server.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def average(self, name: str, contributions: list[tuple[str, Tensors, float]], value_bound: float,
                privacy: str = "stats", references: list[Tensors | None] | None = None) -> list[dict[str, np.ndarray]]:
        """One encrypted round: every contribution is encrypted and submitted; the average is decrypted.

        Returns the average once per contribution, under that contribution's own tensor names: sites
        match by structure (:mod:`secagg.packing`), and a site that calls its layers ``lstm_1`` gets
        ``lstm_1`` back. With ``self.dp``, a ``"weights"`` exchange is a DP round: equal weights, every
        site clips its update relative to its reference and adds its share of the noise before encrypting.
        """
        import time

        dp = None
        if self.dp is not None and privacy == "weights":
            dp = self.dp
            contributions = [(c, t, 1.0) for c, t, _ in contributions]
        elif self.dp is not None and privacy == "rows":
            # Row-level DP (secagg.privacy.statistics): every site clipped its rows to the same bound,
            # which is the sensitivity of the summed statistic.
            clips = {getattr(t, "clip_norm", None) for _, t, _ in contributions}
            if len(clips) != 1 or None in clips:
                raise PrivacyError(f"exchange {name!r}: every site must clip its rows to one bound, got {clips}")
            dp = dataclasses.replace(self.dp, clip_norm=clips.pop(), unit="row")
            contributions = [(c, t, 1.0) for c, t, _ in contributions]
        elif self.dp is not None and privacy != "public":
            raise PrivacyError(f"exchange {name!r} sends data statistics that this version does not privatize "
                               "(regmean, fisher, repair, scores); with DP use mean, align, init, readout, hybrid "
                               "or linear pipelines (and fine-tune rounds)")
        references = references or [None] * len(contributions)

        round_id = f"sim{len(self.steps):03d}-{name}"[:64]
        template = contributions[0][1]
        t0 = time.perf_counter()
        # The error of a decrypted average grows with max_weight / weight (secagg.ciphertexts): size the
        # round to the weights (rounded up to a power of two, so the bound does not reveal a sample count).
        largest = max(weight for _, _, weight in contributions)
        max_weight = min(self.max_weight, 2.0 ** math.ceil(math.log2(largest))) if largest > 0 else self.max_weight
        masking = None
        if self.masking:
            from secagg.masking.settings import MaskSettings

            if len(contributions) < 3:
                raise SecAggError(f"exchange {name!r} has {len(contributions)} sites; masking needs at least 3")
            masking = MaskSettings(stage_seconds=600)
        create_round(self.server.address, round_id, template=template, clients=len(contributions),
                     max_weight=max_weight, value_bound=value_bound, dp=dp, masking=masking, tls=self.tls("admin"))
        for client_id, tensors, _ in contributions:
            check_contribution(name, client_id, tensors, value_bound)

        def one(contribution, reference):
            client_id, tensors, weight = contribution
            # One process plays every site here, so the sites' own minimum cohort protects nobody from anybody.
            return submit(self.server.address, round_id, self.key, client_id, tensors, weight,
                          dp_reference=reference if dp is not None else None, tls=self.tls(client_id),
                          min_cohort=1).wire_bytes

        if self.masking:  # every site stays in its stages until all have submitted: one thread each
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(contributions)) as pool:
                wire = sum(pool.map(one, contributions, references))
        else:
            wire = sum(one(c, r) for c, r in zip(contributions, references))
        average = fetch_average(self.server.address, round_id, self.key, wait=30, min_cohort=1,
                                tls=self.tls(contributions[0][0]))
        results = [unflatten(average.spec, average.vector, tensors) for _, tensors, _ in contributions]
        self.steps.append(StepRecord(name, round_id, len(contributions), average.spec.num_params, wire,
                                     time.perf_counter() - t0))
        return results

    def run(self, protocols: Mapping[str, SiteProtocol]) -> dict[str, Any]:
        """Drive one protocol generator per site in lockstep until all return; their results by site."""
        with single_threaded_blas():
            return self._run(protocols)

    def _run(self, protocols: Mapping[str, SiteProtocol]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        current: dict[str, Exchange] = {}
        for site, gen in protocols.items():
            try:
                current[site] = next(gen)
            except StopIteration as stop:
                results[site] = stop.value
        while current:
            if results:
                raise SecAggError(f"merge protocol out of step: {sorted(results)} finished while others continue")
            names = {ex.name for ex in current.values()}
            if len(names) != 1:
                raise SecAggError(f"merge protocol out of step: sites are at different steps {sorted(names)}")
            exchanges = list(current.items())
            first = exchanges[0][1]
            contributions = [(site, ex.tensors, ex.weight) for site, ex in exchanges]
            bound = max(ex.value_bound for _, ex in exchanges)
            averages = self.average(first.name, contributions, bound, first.privacy,
                                    [ex.reference for _, ex in exchanges])
            nxt: dict[str, Exchange] = {}
            for (site, _), average in zip(exchanges, averages):
                try:
                    nxt[site] = protocols[site].send(average)
                except StopIteration as stop:
                    results[site] = stop.value
            current = nxt
        return results
