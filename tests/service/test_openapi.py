"""The OpenAPI document (`/openapi.json`, `/docs`): valid, complete, and truthful about bodies and errors."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from openapi_spec_validator import validate

from int8serve.service.playground import PAGE_SECURITY_HEADERS
from int8serve.service.routes import openai, ops, workers_ai

from .conftest import MODEL


@pytest.fixture(scope="module")
def document(http: httpx.Client) -> dict[str, Any]:
    resp = http.get("/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    return resp.json()


def test_the_document_validates(document: dict[str, Any]) -> None:
    validate(document)


def test_every_route_of_the_app_is_in_it(document: dict[str, Any]) -> None:
    documented = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    routes = {(route.path.replace("{model:path}", "{model}"), method)
              for router in (workers_ai.router, openai.router, ops.router) for route in router.routes
              if isinstance(route, APIRoute) and route.include_in_schema for method in route.methods}
    assert len(routes) == 16 and routes == documented


def test_bodies_errors_and_security_are_described(document: dict[str, Any]) -> None:
    run = document["paths"]["/client/v4/accounts/{account_id}/ai/run/{model}"]["post"]
    body = run["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schemas = document["components"]["schemas"]
    assert body == "#/components/schemas/RunBody" and "RunBody" in schemas
    assert {"prompt", "messages", "max_tokens", "temperature", "seed"} <= set(schemas["RunBody"]["properties"])
    assert {"400", "401", "403", "413", "429"} <= set(run["responses"])
    assert run["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
    assert "text/event-stream" in run["responses"]["200"]["content"]
    assert {"apiToken", "authKey"} <= set(document["components"]["securitySchemes"])
    assert run["security"]
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert chat["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert "422" not in run["responses"]  # parameters that do not validate are 400s here


def test_operations_routes_say_what_they_answer(document: dict[str, Any], http: httpx.Client) -> None:
    metrics = document["paths"]["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"]  # Prometheus text, not JSON
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")
    assert metrics["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
    readyz = document["paths"]["/readyz"]["get"]["responses"]
    assert readyz["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
    assert "3040" in readyz["503"]["description"]


def test_docs_page_loads_no_code_from_elsewhere(http: httpx.Client) -> None:
    """Not FastAPI's Swagger UI (scripts from a CDN on the origin where the playground keeps its token)."""
    page = http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == PAGE_SECURITY_HEADERS["content-security-policy"]
    assert 'href="openapi.json"' in page.text
    assert not re.search(r"\b(src|href)=[\"']?(https?:)?//", page.text), page.text
    script = http.get("/playground/docs.js")
    assert script.status_code == 200 and "openapi.json" in script.text and "https:" not in script.text
    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert http.get(path).status_code == 404


def test_a_real_answer_fits_the_documented_model(http: httpx.Client, run_url: str, auth: dict[str, str],
                                                 document: dict[str, Any]) -> None:
    from int8serve.service.protocol.answers import ErrorEnvelope, RunEnvelope

    answer = http.post(run_url, headers=auth, json={"prompt": "Once", "raw": True, "max_tokens": 3})
    RunEnvelope.model_validate(answer.json())
    ErrorEnvelope.model_validate(http.post(run_url, headers=auth, json={}).json())
    assert MODEL in answer.request.url.path
