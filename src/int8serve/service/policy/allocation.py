"""The optional per-account daily neuron allocation (off by default; 10,000 neurons a day when on).

Workers AI gives every account 10,000 free neurons a day, reset at 00:00 UTC, and answers 429 with code 3036 once
they are used up. With `--daily-neurons [N]` int8serve does the same.

What a request costs is only known once it ends, so an admitted request **reserves** its worst case until its
ledger row is recorded: its prompt tokens + `max_tokens` at the card's neuron prices — the prompt bounded by its
UTF-8 bytes at admission (the body is checked, not yet tokenized), then narrowed to its real token count. Admission
is one check-and-reserve:

    admitted  if  used + reserved < allocation

`used` being the account's neurons of the UTC day, from 00:00 to midnight (read from the ledger, across all models
and — with a shared database — all replicas, plus the rows this process recorded since; a later day's rows, written
by a replica whose clock is ahead, never count), `reserved` the worst cases of its requests still in flight. The
request admitted while the sum is below the allocation but whose own worst case takes it there crosses the line: it
is served in full, and every later request is refused while it runs — and after it, if what it really cost used the
allocation up. So at most one request crosses the line however many arrive at once: the requests admitted before the
last one cost less than the allocation together.

A reservation is released, its real cost then counting as used, when the request's ledger row is recorded — and in
every other way a request ends: refused by the rate limiter, over the context window, answered from the cache, an
engine or queue refusal, a client gone, a cancelled task (`Reservation.released` makes a second release a no-op).
A reservation that must widen (a tokenizer that gave more tokens than the bound; none of ours does) is admitted
again, or refused with 3036.

With Redis (`SharedReservations`) the replicas share their reservations, so that at most one request crosses the
line whichever replica serves it. Redis holds, per account and UTC day, the reservations with a lease
(`lease_seconds`, renewed by the replica while its requests run, so that a crashed replica's reservations lapse
within a lease) and the neurons of the requests released since the key was made (Redis' `used` is the larger of
that and the ledger's total): another replica's finished request counts at once, not when its row reaches the
database. Each replica also keeps its own reservations in this process and checks them first; while Redis is away
the allocation carries on in each replica on its own (the ledger and its own reservations: one request per replica
may then cross the line).

A refusal does not count against the requests-per-minute limit. When the neurons used reach the allocation it
carries `Retry-After` (seconds until 00:00 UTC) and `x-should-retry: false`, which the official SDK obeys instead of
retrying twice in vain. When only the reservations of requests in flight reach it, room may come back as they end
below their worst case: the refusal then carries a short `Retry-After` (`IN_FLIGHT_RETRY_SECONDS`) that the SDK's
retries wait for. A request counts to the day it is admitted in (its ledger row's time, taken once its body is in),
however late it ends; should that day end while it is being checked, its refusal is not final either
(`Retry-After: 1`): the retry is admitted in the new day.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis.asyncio

from ..errors import ACCOUNT_LIMITED, ApiError
from .fallback import SharedStateGuard
from .ledger import Ledger
from .usage_rows import utc_now

__all__ = ["DEFAULT_LEASE_SECONDS", "IN_FLIGHT_RETRY_SECONDS", "DailyAllocation", "Reservation", "SharedReservations",
           "start_of_day"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 30.0  # a reservation in Redis not renewed for this long (its replica died) lapses
IN_FLIGHT_RETRY_SECONDS = 5  # Retry-After of a refusal due to requests in flight, not to neurons used
COMPONENT = "allocation"  # in the fallback counter


def start_of_day(now: datetime) -> datetime:
    """00:00 of `now`'s day (naive UTC in, naive UTC out)."""
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(eq=False)
class Reservation:
    """The worst case of one admitted request, held against its account's allocation until it is released."""

    account: str
    day: str  # YYYY-MM-DD (UTC): the day the request was admitted in, as its ledger row says
    amount: float  # neurons
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # never the client-visible request id
    shared: bool = False  # Redis holds it too
    released: bool = False


# KEYS: leases (zset token -> lease end, unix s), amounts (hash token -> neurons), used (neurons released today)
# ARGV: now, lease end, token, amount, used according to the ledger, allocation, key ttl (s)
# -> {admitted (1/0), used, reserved by the others}. The token's own amount, if it holds one, is not counted: it is
# being set (a reservation that grows is admitted again).
ADMIT = """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, token in ipairs(lapsed) do
  redis.call('ZREM', KEYS[1], token)
  redis.call('HDEL', KEYS[2], token)
end
local reserved = 0
for _, amount in ipairs(redis.call('HVALS', KEYS[2])) do
  reserved = reserved + tonumber(amount)
end
reserved = reserved - tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0')
local used = math.max(tonumber(ARGV[5]), tonumber(redis.call('GET', KEYS[3]) or '0'))
if used + reserved >= tonumber(ARGV[6]) then
  return {0, tostring(used), tostring(reserved)}
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return {1, tostring(used), tostring(reserved)}
"""

# KEYS: leases, amounts; ARGV: token, new amount. Only a reservation still held changes.
RESIZE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return 0
"""

# KEYS: leases, amounts, used; ARGV: token, neurons recorded, key ttl (s). The reservation goes and what the
# request cost is added to the day's used neurons, at once: no replica ever sees neither.
RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('INCRBYFLOAT', KEYS[3], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return 0
"""


class SharedReservations:
    """The reservations of every replica, in Redis under `<prefix>:allocation:<day>:<account>:...` (see the module
    docstring). Calls raise Redis' errors; `DailyAllocation` routes them through the fallback guard."""

    def __init__(self, client: redis.asyncio.Redis, key_prefix: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.key_prefix = key_prefix  # e.g. "int8serve:allocation"
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._admit = client.register_script(ADMIT)
        self._resize = client.register_script(RESIZE)
        self._release = client.register_script(RELEASE)

    def keys(self, account: str, day: str) -> list[str]:
        base = f"{self.key_prefix}:{day}:{account}"
        return [f"{base}:leases", f"{base}:amounts", f"{base}:used"]

    async def admit(self, reservation: Reservation, used: float, neurons_per_day: float,
                    ttl: int) -> tuple[bool, float]:
        """Hold `reservation` if the account's used + reserved neurons (every replica's) are below the allocation;
        `used` is this replica's reading of the ledger (Redis counts the larger of it and its own total).
        Returns whether it was admitted and the neurons used according to Redis."""
        now = self._clock()
        admitted, used_in_redis, _reserved = await self._admit(
            keys=self.keys(reservation.account, reservation.day),
            args=[repr(now), repr(now + self.lease_seconds), reservation.token, repr(reservation.amount), repr(used),
                  repr(neurons_per_day), ttl])
        return int(admitted) == 1, float(used_in_redis)

    async def resize(self, reservation: Reservation) -> None:
        keys = self.keys(reservation.account, reservation.day)
        await self._resize(keys=keys[:2], args=[reservation.token, repr(reservation.amount)])

    async def release(self, reservation: Reservation, neurons: float, ttl: int) -> None:
        await self._release(keys=self.keys(reservation.account, reservation.day),
                            args=[reservation.token, repr(max(0.0, neurons)), ttl])

    async def renew(self, reservations: Iterable[Reservation]) -> None:
        """Extend the leases of `reservations` that Redis still holds (never adds one back)."""
        lease_end = self._clock() + self.lease_seconds
        by_key: dict[str, dict[str, float]] = defaultdict(dict)
        for reservation in reservations:
            by_key[self.keys(reservation.account, reservation.day)[0]][reservation.token] = lease_end
        if not by_key:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key, leases in by_key.items():
                pipe.zadd(key, leases, xx=True)
            await pipe.execute()

    async def reserved(self, account: str, day: str) -> float:
        """Every replica's reservations of `account` for `day` that have not lapsed (for tests and inspection)."""
        leases, amounts, _used = self.keys(account, day)
        live = await self.client.zrangebyscore(leases, repr(self._clock()), "+inf")
        if not live:
            return 0.0
        return sum(float(v) for v in await self.client.hmget(amounts, live) if v is not None)


class DailyAllocation:
    """Admits an account's requests while its neurons used and reserved today are below `neurons_per_day`."""

    def __init__(self, neurons_per_day: float, ledger: Ledger, shared: SharedReservations | None = None,
                 guard: SharedStateGuard | None = None) -> None:
        if (shared is None) != (guard is None):
            raise ValueError("shared reservations and their guard go together")
        self.neurons_per_day = neurons_per_day
        self.ledger = ledger
        self.shared = shared
        self.guard = guard
        self._held: dict[tuple[str, str], dict[str, Reservation]] = {}  # (account, day) -> token -> reservation
        self._renewer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def used_today(self, account: str) -> float:
        return await self.ledger.neurons_used(account, start_of_day(utc_now()))

    def reserved(self, account: str, when: datetime | None = None) -> float:
        """What this process holds for `account`'s requests in flight (of `when`'s day, by default today)."""
        day = (when or utc_now()).date().isoformat()
        return sum(r.amount for r in self._held.get((account, day), {}).values())

    async def reserved_everywhere(self, account: str) -> float:
        """Today's reservations of `account`'s requests in flight on every replica (Redis' view; this process'
        while Redis is away or not used)."""
        local = self.reserved(account)
        if self.shared is None or self.guard is None:
            return local
        shared, day = self.shared, utc_now().date().isoformat()

        async def held_here() -> float:
            return local

        # this process' reservations not yet in Redis (being admitted) count too
        return max(local, await self.guard.call(COMPONENT, lambda: shared.reserved(account, day), held_here))

    async def reserve(self, account: str, amount: float, when: datetime | None = None) -> Reservation:
        """Admit one request of `account` at `when` (naive UTC; now by default: its ledger row's time) and hold
        `amount` neurons, its worst case, until `release`; raise 429/3036 when the account's used + reserved
        neurons of `when`'s day already reach the allocation."""
        when = when or utc_now()
        reservation = Reservation(account, when.date().isoformat(), 0.0)
        await self._hold(reservation, amount, when)
        return reservation

    async def resize(self, reservation: Reservation, amount: float) -> None:
        """Set a reservation to the request's worst case once it is known exactly. Narrowing it is always
        allowed; widening it admits the request again (429/3036 if the others now reach the allocation)."""
        amount = max(0.0, amount)
        if reservation.released or amount == reservation.amount:
            return
        if amount > reservation.amount:
            await self._hold(reservation, amount, datetime.fromisoformat(reservation.day))
            return
        reservation.amount = amount
        if reservation.shared and self.shared is not None and self.guard is not None:
            shared = self.shared
            await self.guard.call(COMPONENT, lambda: shared.resize(reservation), _nothing)

    async def _hold(self, reservation: Reservation, amount: float, when: datetime) -> None:
        """Hold `amount` for `reservation` if the account's used neurons and its other reservations are below the
        allocation, else raise 429/3036 (a reservation held already keeps its amount)."""
        account, key = reservation.account, (reservation.account, reservation.day)
        reading = await self.ledger.neurons_reading(account, start_of_day(when))
        # from here to the reservation nothing awaits: no other request of this process is checked in between,
        # and a request that ended meanwhile counts, as its reservation or as its recorded row
        held = self._held.setdefault(key, {})
        used = reading.now()
        others = sum(r.amount for token, r in held.items() if token != reservation.token)
        if used + others >= self.neurons_per_day:
            if not held:
                del self._held[key]
            raise self._refusal(when, used)
        new, before = reservation.token not in held, reservation.amount
        reservation.amount = max(0.0, amount)
        held[reservation.token] = reservation
        if self.shared is None or self.guard is None:
            return
        try:
            admitted, used = await self.guard.call(COMPONENT, lambda: self._admit_shared(reservation, used, when),
                                                   functools.partial(_admitted_locally, used))
        except BaseException:
            if new:
                self.release_soon(reservation)
            raise
        if not admitted:  # Redis did not change it
            if new:
                self._release_locally(reservation)
            else:
                reservation.amount = before
            raise self._refusal(when, used)

    async def _admit_shared(self, reservation: Reservation, used: float, when: datetime) -> tuple[bool, float]:
        assert self.shared is not None
        admitted, used = await self.shared.admit(reservation, used, self.neurons_per_day, _key_ttl(when))
        if admitted:
            reservation.shared = True
            self._keep_renewing()
        return admitted, used

    async def release(self, reservation: Reservation, neurons: float) -> None:
        """The request has ended and `neurons` of it are recorded in the ledger (0 when nothing was): its
        reservation is given back at once in this process, then in Redis."""
        task = self.release_soon(reservation, neurons)
        if task is not None:
            await asyncio.shield(task)  # a caller cancelled meanwhile does not leave it held in Redis

    def release_soon(self, reservation: Reservation, neurons: float = 0.0) -> asyncio.Task[None] | None:
        """`release` for paths that cannot wait (an exception, a cancelled task): given back in this process now,
        in Redis by the task returned (None when there is nothing to do there)."""
        if not self._release_locally(reservation) or self.shared is None:
            return None
        task = asyncio.get_running_loop().create_task(self._release_shared(reservation, neurons))
        self._background.add(task)  # a reference until it ends
        task.add_done_callback(self._background.discard)
        return task

    async def _release_shared(self, reservation: Reservation, neurons: float) -> None:
        """Redis' part of a release; also for a reservation it never held, so that its cost counts at once on every
        replica."""
        if self.shared is None or self.guard is None:
            return
        shared, ttl = self.shared, _key_ttl(datetime.fromisoformat(reservation.day))
        await self.guard.call(COMPONENT, lambda: shared.release(reservation, neurons, ttl), _nothing)

    def _release_locally(self, reservation: Reservation) -> bool:
        """Drop the reservation from this process; False if it was released already."""
        if reservation.released:
            return False
        reservation.released = True
        key = (reservation.account, reservation.day)
        held = self._held.get(key)
        if held is not None:
            held.pop(reservation.token, None)
            if not held:
                del self._held[key]
        return True

    async def stop(self) -> None:
        """At the policy's end, on its event loop: no more renewals of the leases, and the releases under way in
        Redis ended (each within the calls' timeout), so that nothing calls Redis after its connections close.
        A reservation made afterwards starts the renewals again."""
        if self._renewer is not None:
            self._renewer.cancel()
        running = [task for task in (self._renewer, *self._background) if task is not None and not task.done()]
        if running:
            await asyncio.wait(running)

    def _keep_renewing(self) -> None:
        """Renew this replica's leases in Redis while it holds any (the task ends when it holds none)."""
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        assert self.shared is not None and self.guard is not None
        shared = self.shared
        while True:
            await asyncio.sleep(shared.lease_seconds / 3)
            live = [r for held in self._held.values() for r in held.values() if r.shared and not r.released]
            if not live:
                return
            try:
                await self.guard.call(COMPONENT, functools.partial(shared.renew, live), _nothing)
            except Exception:  # a bug must not stop the renewals of the requests still running
                log.exception("renewing the daily allocation's reservations failed")

    def _refusal(self, when: datetime, used: float) -> ApiError:
        """429/3036. `used` (the neurons recorded on `when`'s day) below the allocation: the reservations of
        requests in flight reach it, and room may come back when they end; otherwise none comes back before 00:00
        UTC — unless that midnight has passed during the check (admitted just before it): then a retry counts to
        the new day, and the refusal says so (`Retry-After: 1`, no `x-should-retry: false`, which the SDK obeys)."""
        if used < self.neurons_per_day:
            return ApiError(ACCOUNT_LIMITED, allocation=self.describe(),
                            headers={"retry-after": str(IN_FLIGHT_RETRY_SECONDS)})
        until_midnight = math.ceil((start_of_day(when) + timedelta(days=1) - utc_now()).total_seconds())
        if until_midnight <= 0:
            return ApiError(ACCOUNT_LIMITED, allocation=self.describe(), headers={"retry-after": "1"})
        return ApiError(ACCOUNT_LIMITED, allocation=self.describe(),
                        headers={"retry-after": str(until_midnight), "x-should-retry": "false"})

    def describe(self) -> str:
        """`10,000` — as Workers AI's message writes it."""
        n = self.neurons_per_day
        return f"{int(n):,}" if float(n).is_integer() else f"{n:,}"


def _key_ttl(when: datetime) -> int:
    """Seconds the Redis keys of `when`'s day are kept: to the end of the day after it (a request arrived before
    midnight may end after it). Relative to `when`, so that a clock set to another day in tests keeps them too."""
    return max(1, math.ceil((start_of_day(when) + timedelta(days=2) - when).total_seconds()))


async def _admitted_locally(used: float) -> tuple[bool, float]:
    return True, used


async def _nothing() -> None:
    return None
