"""The playground: a single page at `/` to chat with the served models from a browser, plus `GET
/client/v4/accounts`, so that a user only pastes an API token.

Why it exists: trying a model (and its limits, speed and cost) should not need curl or an SDK. The page is plain
HTML, JavaScript and CSS kept in this package (`static/`, read with `importlib.resources`, no build step, nothing
from a CDN) and talks only to the public Workers AI routes of this same server, exactly as any other client:

* `GET /client/v4/accounts` → the account id of the token (this module; Cloudflare's real endpoint, below);
* `GET .../ai/models/search` → the model picker; `GET .../ai/models/schema?model=` → the card's input schema, whose
  parameter limits and defaults (with the card's `sequence_length_limit` as `max_tokens`' maximum) bound the
  sampling inputs. Parameters the card's schema does not describe get the ranges this server enforces
  (`inputs.PARAMETER_RANGES`), which the page receives inlined as JSON when it is served;
* `POST .../ai/run/{model}` with `{"messages": [...], "stream": true, ...}` → the streamed answer (SSE), whose final
  usage frame gives tokens and neurons; errors are the Cloudflare envelope, shown as readable sentences.

The token stays in the browser: in memory, or in `localStorage` when the user asks to remember it, and is sent only
in the `Authorization` header of requests to this origin. The page's Content-Security-Policy allows scripts,
styles and connections to this origin only, and model output is inserted as text, never as HTML.

`GET /client/v4/accounts` mirrors Cloudflare's "List Accounts": the accounts the credentials may use, in the v4
envelope with `result_info` (`page`, `per_page`, `count`, `total_count`, `total_pages`). Here a token belongs to
exactly one account, whose name is its id. Query: `page` (≥ 1), `per_page` (1–50, default 20), `name` (a
case-insensitive substring of the name), `direction` (`asc`/`desc`). Credentials are checked like every other
route (`auth.py`): none → 400/9106, a malformed header → 400/6003, an unknown token → 401/10000.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..auth import token_account
from ..errors import BAD_QUERY, NO_ROUTE, ApiError, json_response, success_body
from ..inputs import DEFAULT_TEMPERATURE, PARAMETER_RANGES

__all__ = ["ASSET_PREFIX", "PAGE_SECURITY_HEADERS", "playground_router", "server_parameter_ranges"]

ASSET_PREFIX = "/playground/"
ACCOUNTS_PATH = "/client/v4/accounts"
STATIC_DIR = "static"
INDEX_FILE = "index.html"
RANGES_PLACEHOLDER = "__INT8SERVE_PARAMETER_RANGES__"
# asset file name -> Content-Type (a `text/*` type: Starlette adds `; charset=utf-8`)
ASSET_TYPES = {"playground.js": "text/javascript", "playground.css": "text/css"}

ACCOUNTS_DEFAULT_PER_PAGE = 20
ACCOUNTS_MAX_PER_PAGE = 50  # Cloudflare's maximum for this endpoint

PAGE_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def server_parameter_ranges() -> dict[str, dict[str, object]]:
    """The sampling parameters this server accepts beyond the card's schema, as JSON Schema fragments
    (`{"type", "minimum", "maximum"[, "default"]}`); `max_tokens` has only its lower bound (its maximum and
    default come from the card)."""
    ranges: dict[str, dict[str, object]] = {"max_tokens": {"type": "integer", "minimum": 1}}
    for name, (kind, low, high) in PARAMETER_RANGES.items():
        ranges[name] = {"type": kind, "minimum": low, "maximum": high}
    ranges["temperature"]["default"] = DEFAULT_TEMPERATURE
    return ranges


def playground_router(tokens: Mapping[str, str]) -> APIRouter:
    """`GET /` (the page), `GET /playground/{asset}` (its script and style sheet) and `GET /client/v4/accounts`.

    `tokens` maps API token → account id, as given to `create_app`.
    """
    page = _read_static(INDEX_FILE).replace(RANGES_PLACEHOLDER, _script_json(server_parameter_ranges()))
    assets = {name: _read_static(name) for name in ASSET_TYPES}
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def playground_page() -> Response:
        return Response(page, media_type="text/html", headers=PAGE_SECURITY_HEADERS)

    @router.get(ASSET_PREFIX + "{name}", include_in_schema=False)
    async def playground_asset(name: str) -> Response:
        if name not in assets:
            raise ApiError(NO_ROUTE)
        return Response(assets[name], media_type=ASSET_TYPES[name], headers=PAGE_SECURITY_HEADERS)

    @router.get(ACCOUNTS_PATH)
    async def list_accounts(request: Request) -> Response:
        account = token_account(request.headers, tokens)
        query = request.query_params
        page = _positive_int(query.get("page"), "page", default=1, high=None)
        per_page = _positive_int(query.get("per_page"), "per_page", default=ACCOUNTS_DEFAULT_PER_PAGE,
                                 high=ACCOUNTS_MAX_PER_PAGE)
        direction = (query.get("direction") or "asc").strip().lower()
        if direction not in ("asc", "desc"):
            raise ApiError(BAD_QUERY, name="direction", problem=f"expected asc or desc, got {query['direction']!r}")
        wanted = (query.get("name") or "").strip().casefold()
        accounts = [{"id": account, "name": account, "type": "standard"}]
        accounts = [a for a in accounts if wanted in a["name"].casefold()]
        items = accounts[(page - 1) * per_page:page * per_page]
        total_pages = -(-len(accounts) // per_page)
        info = {"page": page, "per_page": per_page, "count": len(items), "total_count": len(accounts),
                "total_pages": total_pages}
        return json_response(success_body(items, info))

    return router


def _read_static(name: str) -> str:
    return (resources.files(__package__) / STATIC_DIR / name).read_text(encoding="utf-8")


def _script_json(value: object) -> str:
    """JSON that is safe inside a `<script type="application/json">` element (no `</script>` can appear)."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


def _positive_int(raw: str | None, name: str, *, default: int, high: int | None) -> int:
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    # at most 9 digits: a longer string is out of range anyway, and int() of thousands of digits raises
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else 0
    if value < 1 or (high is not None and value > high):
        bound = f"an integer between 1 and {high}" if high is not None else "an integer of at least 1"
        raise ApiError(BAD_QUERY, name=name, problem=f"expected {bound}, got {raw!r}")
    return value
