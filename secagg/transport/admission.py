"""Admission of long calls: no client can hold the aggregator hostage with calls that stay open.

Uploads (``Submit``) and waiting calls (``FetchAggregate``, ``MaskStage``) each hold one of the
gRPC server's worker threads for as long as they last. Without limits 16 silent upload streams (a
slowloris) held every worker and the aggregator answered nothing else. So:

* at most ``max_uploads`` uploads at once, and at most ``per_client`` from one client (its
  certificate's name; without mutual TLS nothing identifies a client, and only the global limit
  applies); beyond, the call is refused at
  once with RESOURCE_EXHAUSTED (:class:`secagg.errors.BusyError`, which the secagg client retries
  with backoff) instead of queueing;
* the same for waiting calls (``max_waits``, ``per_client``);
* an upload that sends nothing for ``idle_seconds`` is cancelled by a watchdog, freeing its slot;
* the server has ``max_uploads + max_waits + RESERVED_WORKERS`` workers, so status, round creation,
  health and the other short calls always find one.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

from secagg.errors import BusyError

#: Worker threads kept for short calls (status, create, list, cancel, server info, health, reflection).
RESERVED_WORKERS = 16
DEFAULT_MAX_UPLOADS = 16
DEFAULT_MAX_WAITS = 64
DEFAULT_PER_CLIENT = 4
DEFAULT_IDLE_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class Limits:
    """How many long calls the aggregator serves at once (see the module docstring)."""

    max_uploads: int = DEFAULT_MAX_UPLOADS
    max_waits: int = DEFAULT_MAX_WAITS
    per_client: int = DEFAULT_PER_CLIENT
    idle_seconds: float = DEFAULT_IDLE_SECONDS

    @property
    def workers(self) -> int:
        return self.max_uploads + self.max_waits + RESERVED_WORKERS

    def validate(self) -> None:
        from secagg.errors import SecAggError

        for name, value in (("--max-uploads", self.max_uploads), ("--max-waits", self.max_waits),
                            ("--max-calls-per-client", self.per_client)):
            if value < 1:
                raise SecAggError(f"{name} must be at least 1, got {value}")
        if not self.idle_seconds > 0:
            raise SecAggError(f"--upload-idle-timeout must be a positive number of seconds, got {self.idle_seconds}")


class _Pool:
    """Counted slots, globally and per client."""

    def __init__(self, kind: str, limit: int, per_client: int) -> None:
        self.kind, self.limit, self.per_client = kind, limit, per_client
        self.total = 0
        self.by_client: dict[str, int] = {}

    def take(self, who: str | None) -> None:
        if self.total >= self.limit:
            raise BusyError(f"the aggregator is serving its maximum of {self.limit} {self.kind} at once; try again in "
                            "a few seconds (the secagg client does)")
        if who is not None and self.by_client.get(who, 0) >= self.per_client:
            raise BusyError(f"{who} already has {self.per_client} {self.kind} open, the most one client may; finish "
                            "those first (the secagg client retries)")
        self.total += 1
        if who is not None:
            self.by_client[who] = self.by_client.get(who, 0) + 1

    def give(self, who: str | None) -> None:
        self.total -= 1
        if who is None:
            return
        left = self.by_client[who] - 1
        if left:
            self.by_client[who] = left
        else:
            del self.by_client[who]


class _Upload:
    def __init__(self, context) -> None:
        self.context = context
        self.last = time.monotonic()
        self.idle = False


class Admission:
    """Slots for uploads and waits, and the idle watchdog of uploads. Thread-safe."""

    def __init__(self, limits: Limits) -> None:
        limits.validate()
        self.limits = limits
        self._lock = threading.Lock()
        self._uploads = _Pool("uploads", limits.max_uploads, limits.per_client)
        self._waits = _Pool("waiting calls", limits.max_waits, limits.per_client)
        self._active: set[_Upload] = set()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="secagg-upload-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def uploads(self) -> int:
        return self._uploads.total

    def upload(self, who: str | None, context, messages: Iterator) -> "_Slot":
        """Take an upload slot for ``who`` (raises BusyError); the slot's ``messages`` are watched for idleness."""
        with self._lock:
            self._uploads.take(who)
            up = _Upload(context)
            self._active.add(up)
        return _Slot(self, who, self._uploads, up, messages)

    def wait(self, who: str | None) -> "_Slot":
        """Take a slot for a waiting call (fetch, masking stage) for ``who`` (raises BusyError)."""
        with self._lock:
            self._waits.take(who)
        return _Slot(self, who, self._waits, None, None)

    def _stop_watching(self, up: _Upload) -> None:
        with self._lock:
            self._active.discard(up)

    def _release(self, who: str | None, pool: _Pool, up: _Upload | None) -> None:
        with self._lock:
            pool.give(who)
            if up is not None:
                self._active.discard(up)

    def _watch(self) -> None:
        period = min(1.0, self.limits.idle_seconds / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [u for u in self._active if not u.idle and now - u.last > self.limits.idle_seconds]
                for u in idle:
                    u.idle = True
            for u in idle:
                # Cancelling the call wakes the handler blocked on the stream; its slot is released as it ends.
                u.context.cancel()


class _Slot:
    """One admitted call: a context manager; for uploads, :meth:`messages` marks activity per message."""

    def __init__(self, admission: Admission, who: str | None, pool: _Pool, up: _Upload | None, messages) -> None:
        self._admission, self._who, self._pool, self._up, self._messages = admission, who, pool, up, messages

    @property
    def idle(self) -> bool:
        return self._up is not None and self._up.idle

    def messages(self) -> Iterator:
        for msg in self._messages:
            self._up.last = time.monotonic()
            yield msg
        # Fully read: what follows (checks, fsync, adding to the sum) is the aggregator's own time, never idle.
        self._admission._stop_watching(self._up)

    def __enter__(self) -> "_Slot":
        return self

    def __exit__(self, *exc) -> None:
        self._admission._release(self._who, self._pool, self._up)
