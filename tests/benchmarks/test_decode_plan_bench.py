"""benchmarks/decode_plan.py on a small model: both variants run, the same bits, a row per batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import decode_plan as bench
from int8serve.engine import decode_plan


def test_stories260k_is_measured_both_ways_and_reported(stories_hf: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(decode_plan.ENV, raising=False)
    out = tmp_path / "bench.md"
    section = bench.main(["--model", str(stories_hf), "--position", "40", "--rounds", "2", "--steps", "2",
                          "--write", str(out)])
    assert "bit for bit: yes" in section
    rows = [line for line in section.splitlines() if line.startswith("| 1 |") or line.startswith("| 4 |")]
    assert len(rows) == 2 and all("×** |" in row and row.count(" / ") == 1 for row in rows)
    assert "--model" in section and "--write" not in section
    assert section in out.read_text()
    assert decode_plan.ENV not in os.environ  # the setting is left as it was


def test_rows_start_at_different_positions() -> None:
    assert bench.starts_of(1, 512) == [512] and bench.starts_of(4, 512) == [512, 384, 256, 128]
