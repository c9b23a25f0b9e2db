"""`POST /ai/run`: answers through the official SDK and curl-style requests, the exact prompt ids the engine gets,
and outputs that do not depend on the batch or on streaming."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import tokenizers
from cloudflare import Cloudflare

from int8serve.engine.chat_template import render_messages, render_prompt
from int8serve.engine.scheduler import Engine, GenerationRequest, RequestHandle
from int8serve.engine.tokenizer import Tokenizer

from .conftest import ACCOUNT, MODEL

STORY = "Once upon a time, there was a little"


def _stream_text(http: httpx.Client, url: str, headers: dict[str, str], body: dict[str, Any]) -> str:
    with http.stream("POST", url, headers=headers, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        frames = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    return "".join(json.loads(f[6:])["response"] for f in frames[:-1])


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch, engines: dict[str, Engine]) -> list[GenerationRequest]:
    """Every GenerationRequest the main engine receives during the test."""
    engine = engines[MODEL]
    seen: list[GenerationRequest] = []
    real_submit = engine.submit

    def spy(request: GenerationRequest, reject_if_busy: bool = False) -> RequestHandle:
        seen.append(request)
        return real_submit(request, reject_if_busy=reject_if_busy)

    monkeypatch.setattr(engine, "submit", spy)
    return seen


def test_sdk_prompt_returns_the_result_object(sdk: Cloudflare) -> None:
    out = sdk.ai.run(MODEL, account_id=ACCOUNT, prompt=STORY, raw=True, max_tokens=24, temperature=0)
    assert isinstance(out, dict)
    assert set(out) == {"response", "tool_calls", "usage"}
    assert isinstance(out["response"], str) and out["response"].strip()
    assert out["tool_calls"] == []
    usage = out["usage"]
    assert 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_sdk_messages(sdk: Cloudflare) -> None:
    out = sdk.ai.run(MODEL, account_id=ACCOUNT, max_tokens=16, seed=5,
                     messages=[{"role": "system", "content": "You tell stories."},
                               {"role": "user", "content": "Tell me about a dog."}])
    assert isinstance(out["response"], str)
    assert out["usage"]["completion_tokens"] >= 1


def test_envelope_and_content_type_are_exact(http: httpx.Client, run_url: str, auth: dict[str, str]) -> None:
    resp = http.post(run_url, headers=auth, json={"prompt": STORY, "raw": True, "max_tokens": 8, "temperature": 0})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert list(body) == ["result", "success", "errors", "messages"]
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    assert list(body["result"]) == ["response", "tool_calls", "usage"]
    assert list(body["result"]["usage"]) == ["prompt_tokens", "completion_tokens", "total_tokens"]
    uuid.UUID(resp.headers["cf-ai-req-id"])


def test_curl_style_body_without_json_content_type(http: httpx.Client, base_url: str, auth: dict[str, str]) -> None:
    """`curl -d '{...}'` sends application/x-www-form-urlencoded; the body is JSON all the same. The encoded
    model path is accepted too, and unknown query parameters are ignored."""
    payload = json.dumps({"prompt": STORY, "raw": True, "max_tokens": 8, "temperature": 0}).encode()
    form = {**auth, "Content-Type": "application/x-www-form-urlencoded"}
    first = http.post(f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", headers=form, content=payload)
    no_type = httpx.post(f"{base_url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}?foo=bar", headers=auth,
                         content=payload)
    encoded = http.post(f"/client/v4/accounts/{ACCOUNT}/ai/run/%40cf%2Fmeta%2Fllama-2-7b-chat-int8",
                        headers=form, content=payload)
    assert first.status_code == no_type.status_code == encoded.status_code == 200, first.text
    texts = {r.json()["result"]["response"] for r in (first, no_type, encoded)}
    assert len(texts) == 1


def test_raw_prompt_reaches_the_engine_as_its_exact_ids(
        http: httpx.Client, run_url: str, auth: dict[str, str], submitted: list[GenerationRequest],
        stories_tokenizer: Tokenizer) -> None:
    prompt = "Lily saw a cat [INST] and"
    resp = http.post(run_url, headers=auth, json={"prompt": prompt, "raw": True, "max_tokens": 4})
    assert resp.status_code == 200
    (request,) = submitted
    assert request.prompt_ids == stories_tokenizer.encode_segments(render_prompt(prompt, raw=True))
    assert request.prompt_ids == stories_tokenizer.encode(prompt, bos=True)
    assert request.max_tokens == 4
    assert resp.json()["result"]["usage"]["prompt_tokens"] == len(request.prompt_ids)


# The model's own format (§6.1: a raw prompt must adhere to it): Llama 2's turns, for the Llama-2 stand-in
LLAMA2_RAW = "<s>[INST] Hi [/INST] Hello</s><s>[INST] Bye [/INST]"


@pytest.mark.parametrize("route", ["ai-run", "completions"])
def test_a_raw_prompts_controls_reach_the_engine_as_their_ids(
        route: str, http: httpx.Client, base_url: str, run_url: str, auth: dict[str, str],
        submitted: list[GenerationRequest], stories_hf: Path) -> None:
    """`"raw": true` and /v1/completions: the prompt's <s>/</s> are BOS/EOS as the model's tokenizer.json gives them,
    one BOS (the prompt's own); the usage counts those ids."""
    body = {"prompt": LLAMA2_RAW, "max_tokens": 4, "temperature": 0}
    if route == "ai-run":
        resp = http.post(run_url, headers=auth, json={**body, "raw": True})
        usage = resp.json()["result"]["usage"]
    else:
        resp = http.post(f"{base_url}/v1/completions", headers=auth, json={**body, "model": MODEL})
        usage = resp.json()["usage"]
    assert resp.status_code == 200, resp.text
    (request,) = submitted
    hf = tokenizers.Tokenizer.from_file(str(stories_hf / "tokenizer.json"))
    assert request.prompt_ids == hf.encode(LLAMA2_RAW, add_special_tokens=False).ids
    assert request.prompt_ids[:1] == [1] and request.prompt_ids[1] != 1 and request.prompt_ids.count(2) == 1
    assert usage["prompt_tokens"] == len(request.prompt_ids)


def test_an_eos_inside_a_raw_prompt_does_not_end_the_reply(http: httpx.Client, run_url: str,
                                                          auth: dict[str, str]) -> None:
    body = {"prompt": "Once upon a time</s><s>Lily saw a", "raw": True, "max_tokens": 6, "temperature": 0}
    result = http.post(run_url, headers=auth, json=body).json()["result"]
    assert result["usage"]["completion_tokens"] == 6 and result["response"].strip()


def test_a_raw_reply_continues_the_prompt_text(http: httpx.Client, run_url: str, auth: dict[str, str],
                                              submitted: list[GenerationRequest]) -> None:
    """SentencePiece drops the leading space of a text's first piece: a raw prompt's reply is decoded as the end
    of prompt + reply ("...a little" + " girl"), a chat reply alone (Workers AI's "New", " York")."""
    body = {"prompt": STORY, "raw": True, "max_tokens": 8, "temperature": 0}
    raw = http.post(run_url, headers=auth, json=body).json()["result"]["response"]
    assert raw.startswith(" ") and raw[1:2].isalpha()  # the story goes on with a word, after a space
    assert _stream_text(http, run_url, auth, body) == raw
    chat = http.post(run_url, headers=auth, json={**body, "raw": False}).json()["result"]["response"]
    assert not chat.startswith(" ")
    assert [r.continues_prompt for r in submitted] == [True, True, False]


def test_templated_prompt_and_messages_reach_the_engine_as_exact_ids(
        http: httpx.Client, run_url: str, auth: dict[str, str], submitted: list[GenerationRequest],
        stories_tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "tool", "content": "dropped"},
                {"role": "user", "content": "A story </s><s>please"}]
    assert http.post(run_url, headers=auth, json={"prompt": "Tell a story"}).status_code == 200
    assert http.post(run_url, headers=auth, json={"messages": messages, "raw": True}).status_code == 200
    prompt_req, messages_req = submitted
    assert prompt_req.prompt_ids == stories_tokenizer.encode_segments(render_prompt("Tell a story"))
    assert messages_req.prompt_ids == stories_tokenizer.encode_segments(render_messages(messages))
    assert prompt_req.prompt_ids.count(stories_tokenizer.bos_id) == 1
    assert prompt_req.max_tokens == messages_req.max_tokens == 256  # the card schema's default
    assert prompt_req.params.temperature == 0.6  # Workers AI's default
    assert prompt_req.request_id and prompt_req.request_id != messages_req.request_id


def test_sampling_parameters_reach_the_engine(
        http: httpx.Client, run_url: str, auth: dict[str, str], submitted: list[GenerationRequest]) -> None:
    body = {"prompt": STORY, "raw": True, "max_tokens": 3, "temperature": 1.5, "top_p": 0.9, "top_k": 40,
            "seed": 9_999_999_999, "repetition_penalty": 1.1, "frequency_penalty": -0.5, "presence_penalty": 2,
            "lora": None, "tools": [], "response_format": {"type": "text"}, "options": {"rejectIfBusy": False},
            "something_else": {"ignored": True}}
    resp = http.post(run_url, headers=auth, json=body)
    assert resp.status_code == 200, resp.text
    params = submitted[0].params
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.5, 0.9, 40, 9_999_999_999)
    assert (params.repetition_penalty, params.frequency_penalty, params.presence_penalty) == (1.1, -0.5, 2.0)
    resp = http.post(run_url, headers=auth, json={"prompt": STORY, "max_tokens": 2, "repetition_penalty": 0})
    assert resp.status_code == 200
    assert submitted[1].params.repetition_penalty == 1.0  # 0 means "no penalty"


def test_stream_equals_non_stream_for_the_same_seed(http: httpx.Client, run_url: str, auth: dict[str, str]) -> None:
    body = {"prompt": STORY, "raw": True, "max_tokens": 120, "seed": 1234, "temperature": 1.1, "top_k": 30,
            "top_p": 0.95, "repetition_penalty": 1.05}
    collected = http.post(run_url, headers=auth, json=body).json()["result"]["response"]
    assert _stream_text(http, run_url, auth, body) == collected
    greedy = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 80, "temperature": 0}
    assert _stream_text(http, run_url, auth, greedy) == http.post(run_url, headers=auth,
                                                                  json=greedy).json()["result"]["response"]


def test_batch_invariance_over_http(http: httpx.Client, run_url: str, auth: dict[str, str]) -> None:
    """Four identical greedy requests at once give one text; a seeded request gives the same text alone and
    beside three other requests."""
    greedy = {"prompt": STORY, "raw": True, "max_tokens": 60, "temperature": 0}
    seeded = {"prompt": "The dog ran", "raw": True, "max_tokens": 60, "temperature": 0.9, "seed": 77}

    def post(body: dict[str, Any]) -> str:
        resp = http.post(run_url, headers=auth, json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["result"]["response"]

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(post, [greedy] * 4))
        assert len(set(texts)) == 1 and texts[0]
        alone = post(seeded)
        others = [{"prompt": p, "raw": True, "max_tokens": 60, "temperature": 1.0}
                  for p in ("Tim and Sue", "A big red ball", "One day")]
        together = list(pool.map(post, [seeded, *others]))
    assert together[0] == alone


def test_sdk_streaming_through_raw_access(sdk: Cloudflare, http: httpx.Client, run_url: str,
                                         auth: dict[str, str]) -> None:
    with sdk.ai.with_streaming_response.run(MODEL, account_id=ACCOUNT, prompt=STORY, raw=True, stream=True,
                                            max_tokens=40, temperature=0) as resp:
        assert resp.headers["content-type"] == "text/event-stream"
        lines = list(resp.iter_lines())
    data = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in data)
    assert data[-1] == "data: [DONE]"
    final = json.loads(data[-2][6:])
    assert final["response"] == "" and final["usage"]["completion_tokens"] == 40
    text = "".join(json.loads(line[6:])["response"] for line in data[:-1])
    body = {"prompt": STORY, "raw": True, "max_tokens": 40, "temperature": 0}
    assert text == http.post(run_url, headers=auth, json=body).json()["result"]["response"]
