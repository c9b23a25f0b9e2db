"""A small SentencePiece tokenizer for the built-in demo model, trained from text the package ships.

The demo model lets ``int8serve`` run end to end without downloading anything, so its tokenizer
cannot come from elsewhere either: :func:`train_demo_tokenizer` trains one from ``demo_text.txt``
(original prose written for this project) in well under a second. It is shaped like Llama 2's:
BPE, ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad, identity normalization, a dummy-prefix ``▁``,
digits split, and byte fallback so that any text, in any script, encodes and decodes exactly.
"""

from __future__ import annotations

import io
import os
import tempfile
from importlib import resources
from pathlib import Path

import sentencepiece

from .cache_files import usual_mode

__all__ = ["DEMO_VOCAB_SIZE", "demo_text", "train_demo_tokenizer"]

DEMO_VOCAB_SIZE = 512
MODEL_FILENAME = "tokenizer.model"

# Trainer options. Single-threaded, no sentence sampling or shuffling, so the result is the same on
# every run and machine (the test checks byte-identical output); minloglevel silences the trainer.
_TRAINER_OPTIONS: dict[str, object] = {
    "model_type": "bpe",
    "vocab_size": DEMO_VOCAB_SIZE,
    "byte_fallback": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "character_coverage": 0.9995,
    "max_sentence_length": 8192,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "num_threads": 1,
    "minloglevel": 2,
}


def demo_text() -> str:
    """The training text shipped with the package (``int8serve/engine/demo_text.txt``)."""
    return resources.files("int8serve.engine").joinpath("demo_text.txt").read_text(encoding="utf-8")


def train_demo_tokenizer(out_dir: Path) -> Path:
    """Train the demo tokenizer and write ``out_dir/tokenizer.model``; return that path.

    The file is written atomically (temporary file, then rename), so a concurrent reader never
    sees a half-written model. Running it again gives the same bytes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _train(demo_text().splitlines())
    target = out_dir / MODEL_FILENAME
    _write_atomically(target, model)
    return target


def _train(lines: list[str]) -> bytes:
    """Run the SentencePiece trainer on ``lines`` and return the serialized model."""
    writer = io.BytesIO()
    sentences = [line for line in lines if line.strip()]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=writer, **_TRAINER_OPTIONS)
    return writer.getvalue()


def _write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file in the same directory."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
        usual_mode(Path(tmp_name))  # mkstemp makes it 0600
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
