"""benchmarks/cpu_peak.py, briefly: the probe measures every instruction this CPU has, and the report reads them."""

from __future__ import annotations

import pytest

from benchmarks import cpu_peak
from int8serve.engine import kernels


def test_the_probes_of_this_cpu_are_measured_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_peak, "ITERATIONS", 1_000_000)
    monkeypatch.setattr(cpu_peak, "SHAPES", [(64, 96, "qkvo"), (64, 96, "gate/up"), (96, 64, "down")])
    probes = cpu_peak.run_probes(threads=1)
    flags = kernels.cpu_flags()
    assert [p.name for p in probes] == [name for name, _, _, needs in cpu_peak.PROBES if needs <= flags]
    assert "fp32 FMA, ymm" in [p.name for p in probes]  # every x86-64 CPU we serve on has AVX2 and FMA
    assert all(p.instructions_per_second > 1e8 for p in probes)  # one per cycle or more at > 1 GHz: 1e9
    args = cpu_peak.parse_args(["--rows", "8", "--rounds", "2", "--threads", "1"])
    text = cpu_peak.report(args, probes, cpu_peak.time_dense(8, 2), 0.0)
    assert "| fp32 FMA, ymm | 8 |" in text and "share of the" in text and "A 7B block's seven matmuls" in text


def test_bad_arguments_are_refused() -> None:
    for argv in (["--rows", "0"], ["--threads", "0"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            cpu_peak.parse_args(argv)
