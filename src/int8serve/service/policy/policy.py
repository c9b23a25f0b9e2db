"""The card's serving policy, assembled once per server: rate limiter, response cache, ledger, daily allocation.

`Policy.build(settings)` makes every part and checks its backends before the server starts: a Redis that cannot be
reached, a database that cannot be reached or a data directory used by another server are `PolicyStartupError`s
with a clear message (`int8serve serve` prints them without a traceback). `Policy.in_memory()` is the embedded
default that needs nothing installed, which `create_app` uses when it is given no policy.

A policy belongs to one event loop (its Redis connections and in-process windows are made for the loop that first
uses them). Its Redis clients share one bounded pool (`redis_pool`, `redis_state.REDIS_CONNECTIONS` connections at
most, which the open files budgeted at start count). Those connections, and the daily allocation's tasks, are the
loop's: only a coroutine on it can end them, `end_shared_state()` (the app's lifespan does, at its end), else they
stay open, each a client of Redis, as long as the process runs. `close()` writes out the ledger (blocking, from
another thread or once the loop has ended); `await aclose()` on the loop does both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import redis.asyncio
import sqlalchemy as sa

from int8serve.catalog.card import ModelCard
from int8serve.redact import hide_password, without

from .allocation import DailyAllocation, SharedReservations
from .cache import Clock, MemoryCache, RedisCache, ResponseCache
from .data_dir import LEDGER_FILE, SPOOL_FILE, prepare_data_dir
from .fallback import FallbackCounter, SharedStateGuard
from .ledger import Ledger, short_error
from .ledger_db import LedgerSchemaError, make_database
from .ratelimit import CountingRedisStorage, RateLimiter, ReplicaCount
from .redis_state import RedisTarget, RedisUnreachableError, check_reachable
from .settings import PolicySettings
from .spool import FileSpool, MemorySpool, Spool, SpoolLockedError

__all__ = ["LEDGER_FILE", "SPOOL_FILE", "Policy", "PolicyStartupError"]

# database drivers that an extra of int8serve installs (pyproject.toml), by the module a URL's driver imports
DRIVER_EXTRAS = {"psycopg": "postgres"}


class PolicyStartupError(Exception):
    """A backend of the policy cannot be used; the message says which and why."""


@dataclass
class Policy:
    settings: PolicySettings
    limiter: RateLimiter
    cache: ResponseCache
    ledger: Ledger
    allocation: DailyAllocation | None
    fallbacks: FallbackCounter
    shared_state: SharedStateGuard | None = None  # Redis' health, when configured
    redis: RedisTarget | None = None
    redis_pool: redis.asyncio.BlockingConnectionPool | None = None  # every Redis call's connection
    database: str = "sqlite:// (in memory)"
    spool: str = "memory"

    @classmethod
    def build(cls, settings: PolicySettings | None = None, clock: Clock = time.time,
              monotonic: Clock = time.monotonic) -> Policy:
        """The policy `settings` describe; `clock` (unix seconds) stamps cached answers and ages shared ones,
        `monotonic` runs what this process keeps (its cache entries, its rate-limit windows); tests pass fake ones."""
        settings = settings or PolicySettings()
        fallbacks = FallbackCounter()
        target = _redis_target(settings)
        guard = SharedStateGuard(fallbacks, settings.retry_seconds) if target is not None else None
        pool = target.async_pool(settings.backend_timeout) if target is not None else None
        limiter, cache = _limiter_and_cache(settings, target, pool, guard, clock, monotonic)
        ledger, database, spool = _ledger(settings)
        allocation = _allocation(settings, ledger, target, pool, guard)
        return cls(settings=settings, limiter=limiter, cache=cache, ledger=ledger, allocation=allocation,
                   fallbacks=fallbacks, shared_state=guard, redis=target, redis_pool=pool, database=database,
                   spool=spool)

    @classmethod
    def in_memory(cls, **overrides: Any) -> Policy:
        """Everything in this process: the card's policy, with `overrides` of `PolicySettings` fields."""
        return cls.build(PolicySettings(**overrides))

    def caches(self, card: ModelCard) -> bool:
        """Is the response cache on for `card`'s model (the card asks for one, and the operator did not say no)?"""
        return self.settings.cache and card.policy.response_cache is not None

    def describe(self, card: ModelCard) -> list[str]:
        """Start-up lines saying what the policy does for `card`."""
        s = self.settings
        where = f"shared in Redis {self.redis.display} (prefix {self.redis.key_prefix})" if self.redis else \
            "in this process"
        if not s.rate_limits:
            limits = "rate limits: off"
        else:
            default = self.limiter.limit_for(card, "\x00any account without an override\x00")
            overrides = {**card.policy.rate_limit.accounts, **s.account_rpm}
            limits = (f"rate limits: {default or 'unlimited'} requests per {s.window_seconds} s per account and "
                      f"model, {len(overrides)} account overrides, {where}")
        if self.caches(card):
            cache = (f"response cache: on (card: {card.policy.response_cache}), {s.cache_scope} scope, TTL "
                     f"{s.cache_ttl} s, {where}" + ("" if self.redis else f", at most {s.cache_max_entries} "
                                                    f"entries / {s.cache_max_bytes} bytes per account"))
        else:
            cache = "response cache: off" + (" (--no-cache)" if not s.cache else " (the card has none)")
        allocation = (f"daily allocation: {self.allocation.describe()} neurons per account (reset 00:00 UTC)"
                      if self.allocation else "daily allocation: off")
        return [limits, cache, f"usage ledger: {self.database} (spool {self.spool})", allocation]

    def close(self) -> None:
        """Write out the ledger (blocking: never on the event loop's thread). The Redis connections and the
        allocation's tasks are not closed here: they are the policy's event loop's, and `aclose()` or
        `end_shared_state()` ends them on it (the app's lifespan does)."""
        self.ledger.close()

    async def end_shared_state(self) -> None:
        """On the policy's event loop: the allocation's tasks end (lease renewals, releases under way), then the
        Redis connections close; a Redis that is gone is no error. The pool connects again if it is used after."""
        if self.allocation is not None:
            await self.allocation.stop()
        if self.redis_pool is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                await self.redis_pool.aclose()

    async def aclose(self) -> None:
        """Close the policy from a coroutine on its event loop: `end_shared_state`, then the ledger written out (in a
        thread, not to block the loop). Twice is once."""
        await self.end_shared_state()
        await asyncio.to_thread(self.ledger.close)


def _redis_target(settings: PolicySettings) -> RedisTarget | None:
    if not settings.redis_url:
        return None
    try:
        target = RedisTarget.parse(settings.redis_url)
        check_reachable(target, timeout=max(1.0, settings.backend_timeout))
    except (ValueError, RedisUnreachableError) as err:
        raise PolicyStartupError(str(err)) from None
    return target


def _allocation(settings: PolicySettings, ledger: Ledger, target: RedisTarget | None,
                pool: redis.asyncio.ConnectionPool | None, guard: SharedStateGuard | None) -> DailyAllocation | None:
    """The daily allocation, if on; with Redis, its reservations shared by the replicas."""
    if not settings.daily_neurons:
        return None
    if target is None or pool is None or guard is None:
        return DailyAllocation(settings.daily_neurons, ledger)
    client = redis.asyncio.Redis(connection_pool=pool)
    shared = SharedReservations(client, target.key("allocation"), settings.allocation_lease_seconds)
    return DailyAllocation(settings.daily_neurons, ledger, shared, guard)


def _limiter_and_cache(settings: PolicySettings, target: RedisTarget | None,
                       pool: redis.asyncio.ConnectionPool | None, guard: SharedStateGuard | None,
                       clock: Clock = time.time, monotonic: Clock = time.monotonic
                       ) -> tuple[RateLimiter, ResponseCache]:
    local_cache = MemoryCache(settings.cache_max_entries, settings.cache_max_bytes, monotonic)
    if target is None or pool is None or guard is None:
        return (RateLimiter(settings, clock=monotonic),
                ResponseCache(settings.cache_ttl, local_cache, scope=settings.cache_scope, clock=clock))
    # `limits` makes its client on this pool too (given a pool, it opens none of its own)
    uri = target.url.replace("unix://", "redis+unix://", 1) if target.url.startswith("unix://") else target.url
    storage = CountingRedisStorage("async+" + uri, key_prefix=target.key("limits"), wrap_exceptions=True,
                                   connection_pool=pool)
    shared_cache = RedisCache(redis.asyncio.Redis(connection_pool=pool), target.key_prefix,
                              max_entry_bytes=settings.cache_max_bytes, clock=clock)
    replicas = ReplicaCount(redis.asyncio.Redis(connection_pool=pool), target.key("replicas"),
                            every=settings.replica_stamp_seconds)
    return (RateLimiter(settings, storage, guard, replicas, clock=monotonic),
            ResponseCache(settings.cache_ttl, local_cache, shared_cache, guard, clock=clock,
                          scope=settings.cache_scope))


def _extra_hint(err: Exception) -> str:
    """How to install a database driver that is missing, when an extra of int8serve has it."""
    module = (getattr(err, "name", None) or "").partition(".")[0] if isinstance(err, ImportError) else ""
    extra = DRIVER_EXTRAS.get(module)
    return f" (the driver comes with the {extra!r} extra: pip install 'int8serve[{extra}]')" if extra else ""


def _ledger(settings: PolicySettings) -> tuple[Ledger, str, str]:
    data_dir = settings.data_dir
    spool: Spool = MemorySpool()
    spool_name = "memory"
    try:
        if data_dir is not None:
            prepare_data_dir(data_dir)  # 0700, our files in it 0600: only its owner reads the accounts' usage
            if not settings.database_url:
                _create_private(Path(data_dir) / LEDGER_FILE)
            spool = FileSpool(Path(data_dir) / SPOOL_FILE)
            spool_name = str(Path(data_dir) / SPOOL_FILE)
    except (OSError, SpoolLockedError) as err:
        raise PolicyStartupError(f"data directory {data_dir}: {err}") from None
    shown = None
    if settings.database_url:
        url = settings.database_url
    elif data_dir is not None:
        ledger_file = (Path(data_dir) / LEDGER_FILE).resolve()
        # SQLAlchemy reads a `?` in the path as a query and decodes `%41`: the path goes percent-encoded
        url, shown = f"sqlite:///{quote(str(ledger_file), safe='/')}", f"sqlite:///{ledger_file}"
    else:
        url = "sqlite://"
    shown = shown or hide_password(url)
    try:
        ledger = Ledger(make_database(url, settings.database_timeout), spool, settings.ledger_table,
                        settings.retry_seconds, spool_name, timeout=settings.database_timeout)
        ledger.create_schema()
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError, ValueError) as err:
        spool.close()
        raise PolicyStartupError(f"invalid database URL {shown!r}: {without(str(err), url)}{_extra_hint(err)}"
                                 ) from None
    except sa.exc.SQLAlchemyError as err:
        spool.close()
        raise PolicyStartupError(f"cannot use the ledger database {shown}: {without(short_error(err), url)}"
                                 ) from None
    except LedgerSchemaError as err:
        spool.close()
        raise PolicyStartupError(f"cannot use the ledger database {shown}: {err}") from None
    ledger.start()
    return ledger, shown if url != "sqlite://" else "sqlite:// (in memory)", spool_name


def _create_private(path: Path) -> None:
    """Create `path` 0600 unless it exists (like the spool), before SQLite opens it: SQLite gives the database's
    -wal and -shm files the mode of the database itself."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
