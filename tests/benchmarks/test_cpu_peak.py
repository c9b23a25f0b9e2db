"""benchmarks/cpu_peak.py, briefly: the probe measures every instruction this CPU has, and the report reads them."""

from __future__ import annotations

import pytest

from benchmarks import cpu_peak
from int8serve.engine import kernels
from int8serve.engine.kernels import matmul as prefill_matmul


def test_the_probes_of_this_cpu_are_measured_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_peak, "ITERATIONS", 1_000_000)
    monkeypatch.setattr(cpu_peak, "SHAPES", [(64, 96, "qkvo"), (64, 96, "gate/up"), (96, 64, "down")])
    probes = cpu_peak.run_probes(threads=1)
    flags = kernels.cpu_flags()
    assert [p.name for p in probes] == [spec.name for spec in cpu_peak.PROBES if spec.needs <= flags]
    names = [p.name for p in probes]
    # every x86-64 CPU we serve on has AVX2 and FMA, and so the accumulated integer probes
    assert "fp32 FMA, ymm" in names and cpu_peak.ACCUMULATED_INT16 in names
    assert all(p.instructions_per_second > 1e8 for p in probes)  # one per cycle or more at > 1 GHz: 1e9
    by_name = {p.name: p for p in probes}
    # a vpaddd beside each vpmaddwd can only slow it: the accumulated rate is at most the products' alone (+ noise)
    assert by_name[cpu_peak.ACCUMULATED_INT16].instructions_per_second < \
        1.2 * by_name["int16 pairs (vpmaddwd), ymm"].instructions_per_second
    args = cpu_peak.parse_args(["--rows", "8", "--rounds", "2", "--threads", "1"])
    text = cpu_peak.report(args, probes, cpu_peak.time_dense(8, 2), 0.0)
    assert "| fp32 FMA, ymm | 8 |" in text and "share of the" in text and "A 7B block's seven matmuls" in text
    assert "our int8 kernel" not in text


def test_the_kernels_gemm_is_reported_against_its_own_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_peak, "ITERATIONS", 200_000)
    monkeypatch.setattr(cpu_peak, "SHAPES", [(64, 96, "qkvo"), (64, 96, "gate/up"), (96, 64, "down")])
    probes = cpu_peak.run_probes(threads=1)
    args = cpu_peak.parse_args(["--rows", "20", "--rounds", "2", "--threads", "1"])
    text = cpu_peak.report(args, probes, cpu_peak.time_dense(20, 2), 0.0, cpu_peak.time_kernel(20, 2))
    table = text[text.index(f"| our int8 kernel ({kernels.path()}, precise), 20 rows"):]
    rows = [line for line in table.splitlines() if line.startswith("| 64 -> 96") or line.startswith("| 96 -> 64")]
    assert len(rows) == 3
    peak, per_mac = cpu_peak.kernel_peak(probes)
    if kernels.path() == "avx2":  # 16-bit rows: vpmaddwd + vpaddd, one of its multiply-adds for each
        assert peak is not None and peak.name == cpu_peak.ACCUMULATED_INT16 and per_mac == 1
    if kernels.path() == "avxvnni":  # 16-bit rows through vpdpwssd
        assert peak is not None and peak.name == cpu_peak.INT16_DOT_AVX_VNNI and per_mac == 1
    if kernels.path() == "vnni512":  # two int8 passes a row through vpdpbusd
        assert peak is not None and peak.name.startswith("int8 dot (vpdpbusd), zmm") and per_mac == 2
    if peak is not None:
        assert all(row.rstrip(" |").endswith("%") for row in rows), rows
        assert f"share of the {peak.name} peak" in table
    else:
        assert all(row.rstrip(" |").endswith("?") for row in rows), rows


AMX = {"amx_bf16", "amx_tile"} <= kernels.cpu_flags()


@pytest.mark.skipif(not AMX, reason="the AMX tile probes: this CPU has no AMX-BF16")
def test_the_tile_products_are_probed_where_the_cpu_has_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_peak, "ITERATIONS", 100_000)
    monkeypatch.setattr(cpu_peak, "PROBES", [p for p in cpu_peak.PROBES if p.tiles or p.name == "fp32 FMA, zmm"])
    by_name = {p.name: p for p in cpu_peak.run_probes(threads=1)}
    tiles, fma = by_name[cpu_peak.BF16_TILES], by_name["fp32 FMA, zmm"]
    # one tdpbf16ps (8192 multiply-adds) takes 16 cycles: more multiply-adds a second than zmm FMAs, fewer
    # instructions
    assert tiles.macs_per_instruction == 16 * 16 * 32
    assert tiles.macs_per_second > 4 * fma.macs_per_second
    assert tiles.instructions_per_second < fma.instructions_per_second / 4
    int8_tiles = by_name["int8 tile product (tdpbssd), AMX"]
    assert int8_tiles.macs_per_second > 1.5 * tiles.macs_per_second  # twice the multiply-adds in the same cycles


@pytest.mark.skipif(not cpu_peak.bf16_kernel_takes_prefill(64), reason="our bf16 prefill kernel does not take "
                    "prefill calls on this CPU (AMX CPUs, or INT8SERVE_PREFILL_MATMUL=bf16 with AVX512-BF16)")
def test_the_bf16_prefill_kernel_is_reported_against_its_own_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_peak, "ITERATIONS", 100_000)
    monkeypatch.setattr(cpu_peak, "SHAPES", [(64, 96, "qkvo"), (64, 96, "gate/up"), (96, 64, "down")])
    probes = cpu_peak.run_probes(threads=1)
    args = cpu_peak.parse_args(["--rows", "64", "--rounds", "2", "--threads", "1"])
    text = cpu_peak.report(args, probes, cpu_peak.time_dense(64, 2), 0.0, None, cpu_peak.time_bf16_kernel(64, 2))
    peak = cpu_peak.bf16_peak(probes, prefill_matmul.path())
    assert peak is not None and peak.name == (cpu_peak.BF16_TILES if prefill_matmul.path() == "amx" else
                                              cpu_peak.BF16_DOT_ZMM)
    table = text[text.index(f"| our bf16 prefill kernel ({prefill_matmul.path()}), 64 rows"):]
    assert f"share of the {peak.name} peak" in table
    rows = [line for line in table.splitlines() if line.startswith("| 64 -> 96") or line.startswith("| 96 -> 64")]
    assert len(rows) == 3 and all(row.rstrip(" |").endswith("%") for row in rows), rows
    if AMX:  # oneDNN's bf16 matmul takes the tiles too: the dense table reads against their peak
        assert f"| dense matmul (torch.bfloat16), 64 rows | ms | G multiply-adds/s | share of the {peak.name}" in text


def test_whether_the_kernel_takes_prefill_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INT8SERVE_PREFILL_MATMUL", "dense")
    assert not cpu_peak.kernel_takes_prefill()  # the dense path: no kernel table
    monkeypatch.setenv("INT8SERVE_PREFILL_MATMUL", "int8")
    assert cpu_peak.kernel_takes_prefill() == kernels.available()


def test_bad_arguments_are_refused() -> None:
    for argv in (["--rows", "0"], ["--threads", "0"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            cpu_peak.parse_args(argv)
