"""The playground: a single page at `/` to chat with the served models from a browser, plus `GET
/client/v4/accounts`, so that a user only pastes an API token.

Why it exists: trying a model (and its limits, speed and cost) should not need curl or an SDK. The page is plain
HTML, JavaScript and CSS kept in this package (`static/`, read with `importlib.resources`, no build step, nothing
from a CDN) and talks only to the public Workers AI routes of this same server, exactly as any other client:

* `GET /client/v4/accounts` → the account id of the token (Cloudflare's "List Accounts", `routes/workers_ai.py`);
* `GET .../ai/models/search` → the model picker; `GET .../ai/models/schema?model=` → the card's input schema, whose
  parameter limits and defaults (with the card's `sequence_length_limit` as `max_tokens`' maximum) bound the
  sampling inputs. Parameters the card's schema does not describe get the ranges this server enforces
  (`protocol.run.WORKERS_AI_PARAMETERS`), which the page receives inlined as JSON when it is served;
* `POST .../ai/run/{model}` with `{"messages": [...], "stream": true, ...}` → the streamed answer (SSE), whose final
  usage frame gives tokens and neurons; errors are the Cloudflare envelope, shown as readable sentences.

The token stays in the browser: in memory, or in `localStorage` when the user asks to remember it, and is sent only
in the `Authorization` header of requests to this origin. The page's Content-Security-Policy allows scripts,
styles and connections to this origin only, and model output is inserted as text, never as HTML.

Its URLs are relative, so it works behind a reverse proxy that serves the server under a path prefix. Such a proxy
(Traefik's StripPrefix, Caddy's `handle_path`) forwards `/int8serve` without its slash as `/`, like `/int8serve/`:
the server cannot tell them apart, and from `/int8serve` the relative URLs would resolve outside the prefix. So the
page's one inline script, first in its head, moves a page whose path lacks the slash to the same URL with it (a
server-side redirect could only loop); the Content-Security-Policy allows that script alone, by its hash
(`page_security_headers`).

The API's own page at `/docs` (`docs.html`, `docs.js`) lives here too, under the same rules: it lists the routes
of `/openapi.json` as text. FastAPI's default `/docs` (Swagger UI) would load its code from a CDN onto this origin,
where a remembered token is readable by any script, and shows nothing offline.

This module holds the pages and their assets; `routes/ops.py` serves them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from functools import cache
from importlib import resources

from ..protocol.run import WORKERS_AI_PARAMETERS

__all__ = ["ASSET_TYPES", "PAGE_SECURITY_HEADERS", "asset", "docs_page", "page", "page_security_headers",
           "server_parameter_ranges"]

STATIC_DIR = "static"
INDEX_FILE = "index.html"
DOCS_FILE = "docs.html"
RANGES_PLACEHOLDER = "__INT8SERVE_PARAMETER_RANGES__"
# asset file name -> Content-Type (a `text/*` type: Starlette adds `; charset=utf-8`)
ASSET_TYPES = {"playground.js": "text/javascript", "playground.css": "text/css", "docs.js": "text/javascript"}

PAGE_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)  # a script of the page itself, no attributes


def server_parameter_ranges() -> dict[str, dict[str, object]]:
    """The sampling parameters this server accepts beyond the card's schema, as JSON Schema fragments
    (`{"type", "minimum", "maximum"[, "default"]}`); `max_tokens` has only its lower bound (its maximum and
    default come from the card)."""
    return {"max_tokens": {"type": "integer", "minimum": 1}, **{k: dict(v) for k, v in WORKERS_AI_PARAMETERS.items()}}


@cache
def page() -> str:
    """The page, with the parameter ranges inlined."""
    return _read_static(INDEX_FILE).replace(RANGES_PLACEHOLDER, _script_json(server_parameter_ranges()))


@cache
def page_security_headers() -> dict[str, str]:
    """The playground page's headers: `PAGE_SECURITY_HEADERS`, its inline script allowed by its hash (CSP level 2),
    as it is in the file: a change to the script changes the hash with it."""
    hashes = [base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
              for script in _INLINE_SCRIPT.findall(_read_static(INDEX_FILE))]
    allowed = " ".join(["'self'", *(f"'sha256-{h}'" for h in hashes)])
    policy = PAGE_SECURITY_HEADERS["content-security-policy"].replace("script-src 'self'", f"script-src {allowed}")
    return {**PAGE_SECURITY_HEADERS, "content-security-policy": policy}


@cache
def docs_page() -> str:
    """The `/docs` page: the API's routes, read by its script from `/openapi.json`."""
    return _read_static(DOCS_FILE)


@cache
def asset(name: str) -> str:
    return _read_static(name)


def _read_static(name: str) -> str:
    return (resources.files(__package__) / STATIC_DIR / name).read_text(encoding="utf-8")


def _script_json(value: object) -> str:
    """JSON that is safe inside a `<script type="application/json">` element (no `</script>` can appear)."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
