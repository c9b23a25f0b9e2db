"""`PolicySettings` made directly (library use, tests): every number has an upper bound, `serve`'s own where `serve`
has the setting, and a number beyond it (400 digits, 1e300, inf, NaN) is a ValidationError naming the field."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from pydantic import ValidationError

from int8serve.service.policy.settings import (
    MAX_CACHE_BYTES,
    MAX_CACHE_ENTRIES,
    MAX_CACHE_TTL_SECONDS,
    PolicySettings,
)
from int8serve.settings import MAX_DAILY_NEURONS, MAX_RPM, MAX_SECONDS

BOUNDS: dict[str, int] = {
    "default_rpm": MAX_RPM,
    "account_rpm": MAX_RPM,  # each account's
    "window_seconds": MAX_SECONDS,
    "cache_ttl": MAX_CACHE_TTL_SECONDS,
    "cache_max_entries": MAX_CACHE_ENTRIES,
    "cache_max_bytes": MAX_CACHE_BYTES,
    "daily_neurons": MAX_DAILY_NEURONS,
    "allocation_lease_seconds": MAX_SECONDS,
    "backend_timeout": MAX_SECONDS,
    "retry_seconds": MAX_SECONDS,
    "database_timeout": MAX_SECONDS,
    "replica_stamp_seconds": MAX_SECONDS,
}
BEYOND = {"400 digits": 10**400, "1e300": 1e300, "inf": math.inf, "nan": math.nan}


def settings_with(field: str, value: Any) -> PolicySettings:
    return PolicySettings(**{field: {"acct-a": value} if field == "account_rpm" else value})


def value_of(settings: PolicySettings, field: str) -> Any:
    value = getattr(settings, field)
    return value["acct-a"] if field == "account_rpm" else value


def test_every_number_is_bounded_here() -> None:
    numbers = {name for name, field in PolicySettings.model_fields.items()
               if re.search(r"\b(int|float)\b", str(field.annotation))}
    assert numbers == set(BOUNDS)


@pytest.mark.parametrize("value", BEYOND.values(), ids=BEYOND.keys())
@pytest.mark.parametrize("field", BOUNDS)
def test_a_number_beyond_any_use_is_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as refused:
        settings_with(field, value)
    (error,) = refused.value.errors()
    assert error["loc"][0] == field
    assert str(refused.value).splitlines()[1].split(".")[0] == field  # the message's line naming the field


@pytest.mark.parametrize("field", BOUNDS)
def test_the_bound_itself_is_taken_and_one_more_is_not(field: str) -> None:
    bound = BOUNDS[field]
    assert value_of(settings_with(field, bound), field) == bound
    with pytest.raises(ValidationError, match=f"(?s){field}.*less than or equal to {bound}"):
        settings_with(field, bound + 1)
