"""When Redis goes away mid-run, rate limits and the cache carry on in this process, and come back when it returns.

Replicas share rate-limit windows and cached answers through Redis. Losing it must not fail a single request
(issue 4, "Faults"), so every shared operation goes through a `SharedStateGuard`:

* while Redis answers, the shared operation is used;
* the first failure switches to the in-process fallback, logs ONE warning for the outage and counts it in the
  `FallbackCounter`; later failures of the same outage are quiet;
* while in fallback, one caller per `retry_seconds` tries Redis again; the first success switches back (logged)
  and the shared state is used again.

One guard serves the limiter and the cache, so one lost Redis is one warning and one outage, whichever noticed.
The counter is a plain object with a `snapshot()`, meant to be read by the metrics endpoint of a later issue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.exceptions
from limits.errors import StorageError

__all__ = ["SHARED_STATE_ERRORS", "FallbackCounter", "Outage", "SharedStateGuard"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# what a lost or hung Redis raises through `limits` (wrapped) and through redis-py directly; a call that waited too
# long for one of the pool's connections raises redis' ConnectionError (`redis_state.py`), served alike
SHARED_STATE_ERRORS: tuple[type[BaseException], ...] = (
    StorageError, redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


class FallbackCounter:
    """How often shared state was lost (`outages`) and how many operations ran in-process meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outages = 0
        self.local_operations: Counter[str] = Counter()  # by component: "ratelimit", "cache", "allocation"

    def outage(self) -> None:
        with self._lock:
            self.outages += 1

    def served_locally(self, component: str) -> None:
        with self._lock:
            self.local_operations[component] += 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"outages": self.outages, "local_operations": dict(self.local_operations)}


class Outage:
    """The health of a backend that can go away (Redis, the ledger's database): one warning when it is lost and one
    when it is back, however many calls fail meanwhile, and one probe every `retry_seconds` while it is away."""

    def __init__(self, name: str, consequence: str, retry_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, on_outage: Callable[[], None] | None = None,
                 logger: logging.Logger = log) -> None:
        self.name = name
        self.log = logger
        self.consequence = consequence  # what happens meanwhile, for the warning
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._on_outage = on_outage
        self._lock = threading.Lock()
        self.healthy = True
        self.outages = 0
        self._next_try = 0.0

    def should_try(self) -> bool:
        """True while healthy; while away, True for one caller per `retry_seconds` (the probe)."""
        with self._lock:
            if self.healthy:
                return True
            now = self._clock()
            if now < self._next_try:
                return False
            self._next_try = now + self.retry_seconds
            return True

    @property
    def seconds_to_retry(self) -> float:
        return 0.0 if self.healthy else max(0.0, self._next_try - self._clock())

    def failed(self, err: BaseException) -> None:
        with self._lock:
            self._next_try = self._clock() + self.retry_seconds
            if not self.healthy:
                self.log.debug("%s still unreachable: %s", self.name, err)
                return
            self.healthy = False
            self.outages += 1
        if self._on_outage is not None:
            self._on_outage()
        self.log.warning("%s is unreachable (%s): %s", self.name, _short(err), self.consequence)

    def recovered(self, detail: str = "") -> None:
        with self._lock:
            if self.healthy:
                return
            self.healthy = True
        self.log.warning("%s is reachable again%s", self.name, f": {detail}" if detail else "")


def _short(err: BaseException) -> str:
    text = " ".join(str(getattr(err, "orig", None) or err).split())
    return f"{type(err).__name__}: {text[:200]}"


class SharedStateGuard:
    """Routes each operation to shared state or to its in-process fallback, tracking the health of the former."""

    def __init__(self, counter: FallbackCounter, retry_seconds: float = 1.0, name: str = "Redis",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counter = counter
        self.outage = Outage(name, "rate limits, the response cache and the daily allocation's reservations fall "
                             "back to this process until it returns", retry_seconds, clock, on_outage=counter.outage)

    @property
    def healthy(self) -> bool:
        return self.outage.healthy

    async def call(self, component: str, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        """`shared()` when Redis is (or may again be) available, else — or when it fails — `local()`."""
        if self.outage.should_try():
            try:
                result = await shared()
            except SHARED_STATE_ERRORS as err:
                self.outage.failed(err)
            else:
                self.outage.recovered("rate limits, the response cache and reservations are shared again")
                return result
        self.counter.served_locally(component)
        return await local()
