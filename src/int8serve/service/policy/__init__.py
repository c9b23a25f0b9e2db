"""The card's serving policy: per-account rate limits, the response cache, neuron metering and the usage ledger.

One concept per module:

* `settings.py` — what operators override (the card stays as shipped) and where state lives;
* `ratelimit.py` — requests per minute per account and model (`limits`, moving window; Redis for replicas);
* `cache.py` — the response cache, its key, AI Gateway's per-request headers;
* `metering.py` — neurons of a request, by how it ended;
* `ledger.py` / `spool.py` — the durable usage ledger (SQLAlchemy) and its local spool;
* `usage_rows.py` / `ledger_db.py` — the ledger's rows and totals, and its table and database engine;
* `data_dir.py` — the data directory's files, for the server's user alone;
* `deadline.py` — client-side deadlines for the ledger's database work (a database that hangs is away);
* `usage.py` — the usage endpoint's period and result;
* `allocation.py` — the optional daily neuron allocation (3036) and the reservations of requests in flight;
* `fallback.py` / `redis_state.py` — Redis as shared state, and carrying on without it;
* `policy.py` — all of it assembled (`Policy.build`, `Policy.in_memory`).

The request lifecycle (`service/inference.py`) applies them; `docs/policy.md` says which
answers count and what clients see.
"""

from .fallback import FallbackCounter
from .ledger import LedgerUnavailableError
from .metering import NEURONS_HEADER, Outcome, billed_neurons, format_neurons
from .policy import Policy, PolicyStartupError
from .settings import DEFAULT_DAILY_NEURONS, PolicySettings
from .usage_rows import UsageRow

__all__ = [
    "DEFAULT_DAILY_NEURONS",
    "NEURONS_HEADER",
    "FallbackCounter",
    "LedgerUnavailableError",
    "Outcome",
    "Policy",
    "PolicySettings",
    "PolicyStartupError",
    "UsageRow",
    "billed_neurons",
    "format_neurons",
]
