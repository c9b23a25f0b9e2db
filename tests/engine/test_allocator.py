"""engine/allocator.py: freed activation memory is reused, not handed back to Linux and faulted in again."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from int8serve.engine import allocator

# Layer-like work on tensors of 5-20 MB, as a 512-token prefill chunk makes them; prints its page faults.
WORKLOAD = """
import resource, sys, torch
from int8serve.engine import allocator
if sys.argv[1] == "tuned":
    assert allocator.tune()
x = torch.randn(512, 4096)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def layer(x):
    gate, up = torch.cat([x, x, x], dim=1), torch.cat([x, x, x], dim=1) * 0.5
    hidden = torch.nn.functional.silu(gate) * up
    return x + hidden[:, :4096].to(torch.bfloat16).float()
for _ in range(int(sys.argv[2])):
    x = layer(x)
before = faults()
for _ in range(8):
    x = layer(x)
print(faults() - before)
"""


def page_faults(mode: str, warm_up: int) -> int:
    done = subprocess.run([sys.executable, "-c", WORKLOAD, mode, str(warm_up)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_layers_of_big_temporaries_reuse_their_memory() -> None:
    # after 8 layers (the heap settles: measured 6144 and 2048 faults against 51138 and 43938 untuned)
    untuned, tuned = page_faults("default", warm_up=8), page_faults("tuned", warm_up=8)
    assert untuned > 20_000  # glibc's defaults: fresh pages for most of the ~100 MB of temporaries a layer
    assert tuned * 4 < untuned


def test_settings_the_user_made_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[int] = []
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")

    def mallopt(parameter: int, value: int) -> int:
        applied.append(parameter)
        return 1

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: types.SimpleNamespace(mallopt=mallopt))
    allocator.tune.cache_clear()
    try:
        assert allocator.tune()
    finally:
        allocator.tune.cache_clear()
    assert sorted(applied) == sorted({allocator.M_MMAP_THRESHOLD, allocator.M_TRIM_THRESHOLD})
