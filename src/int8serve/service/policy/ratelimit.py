"""Requests per minute, per account and model: the card's `max_requests_per_min`, enforced with `limits`.

The window is a moving 60-second window (`limits`' moving-window strategy): a request is admitted when fewer than
N requests of this account and model were admitted in the last 60 seconds. Admission is one atomic
test-and-record (`hit`): in memory by default, and in Redis (a Lua script) with `--redis-url`, so that every
replica sharing that Redis sees one window and an account limited to 5 gets 5 in total — not 5 per replica
(LiteLLM #27736 read a local copy and wrote to Redis, and got N × limit). A refused attempt is not recorded, so
retrying a 429 does not push the window further away. The same test-and-record tells how full it left the window,
so each answer's remaining count is its own admission's: in Redis one script (`CountingRedisStorage`) records and
counts (reading the window again in a second round trip counted the requests admitted in between as well: 3 taking
the last 3 places of 5 all reported 2 left, instead of 2, 1 and 0).

Limits resolve from the operator's settings over the card (`settings.py`): operator per-account value, card
per-account value, operator default, card default; 0 or "none" means unlimited (no headers then).

While Redis is down the in-process windows take over (`fallback.py`). Every admission made through Redis is also
recorded in the in-process window, so that a fallback starts from this replica's recent history instead of from
zero. During an outage each replica admits only its share of the limit, N // R (at least 1), R being the replicas
that shared the Redis just before it went away (`ReplicaCount`): two replicas of an account limited to 4 admit at
most 2 each in a window, 4 together, instead of 4 each. Redis is authoritative again as soon as it answers. A
refusal's `Retry-After` then is the time until enough of this replica's admissions leave the window for one more
to fit in its share (read from the in-process storage's stamps: `limits` tells only when the oldest leaves).

Clocks: the in-process window runs on the monotonic clock (`MonotonicMemoryStorage`), so a wall-clock step (NTP, a
VM resumed) neither empties it nor keeps its admissions longer than the window. In Redis, `limits` stamps each
admission with the admitting replica's `time.time()` (replicas must have synchronised clocks); a replica whose clock
steps back sees every stamp as recent, but the key expires on Redis' own clock a window after the last admission.
Either way no reset or `Retry-After` is more than the window (`RateLimiter._seconds_until`).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import operator
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from int8serve.catalog.card import ModelCard

from .fallback import SHARED_STATE_ERRORS, SharedStateGuard
from .settings import PolicySettings

__all__ = ["CountingRedisStorage", "MonotonicMemoryStorage", "RateLimitStatus", "RateLimiter", "ReplicaCount",
           "share_of"]

NAMESPACE = "RPM"
REPLICA_TTL_SECONDS = 30.0  # a replica that has not stamped itself for this long is no longer counted

# `limits`' acquire_moving_window.lua for one admission (same list, newest first, same stamps), then the count and
# the oldest stamp of the window it left, as its moving_window.lua reads them; ARGV: now, limit, expiry
ACQUIRE_AND_COUNT = """
local now, limit, expiry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local since = now - expiry
local last = redis.call('lindex', KEYS[1], limit - 1)
local admitted = not (last and tonumber(last) >= since)
if admitted then
    redis.call('lpush', KEYS[1], now)
    redis.call('ltrim', KEYS[1], 0, limit - 1)
    redis.call('expire', KEYS[1], expiry)
end
local count, oldest = 0, now
for _, stamp in ipairs(redis.call('lrange', KEYS[1], 0, limit - 1)) do
    if tonumber(stamp) < since then break end
    count, oldest = count + 1, tonumber(stamp)
end
return {admitted and 1 or 0, tostring(oldest), count}
"""


def share_of(limit: int, replicas: int) -> int:
    """What one of `replicas` replicas may admit on its own while they cannot share a window: N // R, at least 1
    (so together they admit at most N, unless N < R)."""
    return max(1, limit // max(1, replicas))


class MonotonicMemoryStorage(MemoryStorage):
    """`limits`' in-process storage with its moving windows on `clock` (monotonic) instead of `time.time()`, whose
    steps moved the window: one back by an hour kept the last minute's admissions in it for an hour, one forward
    emptied it. Only the moving window is served (`acquire_entry`, `get_moving_window`), in the clock's seconds (so
    `get_window_stats().reset_time` is too). A key keeps the stamps in its window, newest first, at most `limit` of
    them, as `limits`' Redis list does: an admission drops the stamps that left the window (they were kept however
    old while admissions went on, up to `limit` of them, and copied on each), and a look that finds none in it drops
    the key."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.stamps: dict[str, list[float]] = {}

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Record `amount` admissions if the window has room (no await between test and record: atomic)."""
        if amount > limit:
            return False
        now, stamps = self.clock(), self.stamps.setdefault(key, [])
        if len(stamps) > limit - amount and stamps[limit - amount] > now - expiry:
            return False
        del stamps[bisect.bisect_left(stamps, expiry - now, key=operator.neg):]  # newest first: the old ones last
        stamps[:0] = [now] * amount
        del stamps[limit:]
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(the oldest stamp in the window, or now; how many are in it)."""
        now = self.clock()
        in_window = [stamp for stamp in self.stamps.get(key, ()) if stamp > now - expiry]
        if not in_window:
            self.stamps.pop(key, None)
            return now, 0
        return in_window[-1], len(in_window)

    async def clear(self, key: str) -> None:
        self.stamps.pop(key, None)
        await super().clear(key)

    async def reset(self) -> int | None:
        self.stamps.clear()
        return await super().reset()


class CountingRedisStorage(RedisStorage):
    """`limits`' Redis storage (through redis-py), plus an admission that also tells how full it left the window
    (`acquire_counted`), in the same script: `limits` has none, and its `get_window_stats` is a round trip of its
    own, after which other requests may have been admitted too."""

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, implementation="redispy", **options)
        self._acquire_and_count = self.bridge.get_connection().register_script(ACQUIRE_AND_COUNT)

    async def acquire_counted(self, key: str, limit: int, expiry: int) -> tuple[bool, float, int]:
        """Record one admission if the window has room: (admitted, the oldest stamp in the window or now, how many
        stamps are in it), all as of this admission."""
        try:
            admitted, oldest, count = await self._acquire_and_count([self.bridge.prefixed_key(key)],
                                                                    [time.time(), limit, expiry])
        except self.base_exceptions as exc:
            if self.wrap_exceptions:
                raise StorageError(exc) from exc
            raise
        return bool(admitted), float(oldest), int(count)


class ReplicaCount:
    """How many replicas share this Redis. While Redis answers, each replica stamps itself (at most once every
    `every` seconds, on an admission) in the sorted set `key` with the time, drops the stamps older than
    REPLICA_TTL_SECONDS, and reads how many are left. While Redis is away the last count stands.

    The stamps are wall-clock times (`clock`), which every replica compares; when the next one is due is a
    duration of this replica's own, on the monotonic clock (`timer`): a wall clock stepped back an hour stopped the
    replica stamping itself and counting the others for that hour."""

    def __init__(self, client: redis.asyncio.Redis, key: str, every: float = 5.0,
                 clock: Callable[[], float] = time.time, timer: Callable[[], float] = time.monotonic) -> None:
        self.client, self.key, self.every, self._clock, self._timer = client, key, every, clock, timer
        self.member = uuid.uuid4().hex
        self.count = 1
        self._next: float | None = None  # on the timer

    async def refresh(self) -> None:
        """Stamp this replica and count the live ones, if due; a failure keeps the last count."""
        due = self._timer()
        if self._next is not None and due < self._next:
            return
        self._next = due + self.every
        now = self._clock()
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zadd(self.key, {self.member: now})
                pipe.zremrangebyscore(self.key, "-inf", now - REPLICA_TTL_SECONDS)
                pipe.zcard(self.key)
                pipe.expire(self.key, int(REPLICA_TTL_SECONDS * 2))
                _added, _dropped, count, _expiry = await pipe.execute()
        except SHARED_STATE_ERRORS:
            return
        self.count = max(1, int(count))


@dataclass(frozen=True)
class RateLimitStatus:
    """One account's window after (or without) an admission."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float  # seconds until the oldest counted request leaves the window (one more is then allowed)

    @property
    def retry_after(self) -> int:
        """Whole seconds to wait before a refused request would be admitted (at least 1)."""
        return max(1, math.ceil(self.reset_after))

    def headers(self) -> dict[str, str]:
        """`x-ratelimit-*-requests` for every answer, plus `Retry-After` when refused."""
        headers = {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(max(0, self.remaining)),
            "x-ratelimit-reset-requests": f"{max(0, math.ceil(self.reset_after))}s",
        }
        if not self.allowed:
            headers["retry-after"] = str(self.retry_after)
        return headers


class RateLimiter:
    """Admits requests against each account's moving window, shared through Redis when configured."""

    def __init__(self, settings: PolicySettings, shared: CountingRedisStorage | None = None,
                 guard: SharedStateGuard | None = None, replicas: ReplicaCount | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if (shared is None) != (guard is None):
            raise ValueError("shared storage and its guard go together")
        self.settings = settings
        self._clock = clock  # the in-process window's; the shared one's is the wall clock (`limits` stamps with it)
        self._local_stamps = MonotonicMemoryStorage(clock)
        self._local = MovingWindowRateLimiter(self._local_stamps)
        self._local_lock = asyncio.Lock()  # a degraded admission is a check then a hit: one at a time
        self._shared_storage = shared
        self._shared = MovingWindowRateLimiter(shared) if shared is not None else None
        self._guard = guard
        self.replicas = replicas

    def limit_for(self, card: ModelCard, account: str) -> int | None:
        """Requests per window allowed to `account` on `card`'s model; None = unlimited."""
        if not self.settings.rate_limits:
            return None
        card_limits = card.policy.rate_limit
        for value in (self.settings.account_rpm.get(account), card_limits.accounts.get(account),
                      self.settings.default_rpm, card_limits.default_rpm):
            if value is not None:
                return value or None  # 0 = unlimited
        return None

    async def acquire(self, card: ModelCard, account: str) -> RateLimitStatus | None:
        """Record one request if the window has room. None when the account is unlimited."""
        limit = self.limit_for(card, account)
        if limit is None:
            return None
        item, ids = self._item(limit), (card.name, account)

        async def shared() -> RateLimitStatus:
            status = await self._shared_hit(item, ids)
            if status.allowed:  # shadow copy for a fallback
                await self._local.hit(item, *ids)
            if self.replicas is not None:
                await self.replicas.refresh()
            return status

        if self._guard is None:
            return await self._hit(self._local, item, ids)
        return await self._guard.call("ratelimit", shared, lambda: self._degraded_hit(item, ids))

    async def _degraded_hit(self, item: RateLimitItem, ids: tuple[str, str]) -> RateLimitStatus:
        """Redis is away: admit within this replica's share of the limit, counting its own recent admissions (the
        shadow copies) in the window of the whole limit."""
        async with self._local_lock:
            stats = await self._local.get_window_stats(item, *ids)
            allowed = item.amount - stats.remaining < self._share(item) and await self._local.hit(item, *ids)
            return await self._degraded_stats(item, ids, allowed)

    def _share(self, item: RateLimitItem) -> int:
        return share_of(item.amount, self.replicas.count if self.replicas is not None else 1)

    async def _degraded_stats(self, item: RateLimitItem, ids: tuple[str, str], allowed: bool) -> RateLimitStatus:
        """This replica's window while Redis is away, against its share of the limit."""
        stats = await self._local.get_window_stats(item, *ids)
        share, admitted = self._share(item), item.amount - stats.remaining
        reset_at = stats.reset_time if allowed else self._room_at(item, ids, admitted - share, stats.reset_time)
        return RateLimitStatus(allowed=allowed, limit=share, remaining=max(0, share - admitted),
                               reset_after=self._seconds_until(reset_at, self._clock()))

    def _room_at(self, item: RateLimitItem, ids: tuple[str, str], over: int, oldest_leaves_at: float) -> float:
        """When one more admission fits in the share: once `over` + 1 of the window's admissions have left it."""
        window = self.settings.window_seconds
        stamps = self._local_stamps.stamps.get(item.key_for(*ids), [])  # newest first
        in_window = [t for t in reversed(stamps) if t > self._clock() - window]  # oldest first
        if over <= 0 or not in_window:
            return oldest_leaves_at
        return in_window[min(over, len(in_window) - 1)] + window

    async def describe(self, card: ModelCard, account: str) -> RateLimitStatus | None:
        """The window as it is, without recording anything (for answers that do not count)."""
        limit = self.limit_for(card, account)
        if limit is None:
            return None
        item, ids = self._item(limit), (card.name, account)
        shared_limiter = self._shared
        return await self._route(lambda: self._stats(shared_limiter or self._local, item, ids, True),
                                 lambda: self._degraded_stats(item, ids, True))

    async def _route(self, shared: Callable[[], Awaitable[RateLimitStatus]],
                     local: Callable[[], Awaitable[RateLimitStatus]]) -> RateLimitStatus:
        if self._guard is None:
            return await local()
        return await self._guard.call("ratelimit", shared, local)

    def _item(self, limit: int) -> RateLimitItem:
        return RateLimitItemPerSecond(limit, self.settings.window_seconds, namespace=NAMESPACE)

    async def _hit(self, limiter: MovingWindowRateLimiter, item: RateLimitItem, ids: tuple[str, str]
                   ) -> RateLimitStatus:
        """In process: nothing suspends between the hit and the read, so the read is this admission's window."""
        allowed = await limiter.hit(item, *ids)
        return await self._stats(limiter, item, ids, allowed)

    async def _shared_hit(self, item: RateLimitItem, ids: tuple[str, str]) -> RateLimitStatus:
        """One admission in Redis, and the window as it left it, in one script (see `CountingRedisStorage`)."""
        assert self._shared_storage is not None
        allowed, oldest, admitted = await self._shared_storage.acquire_counted(
            item.key_for(*ids), item.amount, item.get_expiry())
        return RateLimitStatus(allowed=allowed, limit=item.amount, remaining=item.amount - admitted,
                               reset_after=self._seconds_until(oldest + item.get_expiry(), time.time()))

    async def _stats(self, limiter: MovingWindowRateLimiter, item: RateLimitItem, ids: tuple[str, str],
                     allowed: bool) -> RateLimitStatus:
        stats = await limiter.get_window_stats(item, *ids)
        now = self._clock() if limiter is self._local else time.time()  # Redis' stamps are wall-clock times
        return RateLimitStatus(allowed=allowed, limit=item.amount, remaining=stats.remaining,
                               reset_after=self._seconds_until(stats.reset_time, now))

    def _seconds_until(self, reset_time: float, now: float) -> float:
        """Seconds from `now` to `reset_time`, within [0, window]: no admission stays longer than the window (a
        wall clock stepped back made Redis' stamps look recent, and the wait the size of the step)."""
        return min(float(self.settings.window_seconds), max(0.0, reset_time - now))
