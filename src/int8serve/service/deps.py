"""FastAPI dependencies: the app's services, and who is calling (`Depends(current_account)`).

Every API route takes the account it acts for as a dependency, so that authentication (`auth.py`) runs before
anything else a route does, with Cloudflare's answers: nothing → 400/9106, a malformed header → 400/6003, an
unknown token → 401/10000, a token of another account → 403/10000. The security schemes below only describe the
credentials in the OpenAPI document; the headers are read and judged by `auth.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine

from .auth import TokenTable, authenticate, check_metrics_token, token_account
from .inference import Inference
from .lifecycle import Lifecycle
from .metrics import ServiceMetrics
from .policy import Policy
from .request_log import ACCOUNT_SCOPE_KEY

__all__ = ["Account", "AppServices", "Services", "TokenAccount", "current_account", "metrics_access"]

bearer = HTTPBearer(auto_error=False, scheme_name="apiToken",
                    description="`Authorization: Bearer <API token>` (curl, the openai SDK, the cloudflare SDK)")
auth_key = APIKeyHeader(name="X-Auth-Key", auto_error=False, scheme_name="authKey",
                        description="the API token as `X-Auth-Key`, with any `X-Auth-Email` (the cloudflare SDK "
                                    "sends these when CLOUDFLARE_EMAIL / CLOUDFLARE_API_KEY are set)")


@dataclass
class AppServices:
    """What the routes of one app share (`app.state.services`)."""

    catalog: Catalog
    engines: dict[str, Engine]
    tokens: TokenTable  # API token -> account id
    policy: Policy
    metrics: ServiceMetrics
    lifecycle: Lifecycle
    inference: Inference
    metrics_token: str | None = None
    retry_headers: dict[str, str] = field(default_factory=lambda: {"retry-after": "1"})


def services(request: Request) -> AppServices:
    return request.app.state.services


Services = Annotated[AppServices, Depends(services)]


async def current_account(account_id: str, request: Request, app: Services,
                          _token: Annotated[object, Security(bearer)] = None,
                          _key: Annotated[object, Security(auth_key)] = None) -> str:
    """The account in the URL, if the request's credentials belong to it."""
    account = authenticate(request.headers, account_id, app.tokens)
    request.scope[ACCOUNT_SCOPE_KEY] = account  # for the request's log line
    return account


async def token_owner(request: Request, app: Services, _token: Annotated[object, Security(bearer)] = None,
                      _key: Annotated[object, Security(auth_key)] = None) -> str:
    """The account of the request's token, for routes whose URL names none (`/v1/...`, `/client/v4/accounts`)."""
    account = token_account(request.headers, app.tokens)
    request.scope[ACCOUNT_SCOPE_KEY] = account  # for the request's log line
    return account


Account = Annotated[str, Depends(current_account)]
TokenAccount = Annotated[str, Depends(token_owner)]

metrics_bearer = HTTPBearer(auto_error=False, scheme_name="metricsToken",
                            description="`--metrics-token`, when the server is given one")


async def metrics_access(request: Request, app: Services,
                         _token: Annotated[object, Security(metrics_bearer)] = None) -> None:
    """`/metrics` with `--metrics-token`: only `Authorization: Bearer <that token>` may read it (401/10000); the
    scheme is read in any case, as the API's tokens are (`auth.py`)."""
    check_metrics_token(request.headers.get("authorization"), app.metrics_token)
