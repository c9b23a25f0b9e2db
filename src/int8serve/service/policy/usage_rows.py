"""The usage ledger's row types: a request's row (`UsageRow`), how it is read back from the spool's JSON, and
the totals the ledger reads (`UsageGroup`, `NeuronsReading`).

They are apart from `ledger.py` (the writer, flusher and reader threads) because modules that only handle rows and
totals (`usage.py`, `allocation.py`, the request lifecycle) need them without the ledger's machinery.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["MAX_COUNT", "OUTCOMES", "NeuronsReading", "UsageGroup", "UsageRow", "utc_now"]

OUTCOMES = ("ok", "aborted", "error")
MAX_COUNT = 2**31 - 1  # the largest token count the table's Integer columns hold
_EXPECTED = {  # what each field of a spooled row must be, as read from JSON
    "request_id": "a string", "time": "an ISO 8601 time", "account": "a string", "model": "a string",
    "input_tokens": f"an integer from 0 to {MAX_COUNT}", "output_tokens": f"an integer from 0 to {MAX_COUNT}",
    "neurons": "a finite number >= 0", "cached": "true or false", "outcome": "a string",
    "latency_ms": "a finite number >= 0"}


def utc_now() -> datetime:
    """Now in UTC, without tzinfo: the ledger stores naive UTC times (SQLite has no time zones)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    time: datetime  # naive UTC
    account: str
    model: str
    input_tokens: int
    output_tokens: int
    neurons: float
    cached: bool
    outcome: str  # ok | aborted | error
    latency_ms: float

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    @property
    def day(self) -> str:
        return self.time.date().isoformat()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "time": self.time.isoformat()}

    @classmethod
    def from_json(cls, data: Any) -> UsageRow:
        """The row `to_json` made, each field checked (the spool may be damaged or edited by hand): ValueError for
        anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"a ledger row is a JSON object, not {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        if set(data) != set(names):
            raise ValueError(f"fields missing: {sorted(set(names) - set(data))}, "
                             f"unknown: {sorted(set(data) - set(names))[:10]}")
        return cls(**{name: _from_json_field(name, data[name]) for name in names})

    def to_db(self) -> dict[str, Any]:
        return {**asdict(self), "day": self.day}


def _from_json_field(name: str, value: Any) -> Any:
    """The value of the row's field `name` from JSON, if it has the field's type; else ValueError."""
    if name == "time" and isinstance(value, str):
        when = datetime.fromisoformat(value)  # ValueError if it is not one
        try:
            return when if when.tzinfo is None else when.astimezone(UTC).replace(tzinfo=None)  # naive UTC, as written
        except OverflowError:  # its offset moves it past year 1 or 9999
            raise ValueError(f"time is out of range in UTC: {value!r:.100}") from None
    if _EXPECTED[name] == "a string" and isinstance(value, str):
        value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate, which no database takes
        return value
    if name in ("input_tokens", "output_tokens") and type(value) is int and 0 <= value <= MAX_COUNT:
        return value
    if name in ("neurons", "latency_ms") and type(value) in (int, float):  # not a bool
        with contextlib.suppress(OverflowError):  # an integer beyond any float: refused below
            number = float(value)
            if math.isfinite(number) and number >= 0:  # json reads NaN and Infinity: no sum survives them
                return number
    if name == "cached" and type(value) is bool:
        return value
    raise ValueError(f"{name} must be {_EXPECTED[name]}, not {value!r:.100}")


@dataclass(frozen=True)
class NeuronsReading:
    """An account's neurons of one day as the ledger read them (`Ledger.neurons_reading`)."""

    ledger: Ledger
    account: str
    day: str  # YYYY-MM-DD
    total: float  # the database's sum and the spooled rows, as last read
    recorded_then: float  # what this process had recorded when `total` was read

    def now(self) -> float:
        """The total plus what this process recorded since it was read: no I/O, safe on the event loop."""
        return self.total + (self.ledger.recorded_neurons(self.account, self.day) - self.recorded_then)


@dataclass(frozen=True)
class UsageGroup:
    """Totals of one model or one day."""

    name: str
    requests: int
    cached_requests: int
    input_tokens: int
    output_tokens: int
    neurons: float
