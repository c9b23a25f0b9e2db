"""Requests framed as RFC 9112 allows but h11 and uvicorn leave to the application, on raw sockets against a live
server: a body length the headers do not settle (refused, the connection closed), requests h11 refuses itself
(answered as those are) and absolute-form targets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import pytest
from fastapi import FastAPI

from int8serve.service.app import REQUEST_ID_HEADER
from int8serve.service.framing import AmbiguousLengthMiddleware
from int8serve.service.request_log import REQUEST_LOGGER

from .conftest import ACCOUNT, MODEL, OTHER_ACCOUNT, OTHER_TOKEN, TOKEN, LiveServer

RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
RUN_ROUTE = "/client/v4/accounts/{account_id}/ai/run/{model:path}"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"
SMUGGLED = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def exchange(server: LiveServer, request: str, timeout: float = 5.0) -> bytes:
    """Everything the server sends back on one connection for `request` (bytes as sent), until it closes it; fails
    if it keeps the connection open `timeout` seconds after its last byte."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(timeout)
        sock.sendall(request.encode())
        received = b""
        while chunk := sock.recv(65536):  # socket.timeout: the server kept the connection open
            received += chunk
        return received


def answers(received: bytes) -> list[tuple[int, dict[str, str], Any]]:
    """The HTTP/1.1 answers in `received`: status, headers (lower-case names), body (parsed if JSON; each has a
    length)."""
    out = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        length = int(headers["content-length"])
        body = json.loads(rest[:length]) if headers["content-type"] == "application/json" else rest[:length]
        out.append((int(status_line.split()[1]), headers, body))
        received = rest[length:]
    return out


@pytest.mark.parametrize("path", [RUN, "/v1/chat/completions"], ids=["run", "openai"])
def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(
        server: LiveServer, path: str, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an audit: a request with both headers (h11 reads its body as chunked) got 400/3003 and the
    connection stayed open, so the `GET /healthz` after its empty chunked body was answered too — inside the body
    for a proxy that goes by Content-Length: a request the proxy never saw. RFC 9112 section 6.3: the server must
    close the connection. Now the request is refused in the API's envelope, counted and logged, and nothing after
    it is answered."""
    caplog.set_level("INFO", logger=REQUEST_LOGGER)
    body = f"0\r\n\r\n{SMUGGLED}"  # by Content-Length, one body; by Transfer-Encoding, an empty one and a request
    received = exchange(server, f"POST {path} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: application/json\r\n"
                                f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n{body}")
    [(status, headers, body)] = answers(received)  # one answer, then the end of the connection
    assert (status, headers["connection"]) == (400, "close") and headers[REQUEST_ID_HEADER]
    reason = "Invalid request headers: Content-Length and Transfer-Encoding given together"
    if path == RUN:
        assert body == {"success": False, "errors": [{"code": 6003, "message": reason}], "messages": [],
                        "result": None}
    else:  # OpenAI's shape, and its 400 (6003 is OpenAI's 401 for a malformed Authorization header)
        assert body["error"]["message"] == reason and body["error"]["type"] == "invalid_request_error"
    lines = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id")  # type: ignore[attr-defined]
             == headers[REQUEST_ID_HEADER]]
    assert [(f["status"], f["outcome"]) for f in lines] == [(400, "rejected")]


def test_a_body_framed_once_keeps_its_connection(server: LiveServer) -> None:
    """A chunked body alone, and the request after it on the connection, are answered as before."""
    received = exchange(server, f"POST {RUN} HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\n"
                                f"2\r\n{{}}\r\n0\r\n\r\n{SMUGGLED}")
    assert [(status, headers.get("connection")) for status, headers, _ in answers(received)] == [
        (400, None), (200, "close")]  # `{}` has no prompt; the next request is answered on the same connection


@pytest.mark.parametrize("headers", [
    [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
    [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")],
])
def test_every_ambiguous_length_is_refused_before_the_app(headers: list[tuple[bytes, bytes]]) -> None:
    """Transfer-Encoding twice never reaches the app through h11 (it refuses the request itself), but would
    through another HTTP implementation: the middleware refuses it too, without calling the app or reading."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app was called")

    async def receive() -> Any:
        raise AssertionError("the body was read")

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": RUN, "headers": [(b"host", b"x"), *headers]}
    asyncio.run(AmbiguousLengthMiddleware(app)(scope, receive, send))
    assert sent[0]["status"] == 400 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["errors"][0]["code"] == 6003


def request_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records  # type: ignore[attr-defined]
            if getattr(r, "fields", {}).get("request_id") == request_id]


def answered(app: FastAPI, route: str, status: int) -> float:
    """How many answers of `status` the metrics counted for `route`."""
    registry = app.state.services.metrics.registry
    return registry.get_sample_value("int8serve_http_requests_total", {"route": route, "status": str(status)}) or 0.0


def assert_refused(received: bytes, reason: str, openai: bool) -> str:
    """`received` is one 400/6003 for `reason` in the envelope of Workers AI (or OpenAI), with `Connection: close`
    and a request id, and the end of the connection; the request id."""
    [(status, headers, body)] = answers(received)
    assert (status, headers["connection"]) == (400, "close") and headers[REQUEST_ID_HEADER]
    if openai:
        assert body["error"]["message"] == reason and body["error"]["type"] == "invalid_request_error"
    else:
        assert body == {"success": False, "errors": [{"code": 6003, "message": reason}], "messages": [],
                        "result": None}
    return headers[REQUEST_ID_HEADER]


@pytest.mark.parametrize("path", [RUN, "/v1/chat/completions"], ids=["run", "openai"])
def test_differing_content_lengths_are_answered_in_the_envelope(
        app: FastAPI, server: LiveServer, path: str, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an audit: a request h11 refuses itself (two differing Content-Lengths; likewise one of -1 or 400
    digits, a Transfer-Encoding other than chunked, two Hosts, a header line too long) was answered by uvicorn's
    plain-text 400, outside the app: no envelope, no request id, no log line, not counted. Now it is answered as
    the ambiguous lengths are: 400/6003 in the envelope of the route it names, counted and logged."""
    caplog.set_level("INFO", logger=REQUEST_LOGGER)
    route = RUN_ROUTE if path == RUN else path
    before = answered(app, route, 400)
    received = exchange(server, f"POST {path} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 2\r\n"
                                f"Content-Length: 3\r\n\r\n{{}}{SMUGGLED}")
    request_id = assert_refused(received, "Invalid request headers: Content-Length given with differing values",
                                openai=path != RUN)
    assert [(f["status"], f["error_code"], f["outcome"]) for f in request_lines(caplog, request_id)] == [
        (400, 6003 if path == RUN else "invalid_request_headers", "rejected")]
    assert answered(app, route, 400) == before + 1


def test_a_bad_chunk_size_in_a_body_being_read_is_400_not_aborted(
        app: FastAPI, server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an audit: a chunk size that is not one (`zz`, `-5`, 400 hex digits), sent while the route read
    the body, got uvicorn's plain-text 400, and the route, which saw its client leave, logged and counted the
    request as 408/3008 `aborted`. Now the route's read ends in 400/6003: its answer, log line and count."""
    caplog.set_level("INFO", logger=REQUEST_LOGGER)
    before = {status: answered(app, RUN_ROUTE, status) for status in (400, 408)}
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(5)
        sock.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\n"
                     f"2\r\n{{\"\r\n".encode())
        time.sleep(0.3)  # the route is reading the body
        sock.sendall(b"zz\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    request_id = assert_refused(received, "Invalid request body: a chunk size is not a hexadecimal length",
                                openai=False)
    [line] = request_lines(caplog, request_id)
    assert (line["status"], line["error_code"], line["outcome"], line["model"]) == (400, 6003, "rejected", MODEL)
    assert {status: answered(app, RUN_ROUTE, status) - before[status] for status in (400, 408)} == {400: 1, 408: 0}


def test_http_1_1_without_host_is_answered_in_the_openai_envelope(
        app: FastAPI, server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an audit: HTTP/1.1 without Host (and Host twice) was uvicorn's plain-text 400. Now it is the
    envelope of the route its target names, counted under that route and logged."""
    caplog.set_level("INFO", logger=REQUEST_LOGGER)
    before = answered(app, "/v1/models", 400)
    received = exchange(server, f"GET /v1/models HTTP/1.1\r\n{AUTH}\r\n")
    request_id = assert_refused(received, "Invalid request headers: Host missing", openai=True)
    assert [(f["status"], f["route"]) for f in request_lines(caplog, request_id)] == [(400, "/v1/models")]
    assert answered(app, "/v1/models", 400) == before + 1


def request(method: str, target: str, token: str | None = TOKEN, body: dict[str, Any] | None = None) -> str:
    """One request on a connection the server closes after it."""
    payload = json.dumps(body) if body is not None else ""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"{method} {target} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(payload)}\r\n"
            f"Connection: close\r\n\r\n{payload}")


def answer(server: LiveServer, method: str, target: str, **options: Any) -> tuple[int, Any]:
    [(status, _, body)] = answers(exchange(server, request(method, target, **options)))
    return status, body


@pytest.mark.parametrize("origin", ["http://evil.example", "HTTPS://127.0.0.1:1", "http://"])
def test_an_absolute_form_target_is_routed_by_its_path(server: LiveServer, origin: str) -> None:
    """Found by an audit: `GET http://evil.example/healthz HTTP/1.1` (what a client sends to a proxy) was 404/7000:
    uvicorn leaves the whole URL in the path. RFC 9112 section 3.2.2: a server must accept the absolute form. Now
    it is routed by its path, with its query string, and the host in it changes nothing."""
    assert answer(server, "GET", f"{origin}/healthz") == (200, {"status": "ok"})
    status, body = answer(server, "POST", f"{origin}{RUN}", body={"prompt": "Once upon a time", "max_tokens": 2})
    assert status == 200 and body["success"] is True and body["result"]["usage"]["completion_tokens"] == 2
    status, body = answer(server, "GET", f"{origin}/client/v4/accounts?page=2&per_page=5")
    assert status == 200 and body["result_info"]["page"] == 2 and body["result_info"]["per_page"] == 5
    assert answer(server, "GET", origin) == answer(server, "GET", "/")  # the playground page


@pytest.mark.parametrize(("target", "token"), [
    (f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", OTHER_TOKEN),  # another account's token
    (f"/client/v4/accounts/{OTHER_ACCOUNT}/ai/run/{MODEL}", TOKEN),
    (f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", None),
    (f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", "not-a-known-token"),
])
def test_an_absolute_form_target_is_refused_as_its_path_is(server: LiveServer, target: str, token: str | None
                                                           ) -> None:
    """Authentication and account isolation are the path's: an absolute-form target gets the same refusal."""
    body = {"prompt": "Once upon a time", "max_tokens": 2}
    refused = answer(server, "POST", target, token=token, body=body)
    assert refused[0] in (400, 401, 403)
    assert answer(server, "POST", f"http://evil.example{target}", token=token, body=body) == refused


def test_a_refusal_falls_back_to_uvicorns_answer_if_its_internals_moved(
        server: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The envelope for a request h11 refuses leans on uvicorn's request cycle: should another uvicorn version have
    changed it, the client still gets uvicorn's own 400 (never a dropped connection), and a warning says why."""
    from int8serve.service import connections

    def moved(*args: object, **kwargs: object) -> None:
        raise TypeError("RequestResponseCycle() got an unexpected keyword argument 'flow'")

    monkeypatch.setattr(connections, "RequestResponseCycle", moved)
    received = exchange(server, "GET /v1/models HTTP/1.1\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400 ") and b"Invalid HTTP request received." in received
    assert any("uvicorn's plain text" in r.getMessage() and "unexpected keyword argument" in r.getMessage()
               for r in caplog.records)


def test_uvicorns_warning_for_a_refused_request_is_not_logged(server: LiveServer) -> None:
    """uvicorn logged `Invalid HTTP request received.` for each request its parser refused, beside the app's own
    request line for it: a second line per request a client can send by the thousand. Only the request line stays."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addHandler(handler)
    try:
        received = exchange(server, "GET /v1/models HTTP/1.1\r\n\r\n")
    finally:
        uvicorn_errors.removeHandler(handler)
    assert received.startswith(b"HTTP/1.1 400 ")
    assert "Invalid HTTP request received." not in seen
