"""The Workers AI routes under `/client/v4`, as Cloudflare's API has them.

* `POST /accounts/{account_id}/ai/run/{model}`: text generation. The model name keeps its raw `@` and `/`
  (`.../ai/run/@cf/meta/llama-2-7b-chat-int8`); `%40`/`%2F`-encoded names work too. Unknown query parameters are
  ignored.
* `GET /accounts/{account_id}/ai/models/search`: the served models, filtered and paginated (a page past the end is
  empty, so that the SDK's pagination stops).
* `GET /accounts/{account_id}/ai/models/schema?model=`: a served model's input and output schemas.
* `GET /accounts/{account_id}/ai/usage?since=&until=`: the account's own metered usage (`policy/usage.py`).
* `GET /accounts`: Cloudflare's "List Accounts": the token's own account (here a token belongs to exactly one
  account, whose name is its id), so that the playground and `client.accounts.list()` find it from a token alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from int8serve.catalog.card import ModelCard

from ..deps import Account, Services, TokenAccount
from ..errors import BAD_QUERY, USAGE_UNAVAILABLE, ApiError, json_response, success_body
from ..formats import WorkersAIFormat
from ..policy import LedgerUnavailableError
from ..policy.usage import parse_period, usage_result
from ..protocol.answers import ERROR_RESPONSES, SSE_RESPONSE, RunEnvelope

__all__ = ["DEFAULT_PER_PAGE", "MAX_PER_PAGE", "router"]

DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 1000
ACCOUNTS_MAX_PER_PAGE = 50  # Cloudflare's maximum for List Accounts
MAX_PAGE = 1_000_000_000
RUN_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/RunBody"}}}}}

router = APIRouter(prefix="/client/v4", tags=["Workers AI"], responses=ERROR_RESPONSES)

Page = Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number")]


@router.post("/accounts/{account_id}/ai/run/{model:path}", response_model=RunEnvelope, openapi_extra=RUN_BODY,
             responses={200: SSE_RESPONSE}, summary="Run a model")
async def run_model(request: Request, model: str, account: Account, app: Services) -> Response:
    """The body is JSON whatever the Content-Type (`RunBody`, checked against the model's card)."""
    return await app.inference.run(request, account, WorkersAIFormat(), model)


@router.get("/accounts/{account_id}/ai/models/search", summary="Search the served models")
async def search_models(account: Account, app: Services, page: Page = 1,
                        per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = DEFAULT_PER_PAGE,
                        task: str | None = None, search: str | None = None, author: str | None = None,
                        source: Annotated[float | None, Query(description="1 for @cf, 2 for @hf")] = None,
                        hide_experimental: bool = False) -> Response:
    if source is not None and not source.is_integer():  # the SDK types it as a float: 1.0 means 1
        raise ApiError(BAD_QUERY, name="source", problem=f"expected a source id (1 for @cf, 2 for @hf), got {source}")
    cards = [card for card in app.catalog.search(task=task, search=search, author=author,
                                                 source=int(source) if source is not None else None)
             if card.name in app.engines and not (hide_experimental and _experimental(card))]
    items = cards[(page - 1) * per_page:page * per_page]
    info = {"count": len(items), "page": page, "per_page": per_page, "total_count": len(cards)}
    return json_response(success_body([card.to_search_result() for card in items], info))


@router.get("/accounts/{account_id}/ai/models/schema", summary="A served model's input and output schemas")
async def model_schema(account: Account, app: Services, model: str | None = None) -> Response:
    if not model:
        raise ApiError(BAD_QUERY, name="model", problem="a model name is required")
    return json_response(success_body(app.inference.served(model).card.to_schema_result()))


@router.get("/accounts/{account_id}/ai/usage", summary="The account's metered usage")
async def usage(account: Account, app: Services,
                since: Annotated[str | None, Query(max_length=64, description="a date, ISO 8601 time or unix "
                                                                              "seconds (default: 30 days before "
                                                                              "until)")] = None,
                until: Annotated[str | None, Query(max_length=64, description="as since (default: now, rounded up "
                                                                              "to a whole second)")] = None
                ) -> Response:
    start, end = parse_period(since, until)
    policy = app.policy
    try:
        by_model, by_day = await policy.ledger.usage(account, start, end)
        allocation = None
        if policy.allocation is not None:
            used = round(await policy.allocation.used_today(account), 6)
            in_flight = round(await policy.allocation.reserved_everywhere(account), 6)
            per_day = policy.allocation.neurons_per_day
            allocation = {"neurons_per_day": per_day, "used_today": used, "reserved_in_flight": in_flight,
                          "remaining_today": round(max(0.0, per_day - used - in_flight), 6)}
    except LedgerUnavailableError:
        raise ApiError(USAGE_UNAVAILABLE, headers=app.retry_headers) from None
    return json_response(success_body(usage_result(account, start, end, by_model, by_day, allocation)))


@router.get("/accounts", summary="The accounts of the token (Cloudflare's List Accounts)")
async def list_accounts(account: TokenAccount, page: Page = 1,
                        per_page: Annotated[int, Query(ge=1, le=ACCOUNTS_MAX_PER_PAGE)] = DEFAULT_PER_PAGE,
                        name: str = "", direction: Literal["asc", "desc"] = "asc") -> Response:
    accounts = [a for a in [{"id": account, "name": account, "type": "standard"}]
                if name.strip().casefold() in a["name"].casefold()]
    items = accounts[(page - 1) * per_page:page * per_page]
    info = {"page": page, "per_page": per_page, "count": len(items), "total_count": len(accounts),
            "total_pages": -(-len(accounts) // per_page)}
    return json_response(success_body(items, info))


def _experimental(card: ModelCard) -> bool:
    """Experimental = marked beta in its properties, or tagged experimental."""
    beta = str(card.properties.get("beta", "")).strip().lower() == "true"
    return beta or any(tag.lower() == "experimental" for tag in card.tags)
