"""benchmarks/kernel_builds.py: each source is built with the project's command and on one core, round after round,
and the report has a row per source."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import kernel_builds


def test_both_commands_build_and_the_report_has_a_row_per_source(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    kernel_builds.main(["--sources", "activation", "--rounds", "1", "--write", str(out)])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| activation.cpp |")]
    assert len(rows) == 1 and rows[0].endswith("x** |"), text
    project, one_core = (float(cell) for cell in rows[0].split(" | ")[1:3])
    assert project > 0 and one_core > 0
    assert "--sources activation --rounds 1" in text and "--write" not in text


def test_a_failing_build_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(SystemExit, match=r"building activation\.cpp failed"):
        kernel_builds.build_seconds(kernel_builds.SOURCES["activation"], tmp_path / "x.so")


def test_rounds_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        kernel_builds.parse_args(["--rounds", "0"])
