"""Fair share of the engine: how many requests one account may have in it at once (running or waiting).

The card's requests-per-minute limit counts requests, not what they hold: five `max_tokens: 1800` streams from one
account take the 4 slots of this model for minutes and fill the queue, and everyone else gets 429/3040. So each
server also caps the requests an account has in its engines — admitted, not yet finished, whether in a slot or
waiting for one. Beyond the cap the account gets 429/3040 (`Capacity temporarily exceeded`), for that account only:
the others keep being served. Together with the engine's admission order (a free slot goes to the account with the
fewest running sequences) an account alone may use every slot, and a newcomer gets the next slot that frees. When
the shares of several accounts fill the engine's queue, the queue refuses the account holding the most instead of a
newcomer: the newcomer's request takes the place of that account's newest waiting one (`Engine.submit`).

The count is per server (replicas each keep their own), held on the event loop, and released when the engine ends
the request — not when the client leaves, since the engine may still be working on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from ..errors import CAPACITY, ApiError

__all__ = ["InflightLimiter", "default_inflight_limit"]


def default_inflight_limit(slots: int, accounts: int) -> int | None:
    """The default cap: the card's concurrent sequences when several accounts share the server; none for one."""
    return slots if accounts > 1 else None


class InflightLimiter:
    """Counts each account's requests in the engines and refuses one over `limit` (None or 0: no cap)."""

    def __init__(self, limit: int | None, retry_headers: Mapping[str, str] | None = None) -> None:
        self.limit = limit or None
        self.retry_headers = dict(retry_headers or {})
        self._counts: Counter[str] = Counter()

    def acquire(self, account: str) -> None:
        if self.limit is not None and self._counts[account] >= self.limit:
            raise ApiError(CAPACITY, headers=self.retry_headers)
        self._counts[account] += 1

    def release(self, account: str) -> None:
        self._counts[account] -= 1
        if self._counts[account] <= 0:
            del self._counts[account]

    def held(self, account: str) -> int:
        return self._counts[account]
