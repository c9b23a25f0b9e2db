"""`python -m int8serve.engine.kernels`: compile our kernel libraries for this CPU now, into the cache of builds.

Why: a library is otherwise compiled the first time a process needs it (attention.cpp alone takes 20-35 s on 2
cores), so a user's first `serve`, `generate` or test run waits for the compiler. `make install` runs this once;
later runs find the builds (keyed by source, flags and compiler) and only load them. It prints, for each library,
the file it loaded or the reason it cannot be used, then the decode kernel's path on this CPU.

Exit status 0 when the decode kernel loaded; 1 when it did not (no compiler, a failed build, INT8SERVE_KERNELS=0):
int8serve then runs on torch's stock kernels and says so at start, so `make install` goes on after the message.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import ModuleType

from . import activation, attention, cpu, gemv, matmul
from .library import Loaded

# what each library does, and its module (whose cached `_load` builds and opens it once per process)
LIBRARIES: dict[str, ModuleType] = {
    "int8 decode kernel (gemv.cpp)": gemv,
    "decode attention (attention.cpp)": attention,
    "SiLU and RMSNorm (activation.cpp)": activation,
    "bf16 prefill matmul (matmul.cpp)": matmul,
}


def build_all(say: Callable[[str], None] = print) -> bool:
    """Build (or find built) and load every library, saying what became of each; whether the decode kernel loaded."""
    say("int8serve's kernels for this CPU (compiled once into the cache, about a minute on 2 cores):")
    for name, module in LIBRARIES.items():
        began = time.monotonic()
        loaded: Loaded = module._load()
        took = time.monotonic() - began
        if isinstance(loaded, str):
            say(f"{name}: not used: {loaded}")
        else:
            say(f"{name}: {loaded._name} (ready in {took:.1f} s)")
    say(cpu.describe())
    return gemv.loaded()


def main() -> int:
    return 0 if build_all() else 1


if __name__ == "__main__":
    sys.exit(main())
