"""What an operator may change about the card's serving policy, and where the policy keeps its state.

The card's `constellation_config` is the policy as shipped (requests per minute with per-account overrides, the
response cache, neuron costs). Operators adjust it without editing the card, through these settings (the `serve`
flags `--rpm`, `--account-rpm`, `--no-cache`, `--cache-ttl`, `--daily-neurons`), and choose where state lives:

* nothing configured: everything in this process (rate-limit windows and cache in memory, the ledger in an
  in-memory SQLite database) — what `create_app` uses when it is given no policy;
* `data_dir`: the ledger in `<data_dir>/usage.sqlite3` and its spool in `<data_dir>/ledger-spool.jsonl`;
* `redis_url`: rate-limit windows and the response cache shared by every replica using the same Redis;
* `database_url`: the ledger in that database (PostgreSQL for replicas), the spool still in `data_dir`.

Rate limits resolve, most specific first: operator per-account value, card per-account value, operator default,
card default. A value of 0 means "no limit". `rate_limits=False` turns the limiter off altogether.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_CACHE_MAX_BYTES",
    "DEFAULT_CACHE_MAX_ENTRIES",
    "DEFAULT_CACHE_TTL_SECONDS",
    "DEFAULT_DAILY_NEURONS",
    "DEFAULT_LEDGER_TABLE",
    "MAX_CACHE_TTL_SECONDS",
    "PolicySettings",
]

DEFAULT_CACHE_TTL_SECONDS = 300
MAX_CACHE_TTL_SECONDS = 30 * 24 * 3600  # AI Gateway's maximum: one month
DEFAULT_CACHE_MAX_ENTRIES = 256  # per account (per scope owner)
DEFAULT_CACHE_MAX_BYTES = 16 << 20  # per account
DEFAULT_DAILY_NEURONS = 10_000  # Workers AI's free daily allocation
DEFAULT_LEDGER_TABLE = "int8serve_usage"


@dataclass(frozen=True)
class PolicySettings:
    """Operator overrides of the card's policy, and the backends. The defaults follow the card, in memory."""

    rate_limits: bool = True
    default_rpm: int | None = None  # replaces the card's default; 0 = unlimited; None = the card's
    account_rpm: Mapping[str, int] = field(default_factory=dict)  # per account, over the card's; 0 = unlimited
    window_seconds: int = 60  # the moving window; "per minute" — shorter only in tests
    cache: bool = True  # False: no response cache whatever the card says
    cache_ttl: int = DEFAULT_CACHE_TTL_SECONDS  # also the most a request's cf-aig-cache-ttl may ask for
    cache_scope: str = "account"  # "account": each account its own answers; "global": shared by all accounts
    cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    daily_neurons: float | None = None  # per-account daily allocation; None = off
    redis_url: str | None = None
    database_url: str | None = None
    data_dir: Path | None = None
    ledger_table: str = DEFAULT_LEDGER_TABLE
    backend_timeout: float = 1.0  # seconds for one Redis call before it counts as lost
    retry_seconds: float = 1.0  # how soon a lost Redis or database is tried again

    def __post_init__(self) -> None:
        if self.default_rpm is not None and self.default_rpm < 0:
            raise ValueError(f"the default requests per minute must be >= 0, got {self.default_rpm}")
        for account, rpm in self.account_rpm.items():
            if not str(account) or rpm < 0:
                raise ValueError(f"per-account requests per minute must be >= 0 for a named account, "
                                 f"got {account!r}={rpm}")
        if self.window_seconds < 1:
            raise ValueError("window_seconds must be at least 1")
        if not 1 <= self.cache_ttl <= MAX_CACHE_TTL_SECONDS:
            raise ValueError(f"the cache TTL must be between 1 and {MAX_CACHE_TTL_SECONDS} seconds, "
                             f"got {self.cache_ttl}")
        if self.cache_max_entries < 1 or self.cache_max_bytes < 1:
            raise ValueError("the cache bounds must be at least 1")
        if self.daily_neurons is not None and not self.daily_neurons > 0:
            raise ValueError(f"the daily neuron allocation must be positive, got {self.daily_neurons}")
        if not self.ledger_table.replace("_", "").isalnum():
            raise ValueError(f"the ledger table name must be letters, digits and _, got {self.ledger_table!r}")
        if self.backend_timeout <= 0 or self.retry_seconds <= 0:
            raise ValueError("backend_timeout and retry_seconds must be positive")
