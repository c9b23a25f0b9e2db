"""`models/search` (filters, pagination that ends for the SDK) and `models/schema`."""

from __future__ import annotations

from typing import Any

import cloudflare
import httpx
import pytest
from cloudflare import Cloudflare

from int8serve.catalog.registry import Catalog

from .conftest import ACCOUNT, MODEL, SCRIPTED_MODEL, SLOW_MODEL, UNSERVED_MODEL
from .test_errors import assert_error, sdk_error

SEARCH = f"/client/v4/accounts/{ACCOUNT}/ai/models/search"
SCHEMA = f"/client/v4/accounts/{ACCOUNT}/ai/models/schema"
SERVED = [MODEL, SLOW_MODEL, SCRIPTED_MODEL]


def test_sdk_list_iterates_every_page_and_stops(sdk: Cloudflare, catalog: Catalog) -> None:
    everything = list(sdk.ai.models.list(account_id=ACCOUNT))
    assert [m["name"] for m in everything] == SERVED  # the unserved card is not listed
    assert everything[0] == catalog.get(MODEL).to_search_result()
    one_by_one = list(sdk.ai.models.list(account_id=ACCOUNT, per_page=1))
    assert [m["name"] for m in one_by_one] == SERVED


@pytest.mark.parametrize(("params", "names"), [
    ({"task": "Text Generation"}, SERVED),
    ({"task": "Text Classification"}, []),
    ({"search": "scripted"}, [SCRIPTED_MODEL]),
    ({"author": "meta"}, [MODEL]),
    ({"author": "int8serve-test"}, [SLOW_MODEL, SCRIPTED_MODEL]),
    ({"source": 1}, SERVED),
    ({"source": 2}, []),
    ({"hide_experimental": True}, SERVED),
])
def test_sdk_list_filters(sdk: Cloudflare, params: dict[str, Any], names: list[str]) -> None:
    assert [m["name"] for m in sdk.ai.models.list(account_id=ACCOUNT, **params)] == names


def test_plus_is_a_space_and_result_info(http: httpx.Client, auth: dict[str, str]) -> None:
    resp = http.get(f"{SEARCH}?task=Text+Generation&per_page=2&page=2&source=1.0&unknown=1", headers=auth)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert list(body) == ["result", "success", "errors", "messages", "result_info"]
    assert [m["name"] for m in body["result"]] == [SCRIPTED_MODEL]
    assert body["result_info"] == {"count": 1, "page": 2, "per_page": 2, "total_count": 3}
    default = http.get(SEARCH, headers=auth).json()["result_info"]
    assert default == {"count": 3, "page": 1, "per_page": 20, "total_count": 3}


def test_pages_past_the_end_are_empty(http: httpx.Client, auth: dict[str, str]) -> None:
    body = http.get(f"{SEARCH}?page=99", headers=auth).json()
    assert body["success"] is True and body["result"] == []
    assert body["result_info"] == {"count": 0, "page": 99, "per_page": 20, "total_count": 3}


@pytest.mark.parametrize("query", ["page=0", "page=abc", "page=-1", "per_page=0", "per_page=5000", "per_page=2.5",
                                   "source=abc", "source=1.5", "hide_experimental=maybe"])
def test_invalid_query_is_400(http: httpx.Client, auth: dict[str, str], query: str) -> None:
    error = assert_error(http.get(f"{SEARCH}?{query}", headers=auth), 400, 1001, ai=False)
    assert error["message"].startswith(f"Invalid query parameter '{query.split('=')[0]}': ")


def test_sdk_invalid_page(sdk: Cloudflare) -> None:
    sdk_error(cloudflare.BadRequestError, lambda: sdk.ai.models.list(account_id=ACCOUNT, page=0).result, 400, 1001)


def test_search_and_schema_need_auth(http: httpx.Client) -> None:
    assert_error(http.get(SEARCH), 400, 9106, ai=False)
    assert_error(http.get(f"{SCHEMA}?model={MODEL}"), 400, 9106, ai=False)
    assert_error(http.get(SEARCH, headers={"Authorization": "Bearer nope"}), 401, 10000, ai=False)


def test_sdk_schema(sdk: Cloudflare, catalog: Catalog) -> None:
    schema = sdk.ai.models.schema.get(account_id=ACCOUNT, model=MODEL)
    assert schema == catalog.get(MODEL).to_schema_result()
    assert schema["input"]["oneOf"][0]["properties"]["prompt"]["maxLength"] == 4096


def test_schema_errors(sdk: Cloudflare, http: httpx.Client, auth: dict[str, str]) -> None:
    error = sdk_error(cloudflare.BadRequestError,
                      lambda: sdk.ai.models.schema.get(account_id=ACCOUNT, model="@cf/nope/nothing"), 400, 5007)
    assert error["message"] == "No such model @cf/nope/nothing or task"
    assert_error(http.get(f"{SCHEMA}?model={UNSERVED_MODEL}", headers=auth), 400, 5007)
    assert_error(http.get(SCHEMA, headers=auth), 400, 1001, "Invalid query parameter 'model': a model name is required",
                 ai=False)
