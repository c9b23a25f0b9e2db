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

__all__ = ["SHARED_STATE_ERRORS", "FallbackCounter", "SharedStateGuard"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# what a lost or hung Redis raises through `limits` (wrapped) and through redis-py directly
SHARED_STATE_ERRORS: tuple[type[BaseException], ...] = (
    StorageError, redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


class FallbackCounter:
    """How often shared state was lost (`outages`) and how many operations ran in-process meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outages = 0
        self.local_operations: Counter[str] = Counter()  # by component: "ratelimit", "cache"

    def outage(self) -> None:
        with self._lock:
            self.outages += 1

    def served_locally(self, component: str) -> None:
        with self._lock:
            self.local_operations[component] += 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"outages": self.outages, "local_operations": dict(self.local_operations)}


class SharedStateGuard:
    """Routes each operation to shared state or to its in-process fallback, tracking the health of the former."""

    def __init__(self, counter: FallbackCounter, retry_seconds: float = 1.0, name: str = "Redis",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counter = counter
        self.retry_seconds = retry_seconds
        self.name = name
        self._clock = clock
        self.healthy = True
        self._next_try = 0.0

    async def call(self, component: str, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        """`shared()` when Redis is (or may again be) available, else — or when it fails — `local()`."""
        if self._should_try():
            try:
                result = await shared()
            except SHARED_STATE_ERRORS as err:
                self._failed(err)
            else:
                self._succeeded()
                return result
        self.counter.served_locally(component)
        return await local()

    def _should_try(self) -> bool:
        if self.healthy:
            return True
        now = self._clock()
        if now < self._next_try:
            return False
        self._next_try = now + self.retry_seconds  # this caller probes; the others stay local meanwhile
        return True

    def _failed(self, err: BaseException) -> None:
        self._next_try = self._clock() + self.retry_seconds
        if not self.healthy:
            log.debug("%s still unreachable: %s", self.name, err)
            return
        self.healthy = False
        self.counter.outage()
        log.warning("%s is unreachable (%s: %s): rate limits and the response cache fall back to this process "
                    "until it returns", self.name, type(err).__name__, err)

    def _succeeded(self) -> None:
        if not self.healthy:
            self.healthy = True
            log.warning("%s is reachable again: rate limits and the response cache are shared again", self.name)
