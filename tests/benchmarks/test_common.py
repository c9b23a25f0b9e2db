"""benchmarks/common.py: what the benchmark scripts share, and the tests with them."""

from __future__ import annotations

import math

import pytest
from benchmarks.common import error_code, parse_frame, percentile


def test_percentile_is_numpys_on_values_in_any_order() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 25) == 1.75 and percentile([1.0, 2.0, 3.0, 4.0], 25) == 1.75
    assert percentile((5.0, 1.0), 50) == 3.0  # any sequence
    assert percentile([4.0, 1.0, 3.0, 2.0], 99) == pytest.approx(3.97)
    assert type(percentile([1.0, 2.0], 50)) is float  # not numpy's float64, for the reports' arithmetic and JSON
    assert math.isnan(percentile([], 50))


def test_parse_frame_of_both_apis() -> None:
    assert parse_frame('data: {"response":"Once"}') == ("data", {"response": "Once"})
    assert parse_frame('data: {"choices":[{"delta":{"content":"Once"}}]}')[0] == "data"
    assert parse_frame("data: [DONE]") == ("done", None)
    workers = parse_frame('data: {"response":"","errors":[{"code":3043,"message":"Internal server error"}]}')
    openai = parse_frame('data: {"error":{"code":"rate_limit_exceeded","message":"Too many"}}')
    assert workers[0] == openai[0] == "error"
    assert (error_code(workers[1]), error_code(openai[1])) == (3043, "rate_limit_exceeded")
    assert parse_frame(": keep-alive") == parse_frame("") == ("other", None)


def test_a_data_line_that_is_not_json_is_a_frame_without_payload() -> None:
    assert parse_frame("data: <html>502 Bad Gateway</html>") == ("data", None)
    assert parse_frame("data: [1, 2]") == ("data", [1, 2])


def test_error_code_of_a_body() -> None:
    assert error_code(b'{"success":false,"errors":[{"code":3040,"message":"Capacity"}]}') == 3040
    assert error_code(b'{"error":{"code":"invalid_request_error"}}') == "invalid_request_error"
    assert error_code(b"not json") is error_code(b"\xff") is error_code(b'{"errors":[]}') is None
    assert error_code([{"code": 1}]) is error_code('{"errors":[{"code":1}]}') is None  # text is no body
