"""Builds of our kernels with other compile-time settings, for the tests that compare them with the default build
(tests/benchmarks/test_gemv_builds.py, test_attention_builds.py): compiled in the background at the lowest CPU
priority from the moment the suite is collected, while the other tests run, and those tests run last.

Why: each such build is a compiler run the test waits for (gemv.cpp 3 s, attention.cpp 20 s on a Zen 4's 2 cores;
twice that on a Zen 1, where the suite went over its 15 minutes), while the suite as a whole keeps one of the two
cores idle about half the time (its user time is about its wall time). A test names its builds with the `builds`
marker (source name -> variants) and takes them from the `variant_builds` fixture, which waits only for a build not
made yet. The compiler runs under Linux's idle scheduling class (`chrt --idle 0`), which leaves the CPU to the
other tests whenever they want it: beside `nice -n 19` builds, tests/benchmarks/test_hostile.py took 29 s instead of
21 (its server's decode threads waited on the compiler), beside idle-class builds 23 s.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest
from benchmarks.gemv_builds import Variant

from benchmarks import gemv_builds
from int8serve.engine.kernels import attention, gemv

MARKER = "builds"
IDLE_CLASS = ("chrt", "--idle", "0")  # util-linux, as lscpu
# a source's name in the marker -> (the source, the opener that checks its ABI and declares its functions)
SOURCES: dict[str, tuple[Path, Callable[[Path], ctypes.CDLL]]] = {
    "gemv": (gemv.SOURCE, gemv._open),
    "attention": (attention.SOURCE, attention._open),
}


def requested(item: pytest.Item) -> list[tuple[str, Variant]]:
    """The (source name, variant) pairs `item`'s `builds` marker names, in its order."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return []
    if marker.args or set(marker.kwargs) - set(SOURCES):
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} takes {' / '.join(SOURCES)}=[variants]")
    return [(name, variant_of(text)) for name, texts in marker.kwargs.items() for text in texts]


def variant_of(text: str | Variant) -> Variant:
    return text if isinstance(text, Variant) else gemv_builds.parse_variant(text)


class VariantBuilds:
    """One worker thread compiling the builds in the order the tests will want them, each at most once."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="int8serve-test-builds-"))
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="variant-builds")
        self.builds: dict[tuple[str, Variant], concurrent.futures.Future[ctypes.CDLL]] = {}

    def start(self, wanted: Iterable[tuple[str, Variant]]) -> None:
        for name, variant in wanted:
            if (name, variant) not in self.builds:
                self.builds[name, variant] = self.worker.submit(self._compile, name, variant)

    def _compile(self, name: str, variant: Variant) -> ctypes.CDLL:
        source, opener = SOURCES[name]
        return gemv_builds.compile_variant(variant, self.folder, source, opener, runner=IDLE_CLASS)

    def libraries(self, name: str, variants: Sequence[str | Variant]) -> dict[str, ctypes.CDLL]:
        """label -> library of each of `variants` of source `name` (the marker's), in that order."""
        wanted = [(name, variant_of(text)) for text in variants]
        missing = [variant.label for source, variant in wanted if (source, variant) not in self.builds]
        assert not missing, f"{missing} of {name} are not in the test's @pytest.mark.{MARKER}"
        return {variant.label: self.builds[name, variant].result() for _, variant in wanted}

    def close(self) -> None:
        """Drops the builds not started and waits for the one under way (a session cut short by -x; Ctrl-C stops
        the compiler too, which is in the terminal's process group), then removes the folder."""
        for future in self.builds.values():
            future.cancel()
        self.worker.shutdown(wait=True)
        shutil.rmtree(self.folder, ignore_errors=True)
