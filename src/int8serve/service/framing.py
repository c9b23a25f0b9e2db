"""How a request is framed on the wire, where uvicorn and h11 leave it to the application (RFC 9112).

* `AmbiguousLengthMiddleware`: a request whose body length its headers do not settle — `Content-Length` together
  with `Transfer-Encoding`, or `Transfer-Encoding` given more than once — is refused with a 400 envelope
  (`AMBIGUOUS_LENGTH`, 6003) and `Connection: close`, so that the server closes the connection after it (RFC 9112
  section 6.3). h11 reads such a body as chunked and went on to answer what followed it on the connection: behind
  a proxy that went by `Content-Length`, a request the proxy never saw (request smuggling).
  It also answers the requests that uvicorn's HTTP parser (h11) refuses itself, which uvicorn answered with a
  plain-text 400 of its own that no envelope, request id, log line or metric saw: the connection
  (`connections.HeaderDeadlineProtocol`) hands the app such a request with its refusal in the scope
  (`MALFORMED_SCOPE_KEY`, a `Malformed`; `malformed_request` words it), answered 400/6003 in the same way. A head
  h11 cannot read (differing `Content-Length`s, one that is not a length, no `Host` or two, a `Transfer-Encoding`
  other than chunked, a line too long) is `AMBIGUOUS_LENGTH`'s "Invalid request headers"; a chunked body it cannot
  read (a chunk size that is not one) is `MALFORMED_BODY`, raised from the route's next `receive`, so that the
  request the route was reading ends in its envelope, log line and metrics as a 400, not as a client that left.
* `AbsoluteFormMiddleware`: a request target in absolute form (`GET http://host/healthz HTTP/1.1`, as clients send
  it to a proxy) is routed by its path, as a server must accept that form (RFC 9112 section 3.2.2); uvicorn leaves
  the whole URL in the scope's path, where it matched no route (404/7000). Only the path changes: the token, and the
  account in the path, are checked as for any request.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import AMBIGUOUS_LENGTH, MALFORMED_BODY, ApiError, error_response
from .protocol.body import CLOSE

__all__ = ["MALFORMED_SCOPE_KEY", "AbsoluteFormMiddleware", "AmbiguousLengthMiddleware", "Malformed",
           "malformed_request"]

ABSOLUTE_FORM = re.compile(rb"https?://[^/]*", re.IGNORECASE)  # an http(s) URL's scheme and authority
MALFORMED_SCOPE_KEY = "int8serve.malformed"  # a request's `Malformed`, put in its scope by the connection
# h11's reasons for refusing a request, by the start of its message, in our words: its other messages quote the
# client's bytes (an illegal header line, a chunk header), which an answer does not echo
H11_REASONS = {
    "conflicting Content-Length headers": "Content-Length given with differing values",
    "bad Content-Length": "Content-Length is not a length",
    "Missing mandatory Host: header": "Host missing",
    "Found multiple Host: headers": "Host given more than once",
    "Only Transfer-Encoding: chunked is supported": "a Transfer-Encoding other than chunked",
    "multiple Transfer-Encoding headers": "Transfer-Encoding given more than once",
    "Receive buffer too long": "the request head is too long",
    "illegal chunk header": "a chunk size is not a hexadecimal length",
    "malformed chunk footer": "a chunk does not end where its size says",
}


class Malformed:
    """Whether the server's HTTP parser refused a request: `error`, its answer, once it has (None until then)."""

    def __init__(self, error: ApiError | None = None) -> None:
        self.error = error

    def checked(self, receive: Receive) -> Receive:
        """`receive`, raising `error` once the parser has refused the body being received."""

        async def receive_or_refuse() -> Message:
            message = await receive()
            if self.error is not None:
                raise self.error
            return message

        return receive_or_refuse


def malformed_request(h11_reason: str, in_body: bool) -> ApiError:
    """The answer to a request whose head (or, `in_body`, chunked body) h11 refused for `h11_reason` (its
    message): 400/6003, the connection closed after it."""
    detail = next((words for start, words in H11_REASONS.items() if h11_reason.startswith(start)),
                  "the chunked body is malformed" if in_body else "the request line or a header line is malformed")
    return ApiError(MALFORMED_BODY if in_body else AMBIGUOUS_LENGTH, headers=CLOSE, detail=detail)


class AmbiguousLengthMiddleware:
    """Refuses a request whose body length is ambiguous, or that the server's HTTP parser refused, before anything
    reads its body, and has its connection closed after the answer; the body of a request the parser refuses
    while it is being received is refused by the route's next `receive`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        malformed: Malformed | None = scope.get(MALFORMED_SCOPE_KEY)
        err = malformed.error if malformed is not None else None
        if err is None and (reason := _ambiguous_length(scope["headers"])) is not None:
            err = ApiError(AMBIGUOUS_LENGTH, headers=CLOSE, detail=reason)
        if err is not None:
            await error_response(scope["path"], err)(scope, receive, send)
        elif malformed is not None:
            await self.app(scope, malformed.checked(receive), send)
        else:  # served by another server than `int8serve serve`'s (tests' ASGI clients)
            await self.app(scope, receive, send)


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
