"""benchmarks/common.py: what the benchmark scripts share, and the tests with them."""

from __future__ import annotations

import math

import pytest
from benchmarks.common import percentile


def test_percentile_is_numpys_on_values_in_any_order() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 25) == 1.75 and percentile([1.0, 2.0, 3.0, 4.0], 25) == 1.75
    assert percentile((5.0, 1.0), 50) == 3.0  # any sequence
    assert percentile([4.0, 1.0, 3.0, 2.0], 99) == pytest.approx(3.97)
    assert type(percentile([1.0, 2.0], 50)) is float  # not numpy's float64, for the reports' arithmetic and JSON
    assert math.isnan(percentile([], 50))
