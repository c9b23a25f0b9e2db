"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

# The repository is /work/main (this file is /work/main/tests/conftest.py) and the read-only
# reference data lives next to it in /work/shared.
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference data directory; fails loudly (never skips) when it is missing."""
    assert SHARED_DIR.is_dir(), f"shared data directory not found: {SHARED_DIR}"
    return SHARED_DIR
