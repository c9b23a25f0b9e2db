"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.variant_builds import VariantBuilds, requested

from int8serve.engine.gguf_loader import load_gguf
from int8serve.engine.loader import LoadedModel, load_model
from int8serve.engine.tokenizer import Tokenizer

# The repository is /work/main (this file is /work/main/tests/conftest.py) and the read-only
# reference data lives next to it in /work/shared.
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


_VARIANT_BUILDS = pytest.StashKey[VariantBuilds]()


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs: no build for a test that will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests with a `builds` marker run last; their kernel builds start now, in the background
    (tests/variant_builds.py)."""
    wanted = [(item, requested(item)) for item in items]
    late = [item for item, needs in wanted if needs]
    if not late or config.option.collectonly:
        return
    items[:] = [item for item, needs in wanted if not needs] + late
    builds = config.stash[_VARIANT_BUILDS] = VariantBuilds()
    builds.start(key for _, needs in wanted for key in needs)


def pytest_unconfigure(config: pytest.Config) -> None:
    if (builds := config.stash.get(_VARIANT_BUILDS, None)) is not None:
        builds.close()



@pytest.fixture(autouse=True)
def _int8serve_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run in-process (`main(["serve", ...])`, `generate`) installs its log handler on the `int8serve`
    logger (propagation off): the logger is put back after each test, so that later tests' caplog still sees its
    records and their servers' request lines do not reach the terminal between tests."""
    logger = logging.getLogger("int8serve")
    for name in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, name, getattr(logger, name))

@pytest.fixture
def variant_builds(request: pytest.FixtureRequest) -> VariantBuilds:
    """The builds named by the test's `builds` marker, made in the background since the suite was collected."""
    builds = request.config.stash.get(_VARIANT_BUILDS, None)
    assert builds is not None, "a test that takes variant_builds needs a @pytest.mark.builds(...)"
    return builds


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference data directory; fails loudly (never skips) when it is missing."""
    assert SHARED_DIR.is_dir(), f"shared data directory not found: {SHARED_DIR}"
    return SHARED_DIR


@pytest.fixture(scope="session")
def stories_hf(shared_dir: Path) -> Path:
    """The small trained TinyStories model (Hugging Face layout) that engine and service tests share."""
    path = shared_dir / "models" / "stories260K" / "hf"
    assert (path / "model.safetensors").is_file(), f"missing test model {path}"
    return path


@pytest.fixture(scope="session")
def stories_int8(stories_hf: Path) -> LoadedModel:
    return load_model(stories_hf, "int8")


@pytest.fixture(scope="session")
def stories_tokenizer(stories_hf: Path) -> Tokenizer:
    return Tokenizer(stories_hf / "tokenizer.model")


# --- SmolLM2-135M-Instruct: the real byte-level BPE chat model (its Q4_1 GGUF, ../shared/PROVENANCE.md) -------------


@pytest.fixture(scope="session")
def smollm2_gguf(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"missing test model {path}"
    return path


@pytest.fixture(scope="session")
def smollm2_int8(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The served model: the default int8 scheme (GPTQ). The suite quantizes SmolLM2 once, here: the tests that start
    a server with it write this model into the server's cache first (`save_packed_checkpoint`), which it maps."""
    return load_gguf(smollm2_gguf, "int8", tokenizer_dir=tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture
def read_only_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$INT8SERVE_CACHE on a read-only file system, as int8serve sees it: every folder made and file opened for writing
    under it fails with EROFS (a chmod would not stop the root user the tests may run as)."""
    cache = tmp_path / "read-only-cache"
    cache.mkdir()
    monkeypatch.setenv("INT8SERVE_CACHE", str(cache))
    real_mkdir, real_open = Path.mkdir, builtins.open

    def inside(path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(path).resolve().is_relative_to(cache)

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if inside(self):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if inside(file) and any(flag in mode for flag in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    return cache


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, whatever the suite was started with: files other users may read are 0644."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)

