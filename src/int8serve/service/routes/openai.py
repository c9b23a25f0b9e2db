"""OpenAI-compatible routes, over the same inference as `/ai/run`.

Under `/client/v4/accounts/{account_id}/ai/v1/` and as plain `/v1/` aliases (the account then is the token's):

* `POST chat/completions`: the messages through the card's chat template (`/ai/run` with `messages`);
* `POST completions`: the prompt as it is (`/ai/run` with `raw: true`);
* `GET models`: the served models as an OpenAI list (`id` = card name, `owned_by` = the name's author segment,
  `created` = the card's `created_at` in Unix seconds, UTC when it has no zone);
* `GET models/{model}`: one of them (the SDK's `models.retrieve`); a model not served is 404 (5007).

Authentication, the rate limit, the response cache, metering and the ledger are those of `/ai/run`
(`inference.py`); the bodies are `protocol/openai.py`'s. Errors are `{"error": {"message", "type", "param",
"code"}}` with the Workers AI code as `code` and the same status as on `/ai/run`, except that an unknown model
(5007) is 404 (the SDK's NotFoundError), missing credentials (9106) and a malformed Authorization header (6003,
its reason in the message) are 401, and a context overflow is OpenAI's own 400 `context_length_exceeded`
(`errors.py`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from starlette.responses import Response

from int8serve.catalog.card import ModelCard

from ..deps import Account, Services, TokenAccount
from ..errors import NO_SUCH_MODEL, ApiError, json_response
from ..formats import ChatFormat, CompletionFormat
from ..protocol.answers import (
    OPENAI_ERROR_RESPONSES,
    SSE_RESPONSE,
    ChatCompletion,
    Completion,
    ModelEntry,
    ModelList,
)

__all__ = ["router"]

ACCOUNT_PREFIX = "/client/v4/accounts/{account_id}/ai/v1"

router = APIRouter(tags=["OpenAI-compatible"], responses=OPENAI_ERROR_RESPONSES)


def _body(model: str) -> dict[str, object]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model}"}}}}}


def _entry(card: ModelCard) -> dict[str, object]:
    return {"id": card.name, "object": "model", "created": _created(card), "owned_by": card.author}


def _models(app: Services) -> Response:
    return json_response({"object": "list", "data": [_entry(app.catalog.get(name)) for name in app.engines]})


def _model(app: Services, model: str) -> Response:
    if model not in app.engines:
        raise ApiError(NO_SUCH_MODEL, model=model, note="")
    return json_response(_entry(app.catalog.get(model)))


def _created(card: ModelCard) -> int:
    """The card's `created_at` as Unix seconds (0 without one): a time without a zone, as the catalog writes it
    ("2023-09-25 19:21:11.898"), is UTC — not the server's local time."""
    raw = (card.front_matter.get("model") or {}).get("created_at")
    if raw is None:
        return 0
    try:
        created = datetime.fromisoformat(str(raw))
    except ValueError:
        return 0
    return int((created if created.tzinfo is not None else created.replace(tzinfo=UTC)).timestamp())


CHAT = {"response_model": ChatCompletion, "openapi_extra": _body("ChatCompletionRequest"),
        "responses": {200: SSE_RESPONSE}, "summary": "Chat completion"}
COMPLETION = {"response_model": Completion, "openapi_extra": _body("CompletionRequest"),
              "responses": {200: SSE_RESPONSE}, "summary": "Completion"}
MODELS = {"response_model": ModelList, "summary": "The served models"}
MODEL = {"response_model": ModelEntry, "summary": "One served model"}


@router.post(ACCOUNT_PREFIX + "/chat/completions", **CHAT)
async def chat(request: Request, account: Account, app: Services) -> Response:
    return await app.inference.run(request, account, ChatFormat())


@router.post(ACCOUNT_PREFIX + "/completions", **COMPLETION)
async def completions(request: Request, account: Account, app: Services) -> Response:
    return await app.inference.run(request, account, CompletionFormat())


@router.get(ACCOUNT_PREFIX + "/models", **MODELS)
async def models(account: Account, app: Services) -> Response:
    return _models(app)


@router.get(ACCOUNT_PREFIX + "/models/{model:path}", **MODEL)
async def model(model: str, account: Account, app: Services) -> Response:
    return _model(app, model)


@router.post("/v1/chat/completions", **CHAT)
async def chat_alias(request: Request, account: TokenAccount, app: Services) -> Response:
    return await app.inference.run(request, account, ChatFormat())


@router.post("/v1/completions", **COMPLETION)
async def completions_alias(request: Request, account: TokenAccount, app: Services) -> Response:
    return await app.inference.run(request, account, CompletionFormat())


@router.get("/v1/models", **MODELS)
async def models_alias(account: TokenAccount, app: Services) -> Response:
    return _models(app)


@router.get("/v1/models/{model:path}", **MODEL)
async def model_alias(model: str, account: TokenAccount, app: Services) -> Response:
    return _model(app, model)
