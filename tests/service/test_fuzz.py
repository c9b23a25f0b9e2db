"""Every route fuzzed from the server's own OpenAPI document (schemathesis, derandomized so the suite is
deterministic): no 5xx, every error in its route's envelope. `benchmarks/fuzz.py` runs the long version."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from benchmarks.fuzz import envelope_problem, fuzz
from fastapi import FastAPI

from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine
from int8serve.service.app import create_app
from int8serve.service.policy import Policy

from .conftest import ACCOUNT, MODEL, SCRIPTED_MODEL, TOKEN, TOKENS, LiveServer

EXAMPLES = 12  # per operation and mode: ~350 requests, ~20 s


@pytest.fixture(scope="module")
def fast_app(catalog: Catalog, engines: dict[str, Engine]) -> Iterator[FastAPI]:
    """The card's model served by the scripted engine (15 tokens at most): generation costs nothing here."""
    policy = Policy.in_memory(rate_limits=False)
    yield create_app(catalog, {MODEL: engines[SCRIPTED_MODEL]}, TOKENS, policy=policy)
    policy.close()


def test_fuzzing_every_route_finds_no_5xx_and_no_bare_error(fast_app: FastAPI) -> None:
    with LiveServer(fast_app) as live:
        report = fuzz(live.url, TOKEN, ACCOUNT, EXAMPLES, model=MODEL)
    assert report.requests >= 200, report.line()
    assert not report.failures, "\n".join(report.failures[:20])
    assert report.statuses[200] > 0 and any(400 <= s < 500 for s in report.statuses)  # both kinds were reached


def test_the_envelope_check_itself() -> None:
    cloudflare = b'{"success":false,"errors":[{"code":5006,"message":"x"}],"messages":[],"result":{}}'
    openai = b'{"error":{"message":"x","type":"invalid_request_error","param":null,"code":5006}}'
    assert envelope_problem("/client/v4/accounts/a/ai/run/m", 400, cloudflare) is None
    assert envelope_problem("/v1/completions", 400, openai) is None
    assert envelope_problem("/client/v4/accounts/a/ai/v1/completions", 400, cloudflare) is not None
    assert envelope_problem("/client/v4/accounts/a/ai/run/m", 400, openai) is not None
    assert envelope_problem("/healthz", 500, b"{}") == "status 500"
    assert envelope_problem("/healthz", 404, b"Not Found") is not None
