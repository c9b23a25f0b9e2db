"""`/healthz` and `/readyz` (with the engines' load)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine
from int8serve.service.app import create_app
from int8serve.service.inference import RequestLimits

from .conftest import ACCOUNT, MODEL, SCRIPTED_MODEL, SLOW_MODEL, TOKENS, LiveServer
from .test_errors import assert_error


def test_healthz_needs_no_auth(http: httpx.Client) -> None:
    resp = http.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    assert resp.headers["content-type"] == "application/json"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/models",
                                  f"/client/v4/accounts/{ACCOUNT}/ai/models/search"])
def test_head_is_get_without_a_body(http: httpx.Client, auth: dict[str, str], path: str) -> None:
    """Load balancers and uptime monitors probe with HEAD (RFC 9110: a server supports GET and HEAD)."""
    got, head = http.get(path, headers=auth), http.head(path, headers=auth)
    assert got.status_code == head.status_code == 200 and got.content and head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == str(len(got.content))
    assert http.head(path).status_code == http.get(path).status_code  # credentials checked as for GET
    assert http.head(f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", headers=auth).status_code == 405  # POST only


def test_readyz_reports_every_engine(http: httpx.Client) -> None:
    resp = http.get("/readyz")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ready"
    assert set(body["models"]) == {MODEL, SLOW_MODEL, SCRIPTED_MODEL}
    assert body["models"][MODEL] == {"running": 0, "waiting": 0, "slots": 4, "free_slots": 4, "max_queue": 16}


def test_readyz_is_503_while_draining(http: httpx.Client, app: FastAPI) -> None:
    app.state.services.lifecycle.start_draining()
    try:
        resp = http.get("/readyz")
    finally:
        app.state.services.lifecycle.mark_ready()
    assert_error(resp, 503, 3040, "Not ready: the server is shutting down", ai=False)
    assert resp.headers["retry-after"] == "1"
    assert http.get("/readyz").status_code == 200


def test_no_engine_is_not_ready(catalog: Catalog) -> None:
    with LiveServer(create_app(catalog, {}, TOKENS)) as live:
        assert httpx.get(f"{live.url}/readyz").status_code == 503
        assert httpx.get(f"{live.url}/healthz").status_code == 200


def test_create_app_checks_its_arguments(catalog: Catalog, engines: dict[str, Engine]) -> None:
    with pytest.raises(ValueError, match="no card"):
        create_app(catalog, {"@cf/x/y": engines[MODEL]}, TOKENS)
    with pytest.raises(ValueError, match="an API token is"):
        create_app(catalog, {}, {"has space": ACCOUNT})
    with pytest.raises(ValueError, match="the metrics token is"):
        create_app(catalog, {}, TOKENS, metrics_token="has space")
    with pytest.raises(ValueError, match="an account id is 1 to 128 characters"):
        create_app(catalog, {}, {"tok": "a" * 129})  # the usage ledger could not store its rows
    with pytest.raises(ValueError, match="positive"):
        create_app(catalog, {}, TOKENS, limits=RequestLimits(max_body_bytes=0))
