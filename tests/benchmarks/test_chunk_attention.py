"""benchmarks/chunk_attention.py: both builds timed at every start after a check of their bits, a row per start."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from benchmarks import chunk_attention as bench
from int8serve.engine.kernels import attention


def test_both_builds_are_checked_timed_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, Path]] = []

    def sources(revision: str, folder: Path, source: Path) -> Path:
        asked.append((revision, source))
        return source

    def loaded(source: Path, output: Path) -> ctypes.CDLL:  # the library already built: no compiler run here
        return attention._library()

    monkeypatch.setattr(bench, "revision_sources", sources)
    monkeypatch.setattr(bench, "build", loaded)
    out = tmp_path / "bench.md"
    report = bench.main(["--revision", "HEAD~1", "--starts", "0", "130", "--rounds", "2", "--write", str(out)])
    assert asked == [("HEAD~1", attention.SOURCE)]
    rows = [line for line in report.splitlines() if line.startswith("| 0-127 |") or line.startswith("| 130-257 |")]
    assert len(rows) == 2 and all(" ms | " in row and "x** (" in row for row in rows)
    assert "--revision 'HEAD~1'" in report and "--write" not in report
    assert report in out.read_text()


def test_a_chunk_is_one_slots_consecutive_positions() -> None:
    chunk = bench.Chunk(start=300, max_len=300 + bench.CHUNK)
    assert chunk.positions.tolist() == list(range(300, 300 + bench.CHUNK))
    assert chunk.slots.tolist() == [0] * bench.CHUNK
    assert len(chunk.caches) == bench.LAYERS and chunk.caches[0][0].shape == (1, bench.HEADS, 428, bench.HEAD_DIM)
