"""benchmarks/machine.py: who used the CPUs during a measurement."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.machine import CpuShares


def test_a_tool_the_benchmark_ran_and_waited_for_is_not_counted_as_another_process() -> None:
    # vs_llamacpp runs llama.cpp's tools with subprocess.run: their CPU time is the measurement's own, not "others"
    started = time.perf_counter()
    shares = CpuShares()
    subprocess.run([sys.executable, "-c", "import time\nwhile time.process_time() < 1.0: pass"], check=True)
    own, _, _ = shares.stop()
    cpu_seconds_available = (time.perf_counter() - started) * (os.cpu_count() or 1)
    assert own * cpu_seconds_available >= 0.9  # the child's second of CPU, give or take a clock tick
