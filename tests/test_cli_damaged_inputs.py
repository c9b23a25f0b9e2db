"""generate, quantize and eval-ppl report a damaged model in one line and exit 2, as `serve` does: no traceback.

Real subprocesses on damaged copies of stories260K (the auditor's reproductions, tests/engine/test_loader_damaged.py
has each case at the loader's level).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def heads_null(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": None}))


def nan_weights(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff\xff\xc0\x7f" * ((len(data) - start) // 4)
    (folder / "model.safetensors").write_bytes(bytes(data))


CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "config": (heads_null, "config.json: missing field 'num_attention_heads'"),
    "tokenizer": (lambda f: (f / "tokenizer.model").write_bytes(b"garbage" * 10), "tokenizer.model"),
    "index": (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": 5}'), "shard index"),
    "nan": (nan_weights, "holds non-finite values"),
}


# each damage once, each command at least once (the commands share their error handling; a subprocess costs 1.6 s)
@pytest.mark.parametrize(("command", "case"), [
    ("generate", "config"), ("quantize", "tokenizer"), ("eval-ppl", "index"), ("generate", "nan"), ("quantize", "nan"),
])
def test_a_damaged_model_is_one_line_and_exit_2(command: str, case: str, stories_hf: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(stories_hf, tmp_path / "model"))
    damage, fragment = CASES[case]
    damage(model)
    (tmp_path / "text.txt").write_text("Once upon a time there was a cat. " * 20)
    args = {"generate": ["generate", "--model", str(model), "--raw", "Once", "--max-tokens", "2"],
            "quantize": ["quantize", str(model), str(tmp_path / "out")],
            "eval-ppl": ["eval-ppl", "--model", str(model), "--text", str(tmp_path / "text.txt")]}[command]
    result = subprocess.run([sys.executable, "-m", "int8serve", *args, "--no-model-cache"] if command != "quantize"
                            else [sys.executable, "-m", "int8serve", *args], capture_output=True, text=True,
                            env={**os.environ, "INT8SERVE_CACHE": str(tmp_path / "cache")}, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert errors[0].startswith(f"int8serve {command}: error: ") and str(model) in errors[0], errors
    assert fragment in errors[0], errors
