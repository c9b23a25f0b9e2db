"""Every error the HTTP API can answer, as one table, and the Cloudflare v4 envelope they travel in.

Clients of Workers AI branch on the HTTP status (the `cloudflare` SDK picks its exception class from it and never
reads `success`) and show `errors[0].code` / `.message` to people, so both must be exactly Cloudflare's (its
documented error tables and what its SDKs expect; `docs/architecture.md`). Keeping them in one table means a route
raises `ApiError(BAD_INPUT, ...)` and cannot get a status, a code or a wording wrong.

Envelope: `{"success": false, "errors": [{"code", "message"}], "messages": [], "result": ...}` where `result` is
`{}` for Workers AI errors (the AI service's own answers) and `null` for generic API errors (auth, routing), as in
captures of real answers. Successful answers use `success_body`.

Codes Cloudflare does not document (marked "ours" below) were chosen so that they never collide with a documented
Workers AI code: 1001 for a malformed query parameter, 1002 for usage data that cannot be read right now, 3043 for
an internal error. 503 answers (a server that is shutting down, `/readyz` while not ready) reuse 3040 ("try
again"), with a `Retry-After` header like the 429s. The server's own capacity (a connection beyond its limit while
every other one has a request in progress, no file descriptor left for the worker process) is Workers AI's capacity
refusal, 429/3040 with `Retry-After`: the answer its clients retry (the SDKs' `RateLimitError`).

The OpenAI routes answer the same errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`),
with the Workers AI code and, where OpenAI's clients branch on something else, OpenAI's status (`OPENAI_STATUS`) or
OpenAI's whole answer (`ErrorKind.openai`): a context overflow is OpenAI's 400 `context_length_exceeded` there,
the only form in which LangChain and LiteLLM recognise it (and fall back to a model with a larger window).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

__all__ = [
    "ACCOUNT_LIMITED",
    "AMBIGUOUS_LENGTH",
    "AUTHENTICATION",
    "BAD_INPUT",
    "BAD_QUERY",
    "CAPACITY",
    "CONTEXT_WINDOW",
    "CONTEXT_WINDOW_PROMPT",
    "FORBIDDEN",
    "INCOMPLETE_REQUEST",
    "INTERNAL",
    "INVALID_HEADERS",
    "LORA_UNSUPPORTED",
    "MALFORMED_BODY",
    "MISSING_AUTH",
    "NOT_READY",
    "NO_ROUTE",
    "NO_SUCH_MODEL",
    "RATE_LIMITED",
    "REQUEST_ABORTED",
    "REQUEST_TIMEOUT",
    "REQUEST_TOO_LARGE",
    "SHUTTING_DOWN",
    "USAGE_UNAVAILABLE",
    "ApiError",
    "ErrorKind",
    "OpenAIForm",
    "answered_status",
    "error_body",
    "error_response",
    "handle_error",
    "install_error_handlers",
    "internal_error_response",
    "is_openai_path",
    "json_response",
    "openai_error",
    "openai_error_response",
    "success_body",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenAIForm:
    """An error as OpenAI itself answers it, for the OpenAI routes; `template` is formatted as `ErrorKind`'s."""

    status: int
    code: str
    template: str


@dataclass(frozen=True)
class ErrorKind:
    """One row of the error table. `template` is formatted with the keyword arguments given to `ApiError`."""

    status: int
    code: int
    template: str
    ai: bool  # True: a Workers AI error (`result: {}`); False: a generic API error (`result: null`)
    openai: OpenAIForm | None = None  # OpenAI's own answer on the OpenAI routes (None: this row, OPENAI_STATUS)


# --- the table -------------------------------------------------------------------------------------------------
# Workers AI's own errors (its documented table)
BAD_INPUT = ErrorKind(400, 5006, "AiError: Bad input: Error: {detail}", ai=True)
NO_SUCH_MODEL = ErrorKind(400, 5007, "No such model {model} or task{note}", ai=True)
INCOMPLETE_REQUEST = ErrorKind(400, 3003, "Request is missing headers or body: {what}", ai=True)
LORA_UNSUPPORTED = ErrorKind(405, 5005, "The model {model} does not support LoRa inference", ai=True)
REQUEST_TOO_LARGE = ErrorKind(413, 3006, "Request is too large", ai=True)
# prompt + max_tokens beyond the window; fields: tokens, limit, prompt_tokens, max_tokens, param ("messages" or
# "prompt": the body's form, OpenAI's `param`)
_CONTEXT_WINDOW_TEMPLATE = ("AiError: Ai: The estimated number of input and maximum output tokens ({tokens}) exceeded "
                            "this model context window limit ({limit}).")
CONTEXT_WINDOW = ErrorKind(
    413, 5021, _CONTEXT_WINDOW_TEMPLATE, ai=True,
    openai=OpenAIForm(400, "context_length_exceeded",
                      "This model's maximum context length is {limit} tokens. However, you requested {tokens} tokens "
                      "({prompt_tokens} in the {param}, {max_tokens} in the completion). Please reduce the length "
                      "of the {param} or completion."),
)
# the prompt alone leaves no room for a reply, where max_tokens was not given (the OpenAI routes: there the reply
# gets the room the prompt leaves); the same fields, `tokens` being the prompt and a one-token reply
CONTEXT_WINDOW_PROMPT = ErrorKind(
    413, 5021, _CONTEXT_WINDOW_TEMPLATE, ai=True,
    openai=OpenAIForm(400, "context_length_exceeded",
                      "This model's maximum context length is {limit} tokens. However, your {param} resulted in "
                      "{prompt_tokens} tokens, which leaves no room for the completion. Please reduce the length of "
                      "the {param}."),
)
REQUEST_TIMEOUT = ErrorKind(408, 3007, "Request timeout", ai=True)  # the body did not arrive in time
REQUEST_ABORTED = ErrorKind(408, 3008, "Request was aborted", ai=True)
# a full engine queue, an account over its share of it, and the server's own capacity: every connection has a
# request in progress (`connections.py`), or no file descriptor is left for the work (`workers.py`)
CAPACITY = ErrorKind(429, 3040, "Capacity temporarily exceeded, please try again.", ai=True)
# the per-account, per-model requests-per-minute limit (the code and words Workers AI answers with)
RATE_LIMITED = ErrorKind(429, 3021, "rate limiting: inference request per min rate reached", ai=True)
# the daily neuron allocation; `allocation` is "10,000" for Workers AI's exact words
ACCOUNT_LIMITED = ErrorKind(
    429, 3036,
    "You have used up your daily free allocation of {allocation} neurons. Please upgrade to Cloudflare's Workers "
    "Paid plan if you would like to continue usage.",
    ai=True,
)
INTERNAL = ErrorKind(500, 3043, "Internal server error", ai=True)  # ours: no public code for this
# the generic Cloudflare API (auth, routing)
MISSING_AUTH = ErrorKind(400, 9106, "Missing X-Auth-Key, X-Auth-Email or Authorization headers", ai=False)
INVALID_HEADERS = ErrorKind(400, 6003, "Invalid request headers", ai=False)  # + error_chain naming the header
# a request whose headers do not settle its body's length (RFC 9112 section 6.3), refused before any route reads it
# (`framing.py`), and a request head the server's HTTP parser cannot read (`connections.py`): OpenAI's clients get
# a 400 too (6003 is their 401 for a malformed Authorization header)
AMBIGUOUS_LENGTH = ErrorKind(400, 6003, "Invalid request headers: {detail}", ai=False,
                             openai=OpenAIForm(400, "invalid_request_headers", "Invalid request headers: {detail}"))
# a chunked body the server's HTTP parser cannot read (an invalid chunk size), answered as a malformed head is
MALFORMED_BODY = ErrorKind(400, 6003, "Invalid request body: {detail}", ai=False,
                           openai=OpenAIForm(400, "invalid_request_body", "Invalid request body: {detail}"))
AUTHENTICATION = ErrorKind(401, 10000, "Authentication error", ai=False)
FORBIDDEN = ErrorKind(403, 10000, "Authentication error", ai=False)
NO_ROUTE = ErrorKind(404, 7000, "No route for that URI", ai=False)
BAD_QUERY = ErrorKind(400, 1001, "Invalid query parameter '{name}': {problem}", ai=False)  # ours
NOT_READY = ErrorKind(503, 3040, "Not ready: {reason}", ai=False)
# a request the shutdown ends without an answer (cut at the drain's end, before or in the engine): the drain's own
# refusal of new requests (NOT_READY, `lifecycle.py`), never "capacity", so that a client retries elsewhere and knows
# why
SHUTTING_DOWN = ErrorKind(503, 3040, "Not ready: the server is shutting down", ai=False)
USAGE_UNAVAILABLE = ErrorKind(503, 1002, "Usage data is temporarily unavailable, please try again.", ai=False)  # ours

# the `error_chain` entries of INVALID_HEADERS, by offending header
CHAIN_AUTHORIZATION = {"code": 6111, "message": "Invalid format for Authorization header"}
CHAIN_AUTH_EMAIL = {"code": 6102, "message": "Invalid format for X-Auth-Email header"}
CHAIN_AUTH_KEY = {"code": 6103, "message": "Invalid format for X-Auth-Key header"}


class ApiError(Exception):
    """An error answer: `raise ApiError(BAD_INPUT, detail="...")` anywhere below a route."""

    def __init__(self, kind: ErrorKind, *, headers: Mapping[str, str] | None = None,
                 error_chain: Sequence[Mapping[str, Any]] | None = None, **fields: Any) -> None:
        self.kind = kind
        self.status = kind.status
        self.code = kind.code
        self.message = kind.template.format(**fields)
        self.headers = dict(headers or {})
        self.error_chain = [dict(e) for e in error_chain] if error_chain else None
        self.fields = fields
        super().__init__(f"{self.status} {self.code}: {self.message}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: raised in the request worker process (workers.py)
        return _rebuild, (self.kind, self.headers, self.error_chain, self.fields, self.status, self.code,
                          self.message)

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, ai=self.kind.ai, error_chain=self.error_chain)

    def response(self) -> Response:
        return json_response(self.body(), status=self.status, headers=self.headers)


def _rebuild(kind: ErrorKind, headers: dict[str, str], error_chain: list[dict[str, Any]] | None,
             fields: dict[str, Any], status: int, code: int, message: str) -> ApiError:
    err = ApiError(kind, headers=headers, error_chain=error_chain, **fields)
    err.status, err.code, err.message = status, code, message
    return err


def error_body(code: int, message: str, *, ai: bool, error_chain: Sequence[Mapping[str, Any]] | None = None
               ) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if error_chain:
        error["error_chain"] = [dict(e) for e in error_chain]
    return {"success": False, "errors": [error], "messages": [], "result": {} if ai else None}


def success_body(result: Any, result_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"result": result, "success": True, "errors": [], "messages": []}
    if result_info is not None:
        body["result_info"] = dict(result_info)
    return body


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """Compact UTF-8 JSON with `Content-Type: application/json` exactly (no charset parameter)."""
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return Response(content=content, status_code=status, headers=dict(headers or {}), media_type="application/json")


# --- the OpenAI shape (routes under /v1/ and /ai/v1/: routes/openai.py) -----------------------------------------

# OpenAI's statuses where they differ from /ai/run's: an unknown model is 404; missing credentials and a malformed
# Authorization header (`OpenAI(api_key="tok A")`) are an invalid API key, 401 (Cloudflare's API answers 400 for both)
OPENAI_STATUS = {5007: 404, 9106: 401, 6003: 401}
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                503: "service_unavailable_error"}


def is_openai_path(path: str) -> bool:
    """The OpenAI-compatible routes, whose clients (the openai SDK) parse `{"error": {...}}` bodies."""
    if path.startswith("/v1/") or path == "/v1":
        return True
    parts = path.split("/")  # /client/v4/accounts/{account}/ai/v1/...
    return len(parts) >= 7 and parts[1:4] == ["client", "v4", "accounts"] and parts[5:7] == ["ai", "v1"]


def openai_error(code: int | str, message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; `param` names the request's field at fault (the SDK's `e.param`)."""
    kind = "capacity_error" if code == 3040 else OPENAI_TYPES.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _openai_answer(err: ApiError) -> tuple[int, int | str, str]:
    """The status, code and message of `err` on the OpenAI routes."""
    form = err.kind.openai
    if form is not None:
        return form.status, form.code, form.template.format(**err.fields)
    message = err.message
    if err.error_chain:  # OpenAI's shape has no chain: its reasons join the message ("...: Invalid format for ...")
        message += ": " + "; ".join(str(link.get("message")) for link in err.error_chain)
    return OPENAI_STATUS.get(err.code, err.status), err.code, message


def openai_error_response(err: ApiError) -> Response:
    status, code, message = _openai_answer(err)
    return json_response(openai_error(code, message, status, err.fields.get("param")), status=status,
                         headers=err.headers)


def answered_status(path: str, err: ApiError) -> int:
    """The HTTP status `err` is answered with on `path`."""
    return _openai_answer(err)[0] if is_openai_path(path) else err.status


def error_response(path: str, err: ApiError) -> Response:
    """`err` in the shape the clients of `path` parse."""
    return openai_error_response(err) if is_openai_path(path) else err.response()


# --- the one handler -------------------------------------------------------------------------------------------


def as_api_error(request: Request, exc: Exception) -> ApiError:
    """Any error a route or the framework raises, as an `ApiError` of the table."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):  # typed path and query parameters (routes/*.py)
        first = exc.errors()[0] if exc.errors() else {}
        name = str(first.get("loc", ("", "?"))[-1])
        return ApiError(BAD_QUERY, name=name, problem=first.get("msg", "invalid"))
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code in (404, 405):
        err = ApiError(NO_ROUTE, headers=headers)
        if is_openai_path(request.url.path):  # OpenAI's clients get a sentence about their own mistake
            err.message = "Unknown URL: no such route" if exc.status_code == 404 else \
                f"Method {request.method} not allowed here"
        err.status = exc.status_code
        return err
    err = ApiError(INTERNAL, headers=headers)
    err.status, err.code, err.message = exc.status_code, exc.status_code, str(exc.detail)
    return err


async def handle_error(request: Request, exc: Exception) -> Response:
    """The app's one exception handler: the error in the envelope the route's clients parse."""
    return error_response(request.url.path, as_api_error(request, exc))


def install_error_handlers(app: FastAPI) -> None:
    """`handle_error` for ApiError, Starlette's HTTP errors (404, 405) and typed parameters that do not validate.

    Unexpected exceptions are turned into a 500 envelope by `RequestContextMiddleware` (in `app.py`), which sees
    them before Starlette's outermost error middleware and can therefore still add the request id header.
    """
    for kind in (ApiError, StarletteHTTPException, RequestValidationError):
        app.add_exception_handler(kind, handle_error)


def internal_error_response(headers: Mapping[str, str] | None = None) -> Response:
    return json_response(error_body(INTERNAL.code, INTERNAL.template, ai=True), status=500, headers=headers)
