"""`GET /client/v4/accounts` (Cloudflare's List Accounts, so that the playground needs only a token) and the
playground page and assets served from the package, over plain HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from cloudflare import Cloudflare

from int8serve.service.playground import PAGE_SECURITY_HEADERS
from int8serve.service.protocol.run import DEFAULT_TEMPERATURE, WORKERS_AI_PARAMETERS

from .conftest import ACCOUNT, OTHER_ACCOUNT, OTHER_TOKEN, TOKEN

ACCOUNTS = "/client/v4/accounts"


def envelope_error(resp: httpx.Response) -> tuple[int, int, str]:
    body = resp.json()
    assert body["success"] is False and body["result"] is None and body["messages"] == []
    assert len(body["errors"]) == 1
    return resp.status_code, body["errors"][0]["code"], body["errors"][0]["message"]


# --- GET /client/v4/accounts -------------------------------------------------------------------------------------


def test_lists_the_tokens_account(http: httpx.Client) -> None:
    resp = http.get(ACCOUNTS, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {
        "result": [{"id": ACCOUNT, "name": ACCOUNT, "type": "standard"}],
        "success": True, "errors": [], "messages": [],
        "result_info": {"page": 1, "per_page": 20, "count": 1, "total_count": 1, "total_pages": 1},
    }
    other = http.get(ACCOUNTS, headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert [a["id"] for a in other.json()["result"]] == [OTHER_ACCOUNT]
    # the legacy key scheme of the cloudflare SDK works here too
    legacy = http.get(ACCOUNTS, headers={"X-Auth-Email": "me@example.com", "X-Auth-Key": TOKEN})
    assert [a["id"] for a in legacy.json()["result"]] == [ACCOUNT]


def test_the_cloudflare_sdk_lists_it(sdk: Cloudflare) -> None:
    accounts = list(sdk.accounts.list())
    assert [(a.id, a.name) for a in accounts] == [(ACCOUNT, ACCOUNT)]


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, (400, 9106, "Missing X-Auth-Key, X-Auth-Email or Authorization headers")),
    ({"Authorization": "Token abc"}, (400, 6003, "Invalid request headers")),
    ({"Authorization": "Bearer"}, (400, 6003, "Invalid request headers")),
    ({"Authorization": "Bearer not-a-known-token"}, (401, 10000, "Authentication error")),
    ({"X-Auth-Key": TOKEN}, (400, 6003, "Invalid request headers")),  # the email is missing
])
def test_credentials_are_checked_like_every_route(http: httpx.Client, headers: dict[str, str],
                                                  expected: tuple[int, int, str]) -> None:
    assert envelope_error(http.get(ACCOUNTS, headers=headers)) == expected


def test_pagination_and_filters(http: httpx.Client, auth: dict[str, str]) -> None:
    def listed(**query: str) -> tuple[list[str], dict[str, Any]]:
        resp = http.get(ACCOUNTS, headers=auth, params=query)
        assert resp.status_code == 200, resp.text
        return [a["id"] for a in resp.json()["result"]], resp.json()["result_info"]

    assert listed(page="2") == ([], {"page": 2, "per_page": 20, "count": 0, "total_count": 1, "total_pages": 1})
    assert listed(per_page="5", direction="desc")[0] == [ACCOUNT]
    assert listed(name=ACCOUNT[3:9].upper()) == ([ACCOUNT], {"page": 1, "per_page": 20, "count": 1,
                                                             "total_count": 1, "total_pages": 1})
    assert listed(name="someone else")[1]["total_count"] == 0


@pytest.mark.parametrize("query", [{"page": "0"}, {"page": "x"}, {"per_page": "51"}, {"per_page": "-1"},
                                   {"per_page": "9" * 5000}, {"page": "1.5"}, {"direction": "up"}])
def test_bad_query_is_400_never_500(http: httpx.Client, auth: dict[str, str], query: dict[str, str]) -> None:
    status, code, message = envelope_error(http.get(ACCOUNTS, headers=auth, params=query))
    assert (status, code) == (400, 1001)
    assert message.startswith(f"Invalid query parameter '{next(iter(query))}'")


# --- the page and its assets ---------------------------------------------------------------------------------------


class _FormControls(HTMLParser):
    """Collects the page's form controls, the `for` of its labels and the ids inside labels."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict[str, str | None]] = []
        self.label_for: set[str] = set()
        self.scripts: list[dict[str, str | None]] = []
        self.stylesheets: list[str | None] = []
        self._open_labels = 0
        self.wrapped: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "label":
            self._open_labels += 1
            if attributes.get("for"):
                self.label_for.add(str(attributes["for"]))
        elif tag in ("input", "select", "textarea"):
            self.controls.append(attributes)
            if self._open_labels and attributes.get("id"):
                self.wrapped.add(str(attributes["id"]))
        elif tag == "script":
            self.scripts.append(attributes)
        elif tag == "link" and attributes.get("rel") == "stylesheet":
            self.stylesheets.append(attributes.get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._open_labels -= 1


def test_page_is_served_with_its_security_headers(http: httpx.Client) -> None:
    resp = http.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    for name, value in PAGE_SECURITY_HEADERS.items():
        if name != "content-security-policy":
            assert resp.headers[name] == value
    csp = resp.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "unsafe-inline" not in csp
    page = _FormControls()
    page.feed(resp.text)
    # only this origin's own assets, relative (the page works under a proxy's path prefix): no CDN; one inline
    # script (it moves the page to its URL with the trailing slash), allowed by its hash alone
    assert page.stylesheets == ["playground/playground.css"]
    sources = [s.get("src") for s in page.scripts if s.get("type") != "application/json"]
    assert sources == [None, "playground/playground.js"]
    (inline,) = re.findall(r"<script>(.*?)</script>", resp.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in csp
    assert csp == PAGE_SECURITY_HEADERS["content-security-policy"].replace("'self'", f"'self' 'sha256-{digest}'", 1)
    assert not re.search(r"https?://", resp.text)


def test_every_control_has_a_label(http: httpx.Client) -> None:
    page = _FormControls()
    page.feed(http.get("/").text)
    assert len(page.controls) >= 12  # token, remember, model, system prompt, 8 parameters, message
    for control in page.controls:
        ident = control.get("id")
        assert ident and (ident in page.label_for or ident in page.wrapped or control.get("aria-label")), control
    parameters = {c["data-parameter"] for c in page.controls if c.get("data-parameter")}
    assert parameters == {"max_tokens", *WORKERS_AI_PARAMETERS}


def test_page_carries_the_servers_parameter_ranges(http: httpx.Client) -> None:
    text = http.get("/").text
    match = re.search(r'<script type="application/json" id="server-parameter-ranges">(.*?)</script>', text, re.S)
    assert match is not None
    ranges = json.loads(match.group(1))
    assert ranges["max_tokens"] == {"type": "integer", "minimum": 1}
    for name, spec in WORKERS_AI_PARAMETERS.items():
        assert {k: ranges[name][k] for k in ("type", "minimum", "maximum")} == {
            k: spec[k] for k in ("type", "minimum", "maximum")}
    assert ranges["temperature"]["default"] == DEFAULT_TEMPERATURE


@pytest.mark.parametrize(("path", "content_type", "marker"), [
    ("/playground/playground.js", "text/javascript; charset=utf-8", '"use strict";'),
    ("/playground/playground.css", "text/css; charset=utf-8", ":root {"),
])
def test_assets_are_served_with_their_types(http: httpx.Client, path: str, content_type: str, marker: str) -> None:
    resp = http.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == content_type
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert marker in resp.text


def test_script_never_parses_api_text_as_html(http: httpx.Client) -> None:
    script = http.get("/playground/playground.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script


@pytest.mark.parametrize("path", ["/playground/nothing.js", "/playground/index.html", "/playground/%2e%2e%2fapp.py",
                                  "/playground/", "/playground/static/playground.js"])
def test_unknown_assets_are_404(http: httpx.Client, path: str) -> None:
    resp = http.get(path)
    assert resp.status_code == 404
    assert resp.json()["errors"][0]["code"] == 7000


def test_page_routes_refuse_other_methods(http: httpx.Client, auth: dict[str, str]) -> None:
    for path in ("/", "/playground/playground.js", ACCOUNTS):
        resp = http.post(path, headers=auth, content=b"{}")
        assert resp.status_code == 405
        assert resp.json()["errors"][0]["code"] == 7000
