"""engine/allocator.py: freed activation memory is reused, not handed back to Linux and faulted in again."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from int8serve.engine import allocator

# A small fp32 model's 1024-token prefill (activations of 11.5-23 MB, as a 512-token chunk of the 7B shape makes
# them), twice to settle, then once more; prints the page faults of that last prefill.
WORKLOAD = """
import resource, sys, torch
from int8serve.engine import allocator, generate
from int8serve.engine.config import ModelConfig
from int8serve.engine.model import Transformer
assert allocator.tune()  # (a Transformer also tunes when it is made)
torch.manual_seed(0)
config = ModelConfig(dim=1024, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=256, hidden_dim=5632, max_seq_len=1100)
model = Transformer(config, "fp32").eval()
model.tok_embeddings.weight.normal_()
cache = model.new_cache(1, 1100)
prompt = [i % 256 for i in range(1, 1025)]
for _ in range(2):
    generate.prefill(model, prompt, cache, 0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
generate.prefill(model, prompt, cache, 0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults() -> int:
    done = subprocess.run([sys.executable, "-c", WORKLOAD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_prefills_freed_activations_are_reused() -> None:
    # Tuned, the third prefill finds its activations' memory on the heap: 0-516 page faults measured, once 1,536 in CI
    # (a prefill now and then touches a few fresh 2 MB stretches of the padded heap, 512 faults each). glibc's defaults
    # (with `allocator.tune` replaced by a no-op) gave 5,600-42,600: its thresholds adapt to what the process did
    # before, so that figure is not asserted, and a minimum over several prefills would not tell the two apart (once
    # 0 untuned). A tuning that did nothing would be at 5,600 or more. On a Sapphire Rapids 2,816 came in 1 process of
    # 6, and in 2 of 3 once (0 the third; 0-512 the others), so the median of three processes is held under 4,000.
    faults = sorted(page_faults() for _ in range(3))
    assert faults[1] < 4_000, faults


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
