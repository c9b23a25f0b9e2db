"""The optional per-account daily neuron allocation (off by default; 10,000 neurons a day when on).

Workers AI gives every account 10,000 free neurons a day, reset at 00:00 UTC, and answers 429 with code 3036 once
they are used up. With `--daily-neurons [N]` int8serve does the same.

What a request costs is only known once it ends, so an admitted request **reserves** its worst case until its
ledger row is recorded: its prompt tokens + `max_tokens` at the card's neuron prices — the prompt bounded by its
UTF-8 bytes at admission (the body is checked, not yet tokenized), then narrowed to its real token count. Admission
is one check-and-reserve:

    admitted  if  used + reserved < allocation

`used` being the account's neurons since 00:00 UTC (read from the ledger, across all models and — with a shared
database — all replicas, plus the rows this process recorded since), `reserved` the worst cases of its requests
still in flight. The request admitted while the sum is below the allocation but whose own worst case takes it
there crosses the line: it is served in full, and every later request is refused while it runs — and after it, if
what it really cost used the allocation up. So at most one request crosses the line however many arrive at once:
the requests admitted before the last one cost less than the allocation together.

A reservation is released, its real cost then counting as used, when the request's ledger row is recorded — and in
every other way a request ends: refused by the rate limiter, over the context window, answered from the cache, an
engine or queue refusal, a client gone, a cancelled task (`Reservation.released` makes a second release a no-op).
A reservation that must widen (a tokenizer that gave more tokens than the bound; none of ours does) is admitted
again, or refused with 3036.

Reservations are held in this process: each replica counts its own.

A refusal does not count against the requests-per-minute limit. It carries `Retry-After` (seconds until 00:00
UTC) and `x-should-retry: false`, which the official SDK obeys instead of retrying twice in vain.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..errors import ACCOUNT_LIMITED, ApiError
from .ledger import Ledger, utc_now

__all__ = ["DailyAllocation", "Reservation", "start_of_day"]


def start_of_day(now: datetime) -> datetime:
    """00:00 of `now`'s day (naive UTC in, naive UTC out)."""
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(eq=False)
class Reservation:
    """The worst case of one admitted request, held against its account's allocation until it is released."""

    account: str
    day: str  # YYYY-MM-DD (UTC): the day the request arrived, as its ledger row says
    amount: float  # neurons
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # never the client-visible request id
    released: bool = False


class DailyAllocation:
    """Admits an account's requests while its neurons used and reserved today are below `neurons_per_day`."""

    def __init__(self, neurons_per_day: float, ledger: Ledger) -> None:
        self.neurons_per_day = neurons_per_day
        self.ledger = ledger
        self._held: dict[tuple[str, str], dict[str, Reservation]] = {}  # (account, day) -> token -> reservation

    async def used_today(self, account: str) -> float:
        return await self.ledger.neurons_used(account, start_of_day(utc_now()))

    def reserved(self, account: str, when: datetime | None = None) -> float:
        """What this process holds for `account`'s requests in flight (of `when`'s day, by default today)."""
        day = (when or utc_now()).date().isoformat()
        return sum(r.amount for r in self._held.get((account, day), {}).values())

    async def reserve(self, account: str, amount: float, when: datetime | None = None) -> Reservation:
        """Admit one request of `account` arrived at `when` (naive UTC; now by default) and hold `amount` neurons,
        its worst case, until `release`; raise 429/3036 when the account's used + reserved neurons already reach
        the allocation."""
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
            raise self._refusal(when)
        reservation.amount = max(0.0, amount)
        held[reservation.token] = reservation

    async def release(self, reservation: Reservation, neurons: float) -> None:
        """The request has ended and `neurons` of it are recorded in the ledger (0 when nothing was): its
        reservation is given back."""
        self.release_soon(reservation, neurons)

    def release_soon(self, reservation: Reservation, neurons: float = 0.0) -> asyncio.Task[None] | None:
        """`release` for paths that cannot wait (an exception, a cancelled task): given back at once (no task is
        left to wait for: None)."""
        self._release_locally(reservation)
        return None

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

    def _refusal(self, when: datetime) -> ApiError:
        until_midnight = math.ceil((start_of_day(when) + timedelta(days=1) - utc_now()).total_seconds())
        return ApiError(ACCOUNT_LIMITED, allocation=self.describe(),
                        headers={"retry-after": str(max(1, until_midnight)), "x-should-retry": "false"})

    def describe(self) -> str:
        """`10,000` — as Workers AI's message writes it."""
        n = self.neurons_per_day
        return f"{int(n):,}" if float(n).is_integer() else f"{n:,}"
