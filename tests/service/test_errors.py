"""Every error: non-2xx, the Cloudflare envelope, the contract's codes and words, and the SDK's matching exception."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import cloudflare
import httpx
import pytest
from cloudflare import Cloudflare

from int8serve.engine.scheduler import Engine, EngineStoppedError

from .conftest import ACCOUNT, MODEL, OTHER_TOKEN, SLOW_MODEL, TOKEN, UNSERVED_MODEL, wait_for

BAD_INPUT = "AiError: Bad input: Error: "
NEITHER = ("oneOf at '/' not met, 0 matches: required properties at '/' are 'prompt', "
           "required properties at '/' are 'messages'")
SLOW_URL = f"/client/v4/accounts/{ACCOUNT}/ai/run/{SLOW_MODEL}"


def assert_error(resp: httpx.Response, status: int, code: int, message: str | None = None, *,
                 ai: bool = True) -> dict[str, Any]:
    """The answer is `status` with the exact envelope; returns the error object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    uuid.UUID(resp.headers["cf-ai-req-id"])
    body = resp.json()
    assert list(body) == ["success", "errors", "messages", "result"]
    assert body["success"] is False and body["messages"] == []
    assert body["result"] == ({} if ai else None)
    (error,) = body["errors"]
    assert error["code"] == code and isinstance(error["code"], int)
    if message is not None:
        assert error["message"] == message
    return error


def sdk_error(exc_type: type[cloudflare.APIStatusError], call: Any, status: int, code: int) -> dict[str, Any]:
    with pytest.raises(exc_type) as info:
        call()
    assert type(info.value) is exc_type  # the SDK's class for that status (APIStatusError itself for 405/413)
    assert info.value.status_code == status
    body = info.value.body
    assert isinstance(body, dict) and body["success"] is False
    assert body["errors"][0]["code"] == code
    return body["errors"][0]


# --- auth -------------------------------------------------------------------------------------------------------


def test_missing_auth(http: httpx.Client, run_url: str) -> None:
    resp = http.post(run_url, json={"prompt": "hi"})
    assert_error(resp, 400, 9106, "Missing X-Auth-Key, X-Auth-Email or Authorization headers", ai=False)


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", f"Bearer{TOKEN}", f"Bearer {TOKEN} extra", TOKEN,
                                    "Bearer\ttab"])
def test_malformed_authorization(http: httpx.Client, run_url: str, header: str) -> None:
    resp = http.post(run_url, headers={"Authorization": header}, json={"prompt": "hi"})
    error = assert_error(resp, 400, 6003, "Invalid request headers", ai=False)
    assert error["error_chain"] == [{"code": 6111, "message": "Invalid format for Authorization header"}]


def test_bad_token_is_401_through_the_sdk(base_url: str) -> None:
    client = Cloudflare(api_token="not-a-token", base_url=f"{base_url}/client/v4", max_retries=0)
    error = sdk_error(cloudflare.AuthenticationError,
                      lambda: client.ai.run(MODEL, account_id=ACCOUNT, prompt="hi"), 401, 10000)
    assert error["message"] == "Authentication error"


def test_token_of_another_account_is_403(base_url: str, sdk: Cloudflare) -> None:
    other = Cloudflare(api_token=OTHER_TOKEN, base_url=f"{base_url}/client/v4", max_retries=0)
    sdk_error(cloudflare.PermissionDeniedError, lambda: other.ai.run(MODEL, account_id=ACCOUNT, prompt="hi"),
              403, 10000)
    sdk_error(cloudflare.PermissionDeniedError, lambda: other.ai.models.schema.get(account_id=ACCOUNT, model=MODEL),
              403, 10000)
    sdk_error(cloudflare.PermissionDeniedError, lambda: sdk.ai.models.list(account_id="someone-else").result,
              403, 10000)


def test_x_auth_email_and_key_through_the_sdk(base_url: str) -> None:
    """With email + key (+ token) the SDK sends only X-Auth-Email and X-Auth-Key."""
    client = Cloudflare(api_email="me@example.com", api_key=TOKEN, api_token="ignored",
                        base_url=f"{base_url}/client/v4", max_retries=0)
    out = client.ai.run(MODEL, account_id=ACCOUNT, prompt="Once", raw=True, max_tokens=3)
    assert out["usage"]["completion_tokens"] >= 1
    wrong = Cloudflare(api_email="me@example.com", api_key="wrong-key", base_url=f"{base_url}/client/v4",
                       max_retries=0)
    sdk_error(cloudflare.AuthenticationError, lambda: wrong.ai.run(MODEL, account_id=ACCOUNT, prompt="hi"),
              401, 10000)


def test_x_auth_key_needs_its_email(http: httpx.Client, run_url: str) -> None:
    error = assert_error(http.post(run_url, headers={"X-Auth-Key": TOKEN}, json={"prompt": "hi"}), 400, 6003,
                         ai=False)
    assert error["error_chain"] == [{"code": 6102, "message": "Invalid format for X-Auth-Email header"}]
    error = assert_error(http.post(run_url, headers={"X-Auth-Email": "me@example.com"}, json={"prompt": "hi"}),
                         400, 6003, ai=False)
    assert error["error_chain"] == [{"code": 6103, "message": "Invalid format for X-Auth-Key header"}]


def test_auth_comes_before_everything_else(http: httpx.Client) -> None:
    resp = http.post(f"/client/v4/accounts/{ACCOUNT}/ai/run/@cf/nope/nothing", content=b"")
    assert_error(resp, 400, 9106, ai=False)


# --- bad input --------------------------------------------------------------------------------------------------


def test_neither_prompt_nor_messages_has_the_contract_wording(sdk: Cloudflare) -> None:
    error = sdk_error(cloudflare.BadRequestError, lambda: sdk.ai.run(MODEL, account_id=ACCOUNT, max_tokens=5),
                      400, 5006)
    assert error["message"] == BAD_INPUT + NEITHER


@pytest.mark.parametrize(("body", "detail"), [
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "oneOf at '/' not met, 2 matches"),
    ({"prompt": "x" * 4097}, "oneOf at '/' not met, 0 matches: String at '/prompt' is longer than 4096 characters "
                             "(4097), required properties at '/' are 'messages'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "oneOf at '/' not met, 0 matches: required properties at '/' are 'prompt', "
     "Type mismatch of '/messages/0/content', 'string' not in 'array'"),
    ({"prompt": "hi", "max_tokens": "10"},
     "oneOf at '/' not met, 0 matches: Type mismatch of '/max_tokens', 'integer' not in 'string', "
     "required properties at '/' are 'messages'"),
    ([1, 2], "Type mismatch of '/', 'object' not in 'array'"),
    ({"prompt": ""}, "String at '/prompt' is shorter than 1 characters (0)"),
    ({"prompt": "hi", "max_tokens": 1801},
     "Value at '/max_tokens' must be at most 1800 (this model's sequence length limit), got 1801"),
    ({"prompt": "hi", "max_tokens": 0}, "Value at '/max_tokens' must be at least 1, got 0"),
    ({"prompt": "hi", "temperature": 5.1}, "Value at '/temperature' must be between 0 and 5, got 5.1"),
    ({"prompt": "hi", "temperature": "hot"}, "Type mismatch of '/temperature', 'number' not in 'string'"),
    ({"prompt": "hi", "top_p": 0}, "Value at '/top_p' must be between 0.001 and 1, got 0"),
    ({"prompt": "hi", "top_k": 51}, "Value at '/top_k' must be between 1 and 50, got 51"),
    ({"prompt": "hi", "top_k": 2.5}, "Type mismatch of '/top_k', 'integer' not in 'number'"),
    ({"prompt": "hi", "seed": 0}, "Value at '/seed' must be between 1 and 9999999999, got 0"),
    ({"prompt": "hi", "seed": 10_000_000_000}, "Value at '/seed' must be between 1 and 9999999999, got 10000000000"),
    ({"prompt": "hi", "repetition_penalty": 2.5}, "Value at '/repetition_penalty' must be between 0 and 2, got 2.5"),
    ({"prompt": "hi", "frequency_penalty": -3}, "Value at '/frequency_penalty' must be between -2 and 2, got -3"),
    ({"prompt": "hi", "presence_penalty": True}, "Type mismatch of '/presence_penalty', 'number' not in 'boolean'"),
    ({"prompt": "hi", "stream": "yes"},
     "oneOf at '/' not met, 0 matches: Type mismatch of '/stream', 'boolean' not in 'string', "
     "required properties at '/' are 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}], "raw": "no"},
     "Type mismatch of '/raw', 'boolean' not in 'string'"),
    ({"prompt": "hi", "options": {"rejectIfBusy": "yes"}},
     "Type mismatch of '/options/rejectIfBusy', 'boolean' not in 'string'"),
    ({"prompt": "hi", "options": []}, "Type mismatch of '/options', 'object' not in 'array'"),
    ({"messages": [{"role": "tool", "content": "x"}]},
     "no message with role 'system', 'user' or 'assistant' at '/messages'"),
    ({"messages": []}, "no message with role 'system', 'user' or 'assistant' at '/messages'"),
    ({"prompt": "hi", "response_format": {"type": "json_object"}},
     "'/response_format' is not supported by the model @cf/meta/llama-2-7b-chat-int8"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f", "description": "d"}]},
     "'/tools' is not supported by the model @cf/meta/llama-2-7b-chat-int8"),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f", "code": "x"}]},
     "'/functions' is not supported by the model @cf/meta/llama-2-7b-chat-int8"),
])
def test_bad_input_is_5006(http: httpx.Client, run_url: str, auth: dict[str, str], body: Any, detail: str) -> None:
    assert_error(http.post(run_url, headers=auth, json=body), 400, 5006, BAD_INPUT + detail)


@pytest.mark.parametrize("content", [b"{", b'{"prompt": NaN}', b'{"prompt": "hi", "seed": Infinity}',
                                     b"prompt=hello", b"\xff\xfe{}", b"[" * 100_000, b'{"prompt": "\\ud800"}',
                                     b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}',
                                     b'{"prompt": "x", "\\udbff": 1}'])
def test_invalid_json_is_5006(http: httpx.Client, run_url: str, auth: dict[str, str], content: bytes) -> None:
    error = assert_error(http.post(run_url, headers=auth, content=content), 400, 5006)
    assert error["message"].startswith(BAD_INPUT + "the request body is not valid ")


@pytest.mark.parametrize("content", [b"", b"  \n"])
def test_empty_body_is_3003(http: httpx.Client, run_url: str, auth: dict[str, str], content: bytes) -> None:
    assert_error(http.post(run_url, headers=auth, content=content), 400, 3003,
                 "Request is missing headers or body: body")


def test_lora_is_405_5005_through_the_sdk(sdk: Cloudflare) -> None:
    error = sdk_error(cloudflare.APIStatusError,
                      lambda: sdk.ai.run(MODEL, account_id=ACCOUNT, prompt="hi", lora="my-finetune"), 405, 5005)
    assert error["message"] == f"The model {MODEL} does not support LoRa inference"


def test_context_window_is_413_5021(sdk: Cloudflare, http: httpx.Client, run_url: str, auth: dict[str, str],
                                    stories_tokenizer: Any) -> None:
    prompt = "Once upon a time there was a dog. " * 40
    n_prompt = len(stories_tokenizer.encode(prompt, bos=True))
    assert 300 < n_prompt < 512
    error = sdk_error(cloudflare.APIStatusError,
                      lambda: sdk.ai.run(MODEL, account_id=ACCOUNT, prompt=prompt, raw=True), 413, 5021)
    assert error["message"] == ("AiError: Ai: The estimated number of input and maximum output tokens "
                                f"({n_prompt + 256}) exceeded this model context window limit (512).")
    fits = {"prompt": prompt, "raw": True, "max_tokens": 512 - n_prompt, "temperature": 0}
    assert http.post(run_url, headers=auth, json=fits).status_code == 200
    resp = http.post(run_url, headers=auth, json={**fits, "max_tokens": 513 - n_prompt})
    assert_error(resp, 413, 5021)


def test_a_4096_character_prompt_passes_the_schema_but_not_the_window(http: httpx.Client, run_url: str,
                                                                       auth: dict[str, str]) -> None:
    error = assert_error(http.post(run_url, headers=auth, json={"prompt": "word " * 819 + "a"}), 413, 5021)
    assert error["message"].endswith("exceeded this model context window limit (512).")


# --- body size --------------------------------------------------------------------------------------------------


def _raw_request(base_url: str, head: str, body: bytes = b"") -> bytes:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_declared_too_large_body_is_refused_before_it_is_sent(base_url: str, run_url: str) -> None:
    answer = _raw_request(base_url, f"POST {run_url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                    "Content-Length: 1000000000\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body)["errors"] == [{"code": 3006, "message": "Request is too large"}]
    assert b"\r\nconnection: close" in head.lower()  # the body is unread: it must not be taken for a request


def test_actual_size_is_checked_for_chunked_bodies(http: httpx.Client, run_url: str, auth: dict[str, str]) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "hi", "pad": "'
        for _ in range(17):
            yield b"x" * 65536
        yield b'"}'

    resp = http.post(run_url, headers=auth, content=chunks())
    assert_error(resp, 413, 3006, "Request is too large")
    assert resp.headers["connection"] == "close"


def test_a_large_body_under_the_limit_is_fine(http: httpx.Client, run_url: str, auth: dict[str, str]) -> None:
    body = {"prompt": "Once", "raw": True, "max_tokens": 2, "pad": "x" * 1_000_000}
    assert http.post(run_url, headers=auth, json=body).status_code == 200


# --- models and routes ------------------------------------------------------------------------------------------


def test_unknown_model_is_5007(sdk: Cloudflare) -> None:
    error = sdk_error(cloudflare.BadRequestError,
                      lambda: sdk.ai.run("@cf/nope/nothing", account_id=ACCOUNT, prompt="hi"), 400, 5007)
    assert error["message"] == "No such model @cf/nope/nothing or task"


def test_card_without_engine_is_5007_not_served(http: httpx.Client, auth: dict[str, str]) -> None:
    resp = http.post(f"/client/v4/accounts/{ACCOUNT}/ai/run/{UNSERVED_MODEL}", headers=auth, json={"prompt": "hi"})
    assert_error(resp, 400, 5007, f"No such model {UNSERVED_MODEL} or task (the model is in the catalog but not "
                                  "served here)")


@pytest.mark.parametrize("path", ["/nothing", "/client/v4/user", f"/client/v4/accounts/{ACCOUNT}/ai/nothing",
                                  f"/client/v4/accounts/{ACCOUNT}/ai/models/search/", "/healthz/x"])
def test_unknown_route_is_404_7000(http: httpx.Client, auth: dict[str, str], path: str) -> None:
    assert_error(http.get(path, headers=auth), 404, 7000, "No route for that URI", ai=False)


def test_wrong_method_is_405_7000(http: httpx.Client, run_url: str, auth: dict[str, str]) -> None:
    resp = http.get(run_url, headers=auth)
    assert_error(resp, 405, 7000, "No route for that URI", ai=False)
    assert resp.headers["allow"] == "POST"
    assert_error(http.post(f"/client/v4/accounts/{ACCOUNT}/ai/models/search", headers=auth), 405, 7000, ai=False)


def test_request_ids_are_fresh_uuid4s(http: httpx.Client, run_url: str, auth: dict[str, str]) -> None:
    answers = [http.post(run_url, headers=auth, json={"prompt": "Once", "raw": True, "max_tokens": 1}),
               http.post(run_url, headers=auth, json={}), http.get("/nowhere"), http.get("/healthz"),
               http.post(run_url, json={})]
    ids = [uuid.UUID(r.headers["cf-ai-req-id"]) for r in answers]
    assert len(set(ids)) == len(ids) and all(i.version == 4 for i in ids)


@pytest.mark.parametrize("body", [None, 1, "x", {"prompt": None}, {"prompt": 5}, {"messages": "x"},
                                  {"messages": [1]}, {"messages": [{"role": 1, "content": "x"}]},
                                  {"messages": [{"role": "user"}]}, {"prompt": "x", "max_tokens": 1e400},
                                  {"prompt": "x", "temperature": -1e400}, {"prompt": "x", "seed": 1.5},
                                  {"prompt": "x", "top_k": True}, {"prompt": "x", "options": {"rejectIfBusy": 1}},
                                  {"prompt": "x", "tools": "all"}, {"prompt": "x", "lora": 3}])
def test_odd_bodies_are_4xx_never_500(http: httpx.Client, run_url: str, auth: dict[str, str], body: Any) -> None:
    content = json.dumps(body).replace("Infinity", "1e400").encode()
    resp = http.post(run_url, headers=auth, content=content)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["success"] is False


# --- capacity ---------------------------------------------------------------------------------------------------


@contextmanager
def occupied(base_url: str, n: int) -> Iterator[None]:
    """`n` long streams sent to the slow engine (1 slot, queue of 1), each on a connection of its own held open
    until exit (then closed: cancelled). Raw connections: a queued stream's 200 comes only with its slot."""
    payload = json.dumps({"prompt": "Once upon a time", "raw": True, "stream": True, "max_tokens": 400}).encode()
    host, port = base_url.removeprefix("http://").split(":")
    with ExitStack() as stack, httpx.Client(base_url=base_url, timeout=30) as http:
        for _ in range(n):
            sock = stack.enter_context(socket.create_connection((host, int(port))))
            sock.sendall(f"POST {SLOW_URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)

        def held() -> int:
            stats = http.get("/readyz").json()["models"][SLOW_MODEL]
            return stats["running"] + stats["waiting"]

        wait_for(lambda: held() == n, f"{n} requests in the slow engine")
        yield


def test_full_queue_is_429_3040_with_retry_after(base_url: str, http: httpx.Client, auth: dict[str, str],
                                                 sdk: Cloudflare, engines: dict[str, Engine]) -> None:
    with occupied(base_url, 2):
        stats = engines[SLOW_MODEL].stats()
        assert stats.running + stats.waiting == 2
        resp = http.post(SLOW_URL, headers=auth, json={"prompt": "hi", "max_tokens": 2})
        assert_error(resp, 429, 3040, "Capacity temporarily exceeded, please try again.")
        assert resp.headers["retry-after"] == "1"
        sdk_error(cloudflare.RateLimitError, lambda: sdk.ai.run(SLOW_MODEL, account_id=ACCOUNT, prompt="hi"),
                  429, 3040)
        with http.stream("POST", SLOW_URL, headers=auth, json={"prompt": "hi", "stream": True}) as streamed:
            assert streamed.status_code == 429  # refused before any SSE byte
            assert streamed.headers["content-type"] == "application/json"
            assert json.loads(streamed.read())["errors"][0]["code"] == 3040


def test_reject_if_busy(base_url: str, sdk: Cloudflare) -> None:
    def busy_call() -> Any:
        return sdk.ai.run(SLOW_MODEL, account_id=ACCOUNT, prompt="Once", raw=True, max_tokens=2,
                          extra_body={"options": {"rejectIfBusy": True}})

    assert busy_call()["usage"]["completion_tokens"] >= 1  # a free slot: served
    with occupied(base_url, 1), pytest.raises(cloudflare.RateLimitError) as info:
        busy_call()
    assert info.value.body["errors"] == [{"code": 3040, "message": "Capacity temporarily exceeded, please try again."}]
    assert info.value.response.headers["retry-after"] == "1"


# --- engine failures --------------------------------------------------------------------------------------------


def test_unexpected_exception_is_a_logged_500_envelope(monkeypatch: pytest.MonkeyPatch, engines: dict[str, Engine],
                                                       sdk: Cloudflare, http: httpx.Client, run_url: str,
                                                       auth: dict[str, str], caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(engines[MODEL], "submit", boom)
    resp = http.post(run_url, headers=auth, json={"prompt": "hi"})
    assert_error(resp, 500, 3043, "Internal server error")
    assert "RuntimeError: boom" in caplog.text
    sdk_error(cloudflare.InternalServerError, lambda: sdk.ai.run(MODEL, account_id=ACCOUNT, prompt="hi"), 500, 3043)
    monkeypatch.undo()
    assert http.post(run_url, headers=auth, json={"prompt": "Once", "raw": True, "max_tokens": 1}).status_code == 200


def test_a_stopped_engine_is_503_shutting_down(monkeypatch: pytest.MonkeyPatch, engines: dict[str, Engine],
                                              http: httpx.Client, run_url: str, auth: dict[str, str]) -> None:
    """An engine stops only when the server shuts down: the answer is the drain's own refusal (it said "Capacity
    temporarily exceeded", which is not why)."""
    def stopped(*args: Any, **kwargs: Any) -> Any:
        raise EngineStoppedError("the engine was stopped")

    monkeypatch.setattr(engines[MODEL], "submit", stopped)
    resp = http.post(run_url, headers=auth, json={"prompt": "hi", "stream": True})
    assert_error(resp, 503, 3040, "Not ready: the server is shutting down", ai=False)
    assert resp.headers["retry-after"] == "1"
