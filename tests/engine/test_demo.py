"""The built-in demo model: made once, deterministic, loaded through the ordinary Hugging Face loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.file_modes import modes

from int8serve.engine.demo import DEMO_CONFIG, demo_model_dir
from int8serve.engine.loader import load_model
from int8serve.engine.tokenizer import Tokenizer


def test_demo_model_is_made_once_and_is_deterministic(tmp_path: Path) -> None:
    first = demo_model_dir(tmp_path / "a")
    assert demo_model_dir(tmp_path / "a") == first  # cached
    second = demo_model_dir(tmp_path / "b")
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    loaded = load_model(first, "int8")
    assert loaded.source_format == "hf" and loaded.config.max_seq_len == DEMO_CONFIG["max_position_embeddings"]
    tokenizer = Tokenizer(loaded.tokenizer_path)
    assert tokenizer.vocab_size == loaded.config.vocab_size
    assert tokenizer.decode(tokenizer.encode("Any text, même accentuée ✓")) == "Any text, même accentuée ✓"


@pytest.mark.usefixtures("umask_022")
def test_demo_model_is_readable_by_other_users(tmp_path: Path) -> None:
    """Its folder came from mkdtemp (0700), its weights from save_file (0600), its tokenizer from mkstemp (0600)."""
    folder = demo_model_dir(tmp_path)
    assert set(modes(folder).items()) == {(".", "755"), *((p.name, "644") for p in folder.iterdir())}
