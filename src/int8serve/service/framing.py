"""How a request is framed on the wire, where uvicorn and h11 leave it to the application (RFC 9112).

`AmbiguousLengthMiddleware`: a request whose body length its headers do not settle — `Content-Length` together with
`Transfer-Encoding`, or `Transfer-Encoding` given more than once — is refused with a 400 envelope (`AMBIGUOUS_LENGTH`,
6003) and `Connection: close`, so that the server closes the connection after it (RFC 9112 section 6.3). h11 reads
such a body as chunked and went on to answer what followed it on the connection: behind a proxy that went by
`Content-Length`, a request the proxy never saw (request smuggling).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import AMBIGUOUS_LENGTH, ApiError, error_response

__all__ = ["AmbiguousLengthMiddleware"]


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
