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

Every number has an upper bound, `serve`'s own where `serve` has the setting (int8serve/settings.py says why each
is what it is): seconds at most a day, requests per minute at most 10**9, neurons at most 10**12. Made directly
(library use), the settings had none, and took a rate of 400 digits, a timeout of 1e300 or inf as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from int8serve.settings import MAX_DAILY_NEURONS, MAX_RPM, MAX_SECONDS

__all__ = [
    "DEFAULT_CACHE_MAX_BYTES",
    "DEFAULT_CACHE_MAX_ENTRIES",
    "DEFAULT_CACHE_TTL_SECONDS",
    "DEFAULT_DAILY_NEURONS",
    "DEFAULT_DATABASE_TIMEOUT",
    "DEFAULT_LEDGER_TABLE",
    "MAX_CACHE_BYTES",
    "MAX_CACHE_ENTRIES",
    "MAX_CACHE_TTL_SECONDS",
    "PolicySettings",
]

DEFAULT_CACHE_TTL_SECONDS = 300
MAX_CACHE_TTL_SECONDS = 30 * 24 * 3600  # AI Gateway's maximum: one month
DEFAULT_CACHE_MAX_ENTRIES = 256  # per account (per scope owner)
DEFAULT_CACHE_MAX_BYTES = 16 << 20  # per account
# the in-process cache's bounds per account (no `serve` setting): beyond the memory of any server
MAX_CACHE_ENTRIES = 10**9
MAX_CACHE_BYTES = 1 << 40  # a TiB
DEFAULT_DAILY_NEURONS = 10_000  # Workers AI's free daily allocation
DEFAULT_LEDGER_TABLE = "int8serve_usage"
DEFAULT_DATABASE_TIMEOUT = 5.0  # seconds: ledger database work (a flush, a read, a connection) that takes longer
# means the database is away

Rpm = Annotated[int, Field(ge=0, le=MAX_RPM)]  # requests per minute
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]  # a duration


class PolicySettings(BaseModel):
    """Operator overrides of the card's policy, and the backends. The defaults follow the card, in memory.

    `int8serve serve` makes it from its already validated settings (`server.policy_settings`, without checking
    again); made directly (tests, library use), pydantic checks every field.
    """

    model_config = ConfigDict(frozen=True)

    rate_limits: bool = True
    default_rpm: Rpm | None = None  # replaces the card's default; 0 = unlimited; None = the card's
    account_rpm: Mapping[Annotated[str, Field(min_length=1)], Rpm] = Field(
        default_factory=dict)  # per account, over the card's; 0 = unlimited
    window_seconds: int = Field(60, ge=1, le=MAX_SECONDS)  # the moving window; "per minute" — shorter only in tests
    cache: bool = True  # False: no response cache whatever the card says
    cache_ttl: int = Field(DEFAULT_CACHE_TTL_SECONDS, ge=1, le=MAX_CACHE_TTL_SECONDS)  # also the most a request's
    # cf-aig-cache-ttl may ask for
    cache_scope: Literal["account", "global"] = "account"  # each account its own answers, or shared by all
    cache_max_entries: int = Field(DEFAULT_CACHE_MAX_ENTRIES, ge=1, le=MAX_CACHE_ENTRIES)
    cache_max_bytes: int = Field(DEFAULT_CACHE_MAX_BYTES, ge=1, le=MAX_CACHE_BYTES)
    # per-account daily allocation; None = off
    daily_neurons: float | None = Field(None, gt=0, le=MAX_DAILY_NEURONS, allow_inf_nan=False)
    # how long a replica's reservation of the allocation in Redis outlives the replica (renewed while it runs)
    allocation_lease_seconds: Seconds = 30.0
    redis_url: str | None = None
    database_url: str | None = None
    data_dir: Path | None = None
    ledger_table: str = Field(DEFAULT_LEDGER_TABLE, pattern=r"^[A-Za-z0-9_]+$")
    backend_timeout: Seconds = 1.0  # seconds for one Redis call before it counts as lost
    retry_seconds: Seconds = 1.0  # how soon a lost Redis or database is tried again
    database_timeout: Seconds = DEFAULT_DATABASE_TIMEOUT  # seconds for one piece of ledger database work (a
    # statement, a flush, a read) before the database counts as away
    replica_stamp_seconds: Seconds = 5.0  # how often a replica counts the replicas sharing its Redis
