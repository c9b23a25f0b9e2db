"""The machine a benchmark runs on: what it is, and who else is using its CPUs.

Figures mean little without the CPU they were measured on (our users run AVX2-only EPYCs, AVX-512 EPYCs and
Sapphire Rapids alike), so every script writes `machine_facts()` beside its numbers. And on a shared 2-core
machine any other busy process stalls each parallel op of a 2-thread engine by a scheduler time slice, so the
scripts measure the share of the CPUs that others used during each measurement (`CpuShares`), wait for a quiet
machine before timing (`QuietWaiter`) and keep the least disturbed of a few attempts (`least_contended`).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import torch

__all__ = ["ISA_FLAGS", "QUIET", "CpuShares", "NoWait", "QuietWaiter", "least_contended", "log",
           "machine_description", "machine_facts", "rss_gb"]

ISA_FLAGS = ("avx2", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
QUIET = 0.15  # other processes below this share of the CPUs count as a quiet machine
QUIET_BUDGET = 1800.0  # seconds a whole run may spend waiting for a quiet machine


def log(message: str) -> None:
    print(message, flush=True)


def _lscpu() -> dict[str, str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)}


def machine_facts() -> dict[str, str]:
    """CPU model, cores, which of ISA_FLAGS it has ("isa"), RAM, torch's version, threads and CPU capability."""
    fields = _lscpu()
    flags = fields.get("Flags", "").split()
    present = [f for f in ISA_FLAGS if f in flags]
    missing = [f for f in ISA_FLAGS if f not in flags]
    mem = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return {
        "cpu": fields.get("Model name", "?"),
        "cores": fields.get("CPU(s)", str(os.cpu_count())),
        "isa": ", ".join(present) + (f"; no {', '.join(missing)}" if missing else ""),
        "amx": "yes" if "amx_bf16" in flags else "no",
        "ram": f"{int(mem.group(1)) / 2**20:.0f} GiB" if mem else "?",
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine_description(facts: dict[str, str] | None = None) -> str:
    """One line: `AMD EPYC (2 CPUs; avx2, avx512_vnni; no avx_vnni, amx_bf16, amx_int8)`."""
    facts = facts or machine_facts()
    return f"{facts['cpu']} ({facts['cores']} CPUs; {facts['isa']})"


def cpu_label(fields: dict[str, str] | None = None) -> str:
    """The CPU's model name, family and model (`AMD EPYC family 25 model 1`): what tells one kind of CPU from another
    when the model name alone does not (a VM's "AMD EPYC" is a Zen 3 or a Zen 4)."""
    fields = fields if fields is not None else _lscpu()
    return f"{fields.get('Model name', '?')} family {fields.get('CPU family', '?')} model {fields.get('Model', '?')}"


def rss_gb() -> float:
    """Resident set size of this process in GB."""
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 / 1e9 if match else float("nan")


def huge_pages_gb() -> float:
    """GB of this process's anonymous memory on transparent huge pages (2 MB), or NaN where Linux does not say."""
    try:
        match = re.search(r"AnonHugePages:\s+(\d+) kB", Path("/proc/self/smaps_rollup").read_text())
    except OSError:
        return float("nan")
    return int(match.group(1)) * 1024 / 1e9 if match else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Who uses the CPUs


def process_jiffies(pid: int) -> int:
    """utime + stime of a process (all its threads); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def machine_busy_jiffies() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def own_jiffies() -> int:
    """This process's CPU time and that of the children it has waited for (a tool run with subprocess.run)."""
    times = os.times()
    return process_jiffies(os.getpid()) + round((times.children_user + times.children_system)
                                                * os.sysconf("SC_CLK_TCK"))


class CpuShares:
    """Shares of the machine's CPUs used between creation and stop() by this process (with the children it waited
    for, such as llama.cpp's tools), a server and all others."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.started = time.perf_counter()
        self.busy = machine_busy_jiffies()
        self.own = own_jiffies()
        self.server = process_jiffies(server_pid) if server_pid else 0

    def stop(self) -> tuple[float, float, float]:
        """(this process, the server, others), each a share of all the machine's CPUs."""
        ticks = (time.perf_counter() - self.started) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        own = own_jiffies() - self.own
        server = (process_jiffies(self.server_pid) - self.server) if self.server_pid else 0
        others = max(0, machine_busy_jiffies() - self.busy - own - server)
        return (own / ticks, server / ticks, others / ticks) if ticks else (0.0, 0.0, 0.0)

    def others(self) -> float:
        """The share used by other processes (the server counts as other when none was named)."""
        return self.stop()[2]


class QuietWaiter:
    """Waits, up to `max_wait` seconds each time and `budget` in all, for other processes to leave the CPUs."""

    def __init__(self, max_wait: float, budget: float = QUIET_BUDGET) -> None:
        self.max_wait = max_wait
        self.budget = budget

    def wait(self) -> None:
        deadline = time.perf_counter() + min(self.max_wait, self.budget)
        started = time.perf_counter()
        while True:
            probe = CpuShares()
            time.sleep(1.0)
            share = probe.others()
            if share < QUIET:
                break
            if time.perf_counter() >= deadline:
                log(f"  machine still busy ({share:.0%} of the CPUs used by others): measuring anyway")
                break
            log(f"  waiting for a quiet machine ({share:.0%} of the CPUs used by others) ...")
            time.sleep(4.0)
        self.budget = max(0.0, self.budget - (time.perf_counter() - started))


class NoWait(QuietWaiter):
    """--wait-quiet 0: measure at once."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def wait(self) -> None:
        pass


class Measured(Protocol):
    other_load: float


M = TypeVar("M", bound=Measured)


def least_contended(measure: Callable[[], M], quiet: QuietWaiter, attempts: int = 3) -> M:
    """Run `measure` after waiting for a quiet machine; again if others used the CPUs meanwhile. Least disturbed."""
    best: M | None = None
    for attempt in range(attempts):
        quiet.wait()
        result = measure()
        if best is None or result.other_load < best.other_load:
            best = result
        if result.other_load < QUIET:
            break
        if attempt + 1 < attempts:
            log(f"  others used {result.other_load:.0%} of the CPUs during the measurement: measuring again")
    assert best is not None
    return best
