"""Engine fixtures: the stories260K checkpoints and models loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.engine.loader import LoadedModel, load_model
from int8serve.engine.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def stories_hf(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "stories260K" / "hf"
    assert (path / "model.safetensors").is_file(), f"missing test model {path}"
    return path


@pytest.fixture(scope="session")
def stories_meta(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "stories260K" / "meta"
    assert (path / "consolidated.00.pth").is_file(), f"missing test model {path}"
    return path


@pytest.fixture(scope="session")
def stories_fp32(stories_hf: Path) -> LoadedModel:
    return load_model(stories_hf, "fp32")


@pytest.fixture(scope="session")
def stories_int8(stories_hf: Path) -> LoadedModel:
    return load_model(stories_hf, "int8")


@pytest.fixture(scope="session")
def stories_tokenizer(stories_hf: Path) -> Tokenizer:
    return Tokenizer(stories_hf / "tokenizer.model")
