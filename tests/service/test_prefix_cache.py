"""The prefix cache seen from the API: the same answers and neurons, fewer prompt tokens prefilled, and the number
reused in OpenAI's `usage.prompt_tokens_details.cached_tokens`, the request log and `/metrics`."""

from __future__ import annotations

import logging

import httpx
import pytest
from openai import OpenAI

from int8serve.engine.scheduler import Engine
from int8serve.service.request_log import REQUEST_LOGGER

from .conftest import ACCOUNT, MODEL, OTHER_ACCOUNT, OTHER_TOKEN, TOKEN

SYSTEM = "You are a storyteller. You tell short, happy stories about a little girl and her dog in the park."


def _scrape(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name) and f'model="{MODEL}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_repeated_system_prompt_is_reused_exactly(base_url: str, http: httpx.Client,
                                                    engines: dict[str, Engine]) -> None:
    client = OpenAI(api_key=TOKEN, base_url=f"{base_url}/client/v4/accounts/{ACCOUNT}/ai/v1", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me about Lily."}]
    reused_before = _scrape(http, "int8serve_prefix_cache_reused_tokens_total")
    prefilled_before = engines[MODEL].prefilled_tokens
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=12,
                                                             temperature=0)
    again = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[*messages[:1], {"role": "user", "content": "Tell me about Ben."}], max_tokens=12,
        temperature=0)
    one, two = first.parse(), again.parse()
    assert one.usage is not None and two.usage is not None and one.usage.prompt_tokens_details is not None
    cached = two.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    # reuse is token-granular: everything the two prompts share (system prompt, "[INST] Tell me about")
    assert cached is not None and 32 <= cached < two.usage.prompt_tokens
    prefilled = engines[MODEL].prefilled_tokens - prefilled_before
    assert prefilled == one.usage.prompt_tokens - one.usage.prompt_tokens_details.cached_tokens + \
        two.usage.prompt_tokens - cached
    assert _scrape(http, "int8serve_prefix_cache_reused_tokens_total") - reused_before >= cached
    # neurons are metered on every input token, reused or not (as Workers AI does)
    assert float(again.headers["cf-ai-neurons"]) == pytest.approx((two.usage.total_tokens) * 0.1836)
    # and the answer is the one computed without the cache
    engines[MODEL].prefix_cache.clear()  # type: ignore[union-attr]  (the engine is idle between requests)
    cold = client.chat.completions.create(
        model=MODEL, messages=[*messages[:1], {"role": "user", "content": "Tell me about Ben."}], max_tokens=12,
        temperature=0)
    assert cold.usage is not None and cold.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    assert cold.choices[0].message.content == two.choices[0].message.content


def test_the_request_log_says_how_many_prompt_tokens_were_reused(http: httpx.Client, run_url: str,
                                                                 auth: dict[str, str],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    body = {"prompt": "Once upon a time, there was a little girl who loved her dog very much.", "max_tokens": 3}
    http.post(run_url, headers=auth, json=body)
    resp = http.post(run_url, headers=auth, json={**body, "prompt": body["prompt"] + " One day"})
    [record] = [r for r in caplog.records if r.name == REQUEST_LOGGER
                and r.fields["request_id"] == resp.headers["cf-ai-req-id"]]  # type: ignore[attr-defined]
    assert record.fields["cached_prompt_tokens"] >= 32  # type: ignore[attr-defined]


def test_another_accounts_prompt_is_not_reused(base_url: str) -> None:
    """Found by an audit: one account read another's secret word by word from `cached_tokens` (and could from the
    prefill's speed). Each account reuses only what it sent itself (and the card's public default system prompt)."""
    secret = "The vault code is seven three nine, and Lily keeps it under the red dog bed."
    body = {"model": MODEL, "prompt": secret, "max_tokens": 2, "temperature": 0}
    owner = OpenAI(api_key=TOKEN, base_url=f"{base_url}/client/v4/accounts/{ACCOUNT}/ai/v1", max_retries=0)
    other = OpenAI(api_key=OTHER_TOKEN, base_url=f"{base_url}/client/v4/accounts/{OTHER_ACCOUNT}/ai/v1",
                   max_retries=0)

    def cached(client: OpenAI) -> int:
        usage = client.completions.create(**body, extra_headers={"cf-skip-cache": "true"}).usage
        assert usage is not None and usage.prompt_tokens_details is not None
        return usage.prompt_tokens_details.cached_tokens or 0

    first = cached(owner)
    assert cached(owner) > first and cached(owner) >= 16  # the owner's own prompt comes back from the cache
    assert cached(other) == 0  # the same text from another account: nothing (a raw prompt has no system prompt)
    assert cached(other) > 0  # once it computed the prompt itself, its own
