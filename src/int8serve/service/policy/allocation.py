"""The optional per-account daily neuron allocation (off by default; 10,000 neurons a day when on).

Workers AI gives every account 10,000 free neurons a day, reset at 00:00 UTC, and answers 429 with code 3036 once
they are used up. With `--daily-neurons [N]` int8serve does the same: before a request is
admitted, the account's neurons since 00:00 UTC (read from the ledger, across all models and — with a shared
database — all replicas) are compared with the allocation. The cost of a request is only known once it ends, so
the request that crosses the line is served in full and the next one is refused.

A refusal does not count against the requests-per-minute limit. It carries `Retry-After` (seconds until 00:00
UTC) and `x-should-retry: false`, which the official SDK obeys instead of retrying twice in vain.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from ..errors import ACCOUNT_LIMITED, ApiError
from .ledger import Ledger, utc_now

__all__ = ["DailyAllocation", "start_of_day"]


def start_of_day(now: datetime) -> datetime:
    """00:00 of `now`'s day (naive UTC in, naive UTC out)."""
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


class DailyAllocation:
    def __init__(self, neurons_per_day: float, ledger: Ledger) -> None:
        self.neurons_per_day = neurons_per_day
        self.ledger = ledger

    async def used_today(self, account: str) -> float:
        return await self.ledger.neurons_used(account, start_of_day(utc_now()))

    async def check(self, account: str) -> None:
        """Raise 429/3036 when `account` has used up today's allocation."""
        if await self.used_today(account) < self.neurons_per_day:
            return
        now = utc_now()
        until_midnight = math.ceil((start_of_day(now) + timedelta(days=1) - now).total_seconds())
        raise ApiError(ACCOUNT_LIMITED, allocation=self.describe(),
                       headers={"retry-after": str(max(1, until_midnight)), "x-should-retry": "false"})

    def describe(self) -> str:
        """`10,000` — as Workers AI's message writes it."""
        n = self.neurons_per_day
        return f"{int(n):,}" if float(n).is_integer() else f"{n:,}"
