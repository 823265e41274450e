"""The aggregator's Prometheus metrics, in a registry of its own (one per server, none global).

The core reports round transitions through :class:`secagg.rounds.RoundObserver`; the gRPC servicer
counts calls (submissions, bytes, fetches). Labels carry no round or client ids: an error class
name is the only label, so a scrape reveals counts and sizes, never who took part.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client as prom
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from secagg.errors import SecAggError
from secagg.rounds import RoundObserver

# Round durations range from seconds (a test) to days (sites that train before submitting).
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 7 * 86400, float("inf"))


class Metrics(RoundObserver):
    """Counters, gauges and histograms of one aggregator, with the process collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        prom.ProcessCollector(registry=r)
        prom.PlatformCollector(registry=r)
        prom.GCCollector(registry=r)
        self.accepted = Counter("secagg_submissions_accepted", "updates accepted into a round's sum", registry=r)
        self.resent = Counter("secagg_submissions_resent", "resends of an already accepted update, acknowledged "
                              "again and counted once", registry=r)
        self.refused = Counter("secagg_submissions_refused", "updates refused, by secagg error class",
                               ["reason"], registry=r)
        self.received_bytes = Counter("secagg_received_bytes", "bytes of update messages received (accepted or not)",
                                      registry=r)
        self.fetches = Counter("secagg_fetches", "encrypted sums streamed to a client in full", registry=r)
        self.fetches_refused = Counter("secagg_fetches_refused", "fetches refused, by secagg error class",
                                       ["reason"], registry=r)
        self.rounds_created = Counter("secagg_rounds_created", "rounds created", registry=r)
        self.rounds_closed = Counter("secagg_rounds_closed", "rounds closed with their sum", registry=r)
        self.rounds_failed = Counter("secagg_rounds_failed", "rounds failed (deadline below quorum or cohort, or cancelled)",
                                     registry=r)
        self.round_duration = Histogram("secagg_round_duration_seconds", "time from a round's creation to its close",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.open_rounds = Gauge("secagg_open_rounds", "rounds collecting updates", registry=r)

    def count_open_rounds(self, count: Callable[[], int]) -> None:
        """Read the open-rounds gauge from ``count`` at every scrape (the core knows, nobody has to track it)."""
        self.open_rounds.set_function(count)

    @staticmethod
    def reason(exc: BaseException) -> str:
        """The label of a refusal: the secagg error class, or ``internal`` for anything unexpected."""
        return type(exc).__name__ if isinstance(exc, SecAggError) else "internal"

    # -- RoundObserver ---------------------------------------------------------------------------

    def round_created(self, round_id: str) -> None:
        self.rounds_created.inc()

    def round_closed(self, round_id: str, contributions: int, seconds: float | None) -> None:
        self.rounds_closed.inc()
        if seconds is not None:
            self.round_duration.observe(seconds)

    def round_failed(self, round_id: str, seconds: float | None) -> None:
        self.rounds_failed.inc()


class MetricsEndpoint:
    """``/metrics`` over HTTP on ``host:port`` (port 0 picks a free one); stop with :meth:`stop`."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        try:
            self._http, self._thread = prom.start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise SecAggError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); pick another "
                              "--metrics-port or stop what uses it") from None
        bound = self._http.server_address[1]
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def stop(self) -> None:
        self._http.shutdown()  # returns once the serving thread left its loop
        self._http.server_close()
        self._thread.join(5)
