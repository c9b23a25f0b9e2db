"""benchmarks/row_exact.py: the default prefill and the row-exact one, each timed in every round, the setting asked
for row-exact only while that prefill runs, and the section written under the model's and the CPU's names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from benchmarks.machine import cpu_label

from benchmarks import row_exact as bench
from int8serve.engine.kernels import matmul as prefill_matmul


def test_both_ways_are_timed_alternating_and_reported(stories_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(prefill_matmul.ENV, raising=False)
    settings: list[tuple[bool, str | None]] = []
    timed = bench.prefill

    def prefill(model, prompt, cache, chunk, row_exact):
        settings.append((row_exact, os.environ.get(prefill_matmul.ENV)))
        return timed(model, prompt, cache, chunk, row_exact)

    monkeypatch.setattr(bench, "prefill", prefill)
    out = tmp_path / "bench.md"
    bench.main(["--model", str(stories_hf), "--prompt", "40", "--chunk", "16", "--rounds", "2", "--write", str(out)])
    assert os.environ.get(prefill_matmul.ENV) is None  # restored
    timed_runs = settings[2:]  # after the two warm-ups
    if all(row_exact for row_exact, _ in timed_runs):  # row-exact is this CPU's default (avx2, avxvnni): as it is
        assert [value for _, value in timed_runs] == [None] * 4
    else:  # the setting asks for it during the row-exact prefills only, in alternating order
        assert timed_runs == [(False, None), (True, "row-exact"), (True, "row-exact"), (False, None)]
    text = out.read_text()
    assert f"<!-- benchmarks/row_exact.py hf {cpu_label()}: begin -->" in text
    table = capsys.readouterr().out
    assert "| the default (" in table and "| row-exact (our int8 kernel" in table and "| row-exact ÷ default" in table
