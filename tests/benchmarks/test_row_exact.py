"""benchmarks/row_exact.py: the row-exact prefill and another one, each timed in every round, each setting asked for
only while its prefill runs, and the section written under the model's and the CPU's names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from benchmarks.machine import cpu_label

from benchmarks import row_exact as bench
from int8serve.engine import int8
from int8serve.engine.kernels import matmul as prefill_matmul


def run(stories_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str
        ) -> list[tuple[bool, str | None]]:
    """The script's timed prefills: (row-exact chunks, INT8SERVE_PREFILL_MATMUL during it) each, warm-ups left out.
    Chunks of 48 rows: more than our kernel takes where it does not take every call (int8.KERNEL_ROWS)."""
    monkeypatch.delenv(prefill_matmul.ENV, raising=False)
    settings: list[tuple[bool, str | None]] = []
    timed = bench.prefill

    def prefill(model, prompt, cache, chunk, row_exact):
        settings.append((row_exact, os.environ.get(prefill_matmul.ENV)))
        return timed(model, prompt, cache, chunk, row_exact)

    monkeypatch.setattr(bench, "prefill", prefill)
    bench.main(["--model", str(stories_hf), "--prompt", "100", "--chunk", "48", "--rounds", "2", "--write",
                str(tmp_path / "bench.md"), *flags])
    assert os.environ.get(prefill_matmul.ENV) is None  # restored
    return settings[2:]


def test_both_ways_are_timed_alternating_and_reported(stories_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the CPU's default (row-exact itself where our int8 kernel takes every call), then against =dense."""
    default_is_row_exact = int8.kernel_rows() == int8.ALL_ROWS
    timed_runs = run(stories_hf, tmp_path, monkeypatch)
    other = (default_is_row_exact, None)
    assert timed_runs == [other, (True, "row-exact"), (True, "row-exact"), other]
    assert f"<!-- benchmarks/row_exact.py hf {cpu_label()}: begin -->" in (tmp_path / "bench.md").read_text()
    table = capsys.readouterr().out
    assert "| INT8SERVE_PREFILL_MATMUL=auto (" in table and "| row-exact (our int8 kernel" in table
    assert "| row-exact ÷ auto" in table
    timed_runs = run(stories_hf, tmp_path, monkeypatch, "--other", "dense")
    assert timed_runs == [(False, "dense"), (True, "row-exact"), (True, "row-exact"), (False, "dense")]
    table = capsys.readouterr().out
    assert "| INT8SERVE_PREFILL_MATMUL=dense (int8 layers " in table and ", SDPA over the chunk) |" in table
