"""Engine fixtures: the stories260K checkpoints and models loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def stories_meta(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "stories260K" / "meta"
    assert (path / "consolidated.00.pth").is_file(), f"missing test model {path}"
    return path


@pytest.fixture(scope="session")
def stories_fp32(stories_hf: Path) -> LoadedModel:
    return load_model(stories_hf, "fp32")

