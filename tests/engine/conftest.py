"""Engine fixtures: the stories260K checkpoints and SmolLM2-135M-Instruct, models loaded once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from int8serve.engine.gguf_loader import GGUFFile, load_gguf, write_tokenizer
from int8serve.engine.loader import LoadedModel, load_model
from int8serve.engine.tokenizer import AnyTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def stories_meta(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "stories260K" / "meta"
    assert (path / "consolidated.00.pth").is_file(), f"missing test model {path}"
    return path


@pytest.fixture(scope="session")
def stories_fp32(stories_hf: Path) -> LoadedModel:
    return load_model(stories_hf, "fp32")



# --- SmolLM2-135M-Instruct (`smollm2_gguf` and the int8 `smollm2_int8` are in tests/conftest.py) ----------------------


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The Q4_1 weights dequantized: the reference."""
    return load_gguf(smollm2_gguf, "fp32", tokenizer_dir=tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> AnyTokenizer:
    """Ours, rebuilt from the GGUF's vocabulary and merges (as load_gguf does, without loading the weights)."""
    return load_tokenizer(write_tokenizer(GGUFFile.open(smollm2_gguf), tmp_path_factory.mktemp("smollm2-tokenizer")))


@pytest.fixture(scope="session")
def smollm2_reference_tokenizer(smollm2_gguf: Path) -> Any:
    """transformers' own tokenizer built from the GGUF (its GGUF converter, independent of ours)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
