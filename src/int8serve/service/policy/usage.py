"""`GET /client/v4/accounts/{account_id}/ai/usage?since=&until=`: an account's own totals from the ledger.

Only the caller's own account can be read: the route authenticates the token against the account in the URL
(another account's id is 403/10000, as on every route). The period is `since <= time < until`, in UTC:

* `since` / `until` accept a date (`2024-05-01`), an ISO 8601 time (`2024-05-01T12:00:00Z`, an offset, or no zone
  = UTC) or unix seconds; a date as `until` includes that whole day;
* the default is the last 30 days up to now, in whole seconds: `until` is now rounded up to the next second (so
  that a row written a moment ago is in), `since` 30 days before it.

The result holds the totals (requests, cached requests, input/output tokens, neurons) over the period, by model and
by UTC day, plus the daily allocation when it is on. Every row of the ledger counts as a request: complete,
aborted, failed or answered from the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from ..errors import BAD_QUERY, ApiError
from .usage_rows import UsageGroup, utc_now

__all__ = ["DEFAULT_PERIOD", "parse_period", "usage_result"]

DEFAULT_PERIOD = timedelta(days=30)
MAX_UNIX_DIGITS = 11  # unix seconds up to the year 5138
DEFAULT_PERIOD_START = datetime.min + DEFAULT_PERIOD


def parse_period(since: str | None, until: str | None, now: datetime | None = None) -> tuple[datetime, datetime]:
    """(since, until) as naive UTC datetimes; 400/1001 when unreadable or empty."""
    end = _parse_time(until, "until", end_of_day=True) if until else _whole_second_up(now or utc_now())
    start = _parse_time(since, "since", end_of_day=False) if since else max(end, DEFAULT_PERIOD_START) - DEFAULT_PERIOD
    if start >= end:
        raise ApiError(BAD_QUERY, name="since", problem="must be earlier than 'until'")
    return start, end


def _whole_second_up(value: datetime) -> datetime:
    """`value` rounded up to a whole second (the period ends before `until`: every row up to `value` is in)."""
    whole = value.replace(microsecond=0)
    return whole if whole == value else whole + timedelta(seconds=1)


def _parse_time(raw: str, name: str, *, end_of_day: bool) -> datetime:
    text = raw.strip()
    try:
        if text.isascii() and text.isdigit():
            if len(text) > MAX_UNIX_DIGITS:
                raise ValueError("too large")
            return datetime.fromtimestamp(int(text), UTC).replace(tzinfo=None)
        value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if value.tzinfo is not None:  # an offset may move it past year 1 or 9999
            value = value.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError, OSError):
        problem = f"expected a date, an ISO 8601 time or unix seconds, got {raw[:40]!r}"
        raise ApiError(BAD_QUERY, name=name, problem=problem) from None
    if end_of_day and _plain_date(text):  # the whole day (the last one there is: to its end)
        value = value + timedelta(days=1) if value < datetime.max - timedelta(days=1) else datetime.max
    return value


def _plain_date(text: str) -> bool:
    """Whether `text` is an ISO 8601 date without a time, in any of its forms (`2026-12-01`, `20261201`,
    `2026-W49-1`); `2026W49T00`, as long as the first, is a time."""
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _totals(groups: Sequence[UsageGroup]) -> dict[str, Any]:
    return {
        "requests": sum(g.requests for g in groups),
        "cached_requests": sum(g.cached_requests for g in groups),
        "input_tokens": sum(g.input_tokens for g in groups),
        "output_tokens": sum(g.output_tokens for g in groups),
        "neurons": round(sum(g.neurons for g in groups), 6),
    }


def _group(key: str, group: UsageGroup) -> dict[str, Any]:
    return {key: group.name, **_totals([group])}


def usage_result(account: str, since: datetime, until: datetime, by_model: Sequence[UsageGroup],
                 by_day: Sequence[UsageGroup], allocation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `result` object of the usage endpoint."""
    return {
        "account_id": account,
        "since": _iso(since),
        "until": _iso(until),
        "totals": _totals(by_model),
        "by_model": [_group("model", g) for g in by_model],
        "by_day": [_group("day", g) for g in by_day],
        "daily_allocation": allocation,
    }


def _iso(value: datetime) -> str:
    return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
