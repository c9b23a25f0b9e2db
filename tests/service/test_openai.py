"""The OpenAI-compatible routes, driven by the official `openai` SDK against the live server (stories260K)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai import OpenAI

from int8serve.catalog.card import builtin_cards, parse_card
from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine
from int8serve.service.app import create_app
from int8serve.service.policy import Policy

from .conftest import ACCOUNT, MODEL, SCRIPTED_MODEL, SLOW_MODEL, TOKEN, TOKENS, UNSERVED_MODEL, LiveServer
from .test_errors import occupied

STORY = "Once upon a time, there was a little"
MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me a story."}]


def _client(base_url: str, token: str = TOKEN, account: str = ACCOUNT) -> OpenAI:
    return OpenAI(api_key=token, base_url=f"{base_url}/client/v4/accounts/{account}/ai/v1", max_retries=0,
                  timeout=60)


@pytest.fixture(scope="module")
def oai(base_url: str) -> Iterator[OpenAI]:
    client = _client(base_url)
    yield client
    client.close()


def _complete(oai: OpenAI, **kwargs: Any) -> Any:
    return oai.completions.create(model=MODEL, prompt=STORY, max_tokens=24, temperature=0, **kwargs)


def _stream_completion(oai: OpenAI, **kwargs: Any) -> tuple[list[str], list[Any]]:
    chunks = list(oai.completions.create(model=MODEL, prompt=STORY, max_tokens=24, temperature=0, stream=True,
                                         **kwargs))
    return [c.choices[0].text for c in chunks if c.choices], chunks


# --- answers ----------------------------------------------------------------------------------------------------


def test_completions_equal_ai_run_raw(oai: OpenAI, http: httpx.Client, auth: dict[str, str], run_url: str) -> None:
    out = _complete(oai)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    assert out.created > 0 and len(out.choices) == 1
    native = http.post(run_url, headers=auth, json={"prompt": STORY, "raw": True, "max_tokens": 24,
                                                    "temperature": 0}).json()["result"]
    assert out.choices[0].text == native["response"] and out.choices[0].text.strip()
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None
    assert out.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == native["usage"]
    assert out.usage.prompt_tokens_details is not None  # OpenAI's field: how many came from the prefix cache
    assert 0 <= (out.usage.prompt_tokens_details.cached_tokens or 0) < out.usage.prompt_tokens


def test_chat_equals_ai_run_messages(oai: OpenAI, http: httpx.Client, auth: dict[str, str], run_url: str) -> None:
    out = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, seed=5,
                                      user="someone")
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    message = out.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    native = http.post(run_url, headers=auth, json={"messages": MESSAGES, "max_tokens": 16, "temperature": 0,
                                                    "seed": 5}).json()["result"]
    assert message.content == native["response"]
    assert out.usage is not None and out.usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                                   "total_tokens"}) == native["usage"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason == ("length" if out.usage.completion_tokens == 16 else "stop")


def test_chat_stream_usage_comes_once_either_way(oai: OpenAI) -> None:
    for options in (None, {"include_usage": True}):
        chunks = list(oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                  stream=True, stream_options=options))
        with_usage = [c for c in chunks if c.usage is not None]
        assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
        assert chunks[-1].usage.completion_tokens == 6  # type: ignore[union-attr]
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
        assert (chunks[-1].choices == []) == (options is not None)  # OpenAI's own usage chunk when asked for


def test_tool_conversation_messages(oai: OpenAI, http: httpx.Client, auth: dict[str, str], run_url: str) -> None:
    """A history from a tool-using client: assistant content null with tool_calls, a tool message (dropped by the
    template, as Workers AI drops it), and `developer` as the system message."""
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    history = [{"role": "developer", "content": "You tell stories."},
               {"role": "user", "content": "Tell me a story."},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = oai.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    same = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": ""}]
    native = http.post(run_url, headers=auth, json={"messages": same, "max_tokens": 8,
                                                    "temperature": 0}).json()["result"]
    assert out.choices[0].message.content == native["response"]
    assert out.usage is not None and out.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    for bad in ({"role": "user", "content": None}, {"role": "tool", "content": None},
                {"role": "robot", "content": "x"}):
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(model=MODEL, messages=[bad], max_tokens=2)  # type: ignore[list-item]
        assert info.value.code == 5006
    with pytest.raises(openai.BadRequestError) as only_tool:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "tool", "tool_call_id": "c", "content": "x"}])
    assert "no message with role" in only_tool.value.message


def test_content_parts_are_joined_and_max_completion_tokens_holds(oai: OpenAI) -> None:
    """Text content parts are joined as they are: the same prompt and answer as the one plain string."""
    question = [{"type": "text", "text": "Why is "}, {"type": "text", "text": "pizza so good"}]
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief"}]},
             {"role": "user", "content": question}]
    plain = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Why is pizza so good"}]
    as_parts, as_plain = (oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3,
                                                      temperature=0) for messages in (parts, plain))
    assert as_parts.choices[0].message.content == as_plain.choices[0].message.content
    assert as_parts.usage is not None and as_plain.usage is not None
    assert as_parts.usage.prompt_tokens == as_plain.usage.prompt_tokens
    assert 0 < as_parts.usage.completion_tokens <= 3


def test_chat_streaming_equals_non_stream(oai: OpenAI) -> None:
    whole = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_a_streamed_chat_without_text_ends_with_empty_content(oai: OpenAI) -> None:
    """A stop string at the very start leaves the answer no text: the stream still opens the message with
    `{"role": "assistant", "content": ""}`, as OpenAI's does, so the SDK's stream helper (or any client adding up the
    deltas) ends with the non-streamed answer's "", not None."""
    reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    asked = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
             "stop": (reply.choices[0].message.content or "")[:1]}
    whole = oai.chat.completions.create(**asked)
    assert whole.choices[0].message.content == "" and whole.choices[0].finish_reason == "stop"
    chunks = list(oai.chat.completions.create(**asked, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    with oai.chat.completions.stream(**asked) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "" and final.choices[0].finish_reason == "stop"


def test_completions_streaming_equals_non_stream(oai: OpenAI) -> None:
    texts, chunks = _stream_completion(oai)
    assert "".join(texts) == _complete(oai).choices[0].text
    assert all(c.object == "text_completion" for c in chunks)
    # unasked, the usage rides on the last chunk with its finish_reason, as Workers AI sends it; once either way
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage is not None
    assert [c for c in chunks if c.usage is not None] == [chunks[-1]]
    assert chunks[-1].usage.completion_tokens == _complete(oai).usage.completion_tokens  # type: ignore[union-attr]


def test_models_list(oai: OpenAI) -> None:
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {MODEL, SLOW_MODEL, SCRIPTED_MODEL}
    assert UNSERVED_MODEL not in models
    assert models[MODEL].object == "model" and models[MODEL].owned_by == "meta"
    assert isinstance(models[MODEL].created, int)


def _dated_card(name: str, created_at: str) -> Any:
    """The built-in card as `name`, with the catalog's `created_at`."""
    builtin = builtin_cards()[0]
    text = Path(builtin.source_path).read_text(encoding="utf-8")
    text = text.replace(builtin.name, name).replace(builtin.id, str(uuid.uuid5(uuid.NAMESPACE_URL, name)))
    return parse_card(text.replace("  source: 1\n", f'  source: 1\n  created_at: "{created_at}"\n', 1), name)


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process' local time zone is New York's (UTC-4 in September) for the test."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_models_created_is_utc_in_any_local_time_zone(engines: dict[str, Engine], new_york: None) -> None:
    """The catalog writes `created_at` without a zone ("2023-09-25 19:21:11.898"), in UTC: `created` is that Unix
    time whatever the server's time zone (it was read as local time: 4 hours later in New York). A time with an
    offset keeps it."""
    dated = {"@cf/int8serve-test/naive": "2023-09-25 19:21:11.898",
             "@cf/int8serve-test/offset": "2023-09-25T15:21:11.898-04:00"}
    catalog = Catalog([_dated_card(name, created_at) for name, created_at in dated.items()])
    policy = Policy.in_memory(rate_limits=False, cache=False)
    try:
        with LiveServer(create_app(catalog, {name: engines[MODEL] for name in dated}, TOKENS, policy=policy)) as live:
            listed = httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    finally:
        policy.close()
    assert {m["id"]: m["created"] for m in listed["data"]} == dict.fromkeys(dated, 1695669671)


def test_model_retrieve(base_url: str, oai: OpenAI, http: httpx.Client, auth: dict[str, str]) -> None:
    listed = {m.id: m for m in oai.models.list()}
    for name in (MODEL, SLOW_MODEL):
        assert oai.models.retrieve(name) == listed[name]
    with OpenAI(api_key=TOKEN, base_url=f"{base_url}/v1", max_retries=0) as alias:
        assert alias.models.retrieve(MODEL) == listed[MODEL]
    quoted = http.get(f"{base_url}/v1/models/{MODEL.replace('@', '%40').replace('/', '%2F')}", headers=auth)
    assert quoted.status_code == 200 and quoted.json()["id"] == MODEL
    for name in (UNSERVED_MODEL, "@cf/nobody/nothing"):
        with pytest.raises(openai.NotFoundError) as info:
            oai.models.retrieve(name)
        assert info.value.code == 5007 and name in info.value.message
    with pytest.raises(openai.AuthenticationError):
        _client(base_url, token="wrong-token").models.retrieve(MODEL)


def test_v1_alias_takes_the_account_from_the_token(base_url: str, oai: OpenAI) -> None:
    with OpenAI(api_key=TOKEN, base_url=f"{base_url}/v1", max_retries=0) as alias:
        assert _complete(alias).choices[0].text == _complete(oai).choices[0].text
        assert MODEL in {m.id for m in alias.models.list()}
        texts = [c.choices[0].delta.content or "" for c in alias.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, stream=True) if c.choices]
        assert "".join(texts)
    with OpenAI(api_key="nope", base_url=f"{base_url}/v1", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.code == 10000


def test_a_malformed_key_is_an_authentication_error(base_url: str, http: httpx.Client, run_url: str) -> None:
    """A key with a space (`OpenAI(api_key="tok A")`) is a key OpenAI cannot use: 401, the reason in the message;
    /ai/run keeps Cloudflare's 400/6003 with its error chain."""
    for url in (f"{base_url}/v1", f"{base_url}/client/v4/accounts/{ACCOUNT}/ai/v1"):
        with OpenAI(api_key="tok A", base_url=url, max_retries=0) as client, \
                pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
        assert info.value.body == {"message": "Invalid request headers: Invalid format for Authorization header",
                                   "type": "authentication_error", "param": None, "code": 6003}
    native = http.post(run_url, headers={"Authorization": "Bearer tok A"}, json={"prompt": "hi"})
    assert native.status_code == 400 and native.json()["errors"] == [{
        "code": 6003, "message": "Invalid request headers",
        "error_chain": [{"code": 6111, "message": "Invalid format for Authorization header"}]}]


# --- stop sequences ---------------------------------------------------------------------------------------------


def test_stop_sequence_cuts_and_cancels(oai: OpenAI) -> None:
    full = _complete(oai)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 4]
    assert len(stop) == 4
    cut = text[:text.find(stop)]
    out = _complete(oai, stop=[stop, "\x00never"])
    assert out.choices[0].text == cut and stop not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and full.usage is not None
    assert 0 < out.usage.completion_tokens < full.usage.completion_tokens
    texts, chunks = _stream_completion(oai, stop=stop, stream_options={"include_usage": True})
    assert "".join(texts) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    chat = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    reply = chat.choices[0].message.content or ""
    word = reply.split()[2]
    stopped = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stop=word)
    assert stopped.choices[0].message.content == reply[:reply.find(word)]
    assert stopped.choices[0].finish_reason == "stop"


def test_partial_stop_is_held_back_then_released(oai: OpenAI) -> None:
    text = _complete(oai).choices[0].text
    prefix = text[3:7]
    stop = prefix + "\x00"  # its start occurs, the whole never does
    texts, chunks = _stream_completion(oai, stop=stop)
    assert "".join(texts) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    seen = ""
    for piece in texts[:-1]:  # until the end, the streamed text never ends inside a possible stop
        seen += piece
        assert not any(seen.endswith(stop[:k]) for k in range(1, len(stop)))


# --- errors -----------------------------------------------------------------------------------------------------


def test_errors_as_sdk_exceptions(base_url: str, oai: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        oai.completions.create(model="@cf/nobody/nothing", prompt="x")
    assert nf.value.code == 5007 and nf.value.body["type"] == "not_found_error"  # type: ignore[index]
    assert nf.value.param is None
    with pytest.raises(openai.AuthenticationError) as au:
        _client(base_url, token="wrong-token").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert au.value.code == 10000
    with pytest.raises(openai.BadRequestError) as n2:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert n2.value.code == 5006 and "'n' must be 1" in n2.value.message and n2.value.param == "n"
    with pytest.raises(openai.BadRequestError) as unknown:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"frobnicate": 1})
    assert "frobnicate" in unknown.value.message and unknown.value.param == "frobnicate"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.BadRequestError) as batch:
        oai.completions.create(model=MODEL, prompt=["a", "b"])
    assert "batches" in batch.value.message and batch.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as temp:
        oai.completions.create(model=MODEL, prompt="x", temperature=6)
    assert "temperature" in temp.value.message and temp.value.param == "temperature"  # the card's schema
    with pytest.raises(openai.BadRequestError) as role:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])  # type: ignore[list-item]
    assert role.value.param == "messages"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="x", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError) as ctx:
        oai.completions.create(model=MODEL, prompt=STORY * 20, max_tokens=500)
    assert ctx.value.code == "context_length_exceeded"
    # harmless fields the SDK and tools send are accepted
    out = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=1, logprobs=False,
                                      response_format={"type": "text"}, parallel_tool_calls=False, user="u")
    assert out.choices[0].message.role == "assistant"


def test_errors_with_a_clear_culprit_name_it(oai: OpenAI, http: httpx.Client, auth: dict[str, str],
                                             run_url: str) -> None:
    """`param` names the field (the top-level one, as every OpenAI error here), and the message speaks of what the
    client sent: a chat's message, never Workers AI's `prompt` branch."""
    long = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a" * 4097}]
    with pytest.raises(openai.BadRequestError) as chat:
        oai.chat.completions.create(model=MODEL, messages=long, max_tokens=2)  # type: ignore[arg-type]
    assert chat.value.param == "messages" and chat.value.code == 5006
    assert chat.value.body["message"] == (  # type: ignore[index]
        "AiError: Bad input: Error: String at 'messages[1].content' is longer than 4096 characters (4097)")
    with pytest.raises(openai.BadRequestError) as completion:
        oai.completions.create(model=MODEL, prompt="a" * 4097, max_tokens=2)
    assert completion.value.param == "prompt" and "'prompt' is longer than 4096" in completion.value.message
    assert "messages" not in completion.value.message
    with pytest.raises(openai.BadRequestError) as both:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, max_completion_tokens=2)
    assert both.value.param == "max_tokens" and "differ" in both.value.message
    with pytest.raises(openai.BadRequestError) as completion_tokens:  # (it reaches the card's schema as max_tokens)
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10**6)
    assert completion_tokens.value.param == "max_completion_tokens"
    assert "'max_completion_tokens'" in completion_tokens.value.message and "'max_tokens'" not in \
        completion_tokens.value.message
    with pytest.raises(openai.BadRequestError) as tools_only:  # the template renders none of them
        oai.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "c"}])
    assert tools_only.value.param == "messages" and tools_only.value.body["message"].endswith(  # type: ignore[index]
        "no message with role 'system', 'user' or 'assistant' at 'messages'")
    native = http.post(run_url, headers=auth, json={"messages": long}).json()["errors"][0]["message"]
    assert native.startswith("AiError: Bad input: Error: oneOf at '/' not met, 0 matches: required properties at "
                             "'/' are 'prompt', String at '/messages/1/content' is longer")  # Workers AI's, as it was


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(("path", "body", "message", "param"), [
    ("chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]},
     "'stop': at most 4 stop sequences are supported, got 5", "stop"),
    ("chat/completions", {**CHAT, "stop": [""]}, "'stop[0]': stop sequences must not be empty", "stop"),
    ("chat/completions", {**CHAT, "stop": ""}, "'stop': stop sequences must not be empty", "stop"),
    ("chat/completions", {**CHAT, "stop": 5}, "'stop' must be a string or an array, got integer", "stop"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [IMAGE]}]},
     "'messages[0].content[0].type': only text content parts are supported by this model, got a part of type "
     "'image_url'", "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, IMAGE]}]},
     "'messages[0].content[1].type': only text content parts are supported by this model, got a part of type "
     "'image_url'", "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": ["hi"]}]},
     "'messages[0].content[0]' must be an object, got string", "messages"),
    ("chat/completions", {**CHAT, "messages": ["hi"]}, "'messages[0]' must be an object, got string", "messages"),
    ("chat/completions", {**CHAT, "stream_options": 1}, "'stream_options' must be an object, got integer",
     "stream_options"),
    ("completions", {"model": MODEL, "prompt": [1, 2, 3]},
     "'prompt': token-id prompts are not supported; give the prompt as text (a string)", "prompt"),
    ("completions", {"model": MODEL, "prompt": [[1, 2, 3]]},
     "'prompt': token-id prompts are not supported; give the prompt as text (a string)", "prompt"),
    ("completions", {"model": MODEL, "prompt": None}, "'prompt' must be a string or an array, got null", "prompt"),
    ("chat/completions", [], "the request body must be a JSON object, got array", None),
    ("completions", "prompt", "the request body must be a JSON object, got string", None),
])
def test_bad_bodies_are_told_what_is_wrong_in_their_own_terms(http: httpx.Client, auth: dict[str, str], path: str,
                                                              body: Any, message: str, param: str | None) -> None:
    """A union's complaint comes from the member the value's type chose, in the client's words: never pydantic's
    member tags (`constrained-str`, `list[TextPart]`) or class names."""
    answer = http.post(f"/v1/{path}", headers=auth, json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == {"message": f"AiError: Bad input: Error: {message}",
                                      "type": "invalid_request_error", "param": param, "code": 5006}


def test_a_completion_asking_for_logprobs_is_refused_even_with_0(http: httpx.Client, auth: dict[str, str]) -> None:
    """The legacy API's `logprobs` is a count, and 0 still asks for the sampled token's log probability: refused
    as 1 is, not answered with `logprobs: null`. Its absence (null, or the false some clients send) is harmless, as
    a chat's boolean `logprobs` is with 0 (= false)."""
    completion = {"model": MODEL, "prompt": STORY, "max_tokens": 1}
    for count in (0, 1):
        answer = http.post("/v1/completions", headers=auth, json={**completion, "logprobs": count})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == {
            "message": f"AiError: Bad input: Error: 'logprobs': log probabilities are not supported (only null or "
                       f"false), got {count}", "type": "invalid_request_error", "param": "logprobs", "code": 5006}
    for harmless in (None, False):
        answer = http.post("/v1/completions", headers=auth, json={**completion, "logprobs": harmless})
        assert answer.status_code == 200 and answer.json()["choices"][0]["logprobs"] is None, answer.text
    for boolean in (0, False):
        assert http.post("/v1/chat/completions", headers=auth, json={**CHAT, "logprobs": boolean}).status_code == 200


CONTEXT_MESSAGE = re.compile(r"This model's maximum context length is 512 tokens\. However, you requested (\d+) "
                             r"tokens \((\d+) in the (messages|prompt), (\d+) in the completion\)\. Please reduce "
                             r"the length of the (messages|prompt) or completion\.")


def test_context_overflow_is_openais_context_length_exceeded(oai: OpenAI, http: httpx.Client,
                                                             auth: dict[str, str], run_url: str) -> None:
    """What LangChain and LiteLLM recognise as a context overflow: 400, code `context_length_exceeded`, OpenAI's
    words, `param` the messages or the prompt; /ai/run keeps Workers AI's 413/5021 for the same body."""
    long_messages = [{"role": "user", "content": STORY * 20}]
    cases = [("messages", lambda: oai.chat.completions.create(model=MODEL, messages=long_messages, max_tokens=300),
              {"messages": long_messages, "max_tokens": 300}),
             ("prompt", lambda: oai.completions.create(model=MODEL, prompt=STORY * 20, max_tokens=300),
              {"prompt": STORY * 20, "raw": True, "max_tokens": 300})]
    for param, call, native_body in cases:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        error = info.value
        assert error.status_code == 400 and error.code == "context_length_exceeded" and error.param == param
        assert error.body["type"] == "invalid_request_error"  # type: ignore[index]
        match = CONTEXT_MESSAGE.fullmatch(error.body["message"])  # type: ignore[index]
        assert match is not None, error.body
        requested, prompt_tokens, where, completion, reduce = match.groups()
        assert (where, reduce, int(completion)) == (param, param, 300)
        assert int(requested) == int(prompt_tokens) + 300 > 512
        native = http.post(run_url, headers=auth, json=native_body)
        assert native.status_code == 413 and native.json()["errors"] == [{"code": 5021, "message": (
            f"AiError: Ai: The estimated number of input and maximum output tokens ({requested}) exceeded this "
            "model context window limit (512).")}]


def _prompt_tokens(http: httpx.Client, auth: dict[str, str], run_url: str, body: dict[str, Any]) -> int:
    answer = http.post(run_url, headers=auth, json={**body, "max_tokens": 1})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["result"]["usage"]["prompt_tokens"])


def test_omitted_max_tokens_gets_the_room_the_prompt_leaves(oai: OpenAI, http: httpx.Client, auth: dict[str, str],
                                                            run_url: str) -> None:
    """Without max_tokens (or max_completion_tokens) a prompt longer than the context less the card's default
    (512 - 256) is answered, as OpenAI answers it: the reply gets the room left and ends with "length"."""
    words = "word " * 165
    messages = [{"role": "user", "content": words}]
    in_chat = _prompt_tokens(http, auth, run_url, {"messages": messages})
    in_prompt = _prompt_tokens(http, auth, run_url, {"prompt": words, "raw": True})
    assert 256 < in_chat < 512 and 256 < in_prompt < 512
    chat = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0)  # type: ignore[arg-type]
    assert chat.usage is not None and chat.usage.prompt_tokens == in_chat
    assert chat.usage.completion_tokens == 512 - in_chat and chat.choices[0].finish_reason == "length"
    completion = oai.completions.create(model=MODEL, prompt=words, temperature=0)
    assert completion.usage is not None and completion.usage.prompt_tokens == in_prompt
    assert completion.usage.completion_tokens == 512 - in_prompt and completion.choices[0].finish_reason == "length"
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, temperature=0,  # type: ignore[arg-type]
                                              stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 512 - in_chat
    short = oai.completions.create(model=MODEL, prompt="word " * 60, temperature=0)  # room for the card's 256
    assert short.usage is not None and short.usage.completion_tokens <= 256
    # /ai/run keeps Workers AI's contract: the card's 256 are reserved, and the same prompt does not fit
    native = http.post(run_url, headers=auth, json={"messages": messages})
    assert native.status_code == 413 and native.json()["errors"][0]["code"] == 5021


def test_omitted_max_tokens_and_a_prompt_that_fills_the_window(oai: OpenAI) -> None:
    """Refused only when the prompt alone leaves no room, with OpenAI's words for that."""
    words = "word " * 200
    calls = [("messages", lambda: oai.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                                       "content": words}])),
             ("prompt", lambda: oai.completions.create(model=MODEL, prompt=words))]
    for param, call in calls:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.code == "context_length_exceeded" and info.value.param == param
        assert re.fullmatch(rf"This model's maximum context length is 512 tokens\. However, your {param} resulted "
                            rf"in \d+ tokens, which leaves no room for the completion\. Please reduce the length of "
                            rf"the {param}\.", info.value.body["message"]), info.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as explicit:  # a max_tokens that does not fit stays an error
        oai.completions.create(model=MODEL, prompt="word " * 100, max_tokens=256)
    assert explicit.value.code == "context_length_exceeded" and "256 in the completion" in explicit.value.message


@pytest.fixture(scope="module")
def policy_app(catalog: Catalog, engines: dict[str, Engine]) -> Iterator[FastAPI]:
    """The card's policy: 5 requests a minute, and the response cache."""
    policy = Policy.in_memory()
    yield create_app(catalog, engines, TOKENS, policy=policy)
    policy.close()


def test_rate_limit_and_cache_as_for_ai_run(policy_app: FastAPI) -> None:
    with LiveServer(policy_app) as live, _client(live.url) as client:
        first = client.completions.with_raw_response.create(model=MODEL, prompt=STORY, max_tokens=12,
                                                            temperature=0)
        assert first.headers["cf-aig-cache-status"] == "MISS" and "cf-ai-neurons" in first.headers
        again = client.completions.with_raw_response.create(model=MODEL, prompt=STORY, max_tokens=12,
                                                            temperature=0)
        assert again.headers["cf-aig-cache-status"] == "HIT"
        assert again.parse().choices[0].text == first.parse().choices[0].text
        full = first.parse().choices[0].text
        stopped = client.completions.with_raw_response.create(model=MODEL, prompt=STORY, max_tokens=12,
                                                              temperature=0, stop=full[4:7])
        assert stopped.headers["cf-aig-cache-status"] == "MISS"  # the stop sequences are part of the key
        assert stopped.parse().choices[0].text == full[:full.find(full[4:7])]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        run = httpx.post(f"{live.url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", headers=headers,
                         json={"prompt": "x", "raw": True, "max_tokens": 1})  # the same window as /ai/run
        assert run.status_code == 200 and run.headers["x-ratelimit-remaining-requests"] == "1"
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        assert info.value.code == 3021 and info.value.body["type"] == "rate_limit_error"  # type: ignore[index]
        assert info.value.response.headers["retry-after"]


def test_capacity_is_429_3040(base_url: str, oai: OpenAI) -> None:
    with occupied(base_url, 1), pytest.raises(openai.RateLimitError) as info:
        oai.chat.completions.create(model=SLOW_MODEL, messages=MESSAGES, max_tokens=2,
                                    extra_body={"options": {"rejectIfBusy": True}})
    assert info.value.code == 3040 and info.value.body["type"] == "capacity_error"  # type: ignore[index]
