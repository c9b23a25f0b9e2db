"""How a request is framed on the wire, where uvicorn and h11 leave it to the application (RFC 9112).

* `AmbiguousLengthMiddleware`: a request whose body length its headers do not settle — `Content-Length` together
  with `Transfer-Encoding`, or `Transfer-Encoding` given more than once — is refused with a 400 envelope
  (`AMBIGUOUS_LENGTH`, 6003) and `Connection: close`, so that the server closes the connection after it (RFC 9112
  section 6.3). h11 reads such a body as chunked and went on to answer what followed it on the connection: behind
  a proxy that went by `Content-Length`, a request the proxy never saw (request smuggling).
* `AbsoluteFormMiddleware`: a request target in absolute form (`GET http://host/healthz HTTP/1.1`, as clients send
  it to a proxy) is routed by its path, as a server must accept that form (RFC 9112 section 3.2.2); uvicorn leaves
  the whole URL in the scope's path, where it matched no route (404/7000). Only the path changes: the token, and the
  account in the path, are checked as for any request.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import AMBIGUOUS_LENGTH, ApiError, error_response

__all__ = ["AbsoluteFormMiddleware", "AmbiguousLengthMiddleware"]

ABSOLUTE_FORM = re.compile(rb"https?://[^/]*", re.IGNORECASE)  # an http(s) URL's scheme and authority


class AmbiguousLengthMiddleware:
    """Refuses a request whose body length is ambiguous before anything reads its body, and has its connection
    closed after the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = _ambiguous_length(scope["headers"]) if scope["type"] == "http" else None
        if reason is None:
            await self.app(scope, receive, send)
            return
        err = ApiError(AMBIGUOUS_LENGTH, headers={"connection": "close"}, detail=reason)
        await error_response(scope["path"], err)(scope, receive, send)


def _ambiguous_length(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why `headers` (an ASGI scope's: lower-case names) do not settle the body's length; None when they do."""
    names = [name for name, _ in headers]
    encodings = names.count(b"transfer-encoding")
    if encodings and b"content-length" in names:
        return "Content-Length and Transfer-Encoding given together"
    if encodings > 1:
        return "Transfer-Encoding given more than once"
    return None


class AbsoluteFormMiddleware:
    """Gives the app the path of an absolute-form request target (`path` and `raw_path`; uvicorn has already split
    off the query string); other targets pass unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = scope.get("raw_path") or b"" if scope["type"] == "http" else b""
        if origin := ABSOLUTE_FORM.match(target):
            raw_path = target[origin.end():] or b"/"  # `http://host` (or `http://host?q`): the root
            scope = {**scope, "raw_path": raw_path, "path": unquote(raw_path.decode("ascii"))}
        await self.app(scope, receive, send)
