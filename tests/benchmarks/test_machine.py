"""benchmarks/machine.py: who used the CPUs during a measurement, and how this process's memory is paged."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import CpuShares, huge_pages_gb, rss_gb

from int8serve.engine.kernels import packed


def test_a_tool_the_benchmark_ran_and_waited_for_is_not_counted_as_another_process() -> None:
    # vs_llamacpp runs llama.cpp's tools with subprocess.run: their CPU time is the measurement's own, not "others"
    started = time.perf_counter()
    shares = CpuShares()
    subprocess.run([sys.executable, "-c", "import time\nwhile time.process_time() < 1.0: pass"], check=True)
    own, _, _ = shares.stop()
    cpu_seconds_available = (time.perf_counter() - started) * (os.cpu_count() or 1)
    assert own * cpu_seconds_available >= 0.9  # the child's second of CPU, give or take a clock tick


def test_huge_pages_gb_sees_memory_the_kernel_put_on_2_mb_pages() -> None:
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    before = huge_pages_gb()
    assert 0 <= before <= rss_gb()
    region = packed._huge_page_empty(64 << 20)  # asks for huge pages (MADV_HUGEPAGE), as packed weights do
    region.fill_(1)  # touched: now resident
    after = huge_pages_gb()
    if "[never]" in setting:
        assert after == before
    else:  # always or madvise: most of the 64 MB comes on 2 MB pages
        assert after - before >= 0.03, (before, after, setting)
