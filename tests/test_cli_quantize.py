"""`int8serve quantize` writes its checkpoint whole or not at all, and refuses a DST it cannot write before loading.

A DST on a read-only file system was found by mkdir's traceback after the minutes of quantizing; a write that failed
half way (a full disk) ended in safetensors' or shutil's traceback and left a partial folder: int8serve.json, a
model.safetensors or a tokenizer.model cut short. Run in-process, with the failures simulated (a chmod does not stop
the root user the tests may run as, and no test mounts a file system).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError

from int8serve.cli import main
from int8serve.engine import loader
from int8serve.engine.loader import load_model

FULL = "No space left on device"


def quantize(capsys: pytest.CaptureFixture[str], src: Path, dst: Path) -> tuple[int, list[str]]:
    """quantize's exit code and the error lines it wrote (each starts "int8serve quantize: error:")."""
    try:
        main(["quantize", str(src), str(dst), "--quantizer", "rtn"])
        code = 0
    except SystemExit as exited:
        code = int(exited.code or 0)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return code, [line for line in stderr.splitlines() if "error" in line.lower()]


def listing(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): f"{p.stat().st_mode & 0o777:o}" for p in sorted(folder.rglob("*"))}


def test_a_destination_on_a_read_only_file_system_is_refused_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src"  # no model: loading it would be refused with another message
    source.mkdir()
    (source / "config.json").write_text("{}")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        if Path(path).resolve().is_relative_to(read_only):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", mkdir)
    for dst in (read_only / "int8", read_only / "a" / "int8", read_only):
        assert quantize(capsys, source, dst) == (2, [f"int8serve quantize: error: DST {dst} cannot be written: "
                                                     f"Read-only file system ({read_only})"])
    assert list(read_only.iterdir()) == []


def weights_cut_short(tensors: object, filename: str, *args: object, **kwargs: object) -> None:
    """safetensors' save_file on a disk that fills up half way."""
    Path(filename).write_bytes(b"\0" * 4096)
    raise SafetensorError(f"Error while serializing: I/O error: {FULL} (os error 28)")


def tokenizer_cut_short(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
    """shutil.copyfile on a disk that fills up half way: the audit found a tokenizer.model cut short."""
    data = Path(source).read_bytes()
    Path(destination).write_bytes(data[:len(data) // 2])
    raise OSError(errno.ENOSPC, FULL, str(destination))


@pytest.mark.parametrize("dst", ["int8", "a/b/int8", "empty"])
@pytest.mark.parametrize("failing", ["weights", "tokenizer"])
def test_a_write_that_fails_half_way_leaves_nothing_and_says_so_in_one_line(
        failing: str, dst: str, stories_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir(mode=0o750)  # an existing empty folder (a mount point, say) is kept, as it was
    before = listing(tmp_path)
    if failing == "weights":
        monkeypatch.setattr(loader, "save_file", weights_cut_short)
    else:
        monkeypatch.setattr(shutil, "copyfile", tokenizer_cut_short)
    code, errors = quantize(capsys, stories_hf, tmp_path / dst)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"int8serve quantize: error: DST {tmp_path / dst}: the checkpoint could not be "
                                f"written ([Errno 28] {FULL}: "), errors
    assert errors[0].endswith("; nothing of it was kept"), errors
    assert listing(tmp_path) == before  # no partial folder, no folder made for it


@pytest.mark.usefixtures("umask_022")
def test_an_existing_empty_folder_is_filled_and_kept(stories_hf: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Such a folder may be a mount point, which a rename could not replace: the checkpoint is moved into it."""
    folder = tmp_path / "int8"
    folder.mkdir(mode=0o750)
    assert quantize(capsys, stories_hf, folder) == (0, [])
    assert listing(tmp_path) == {"int8": "750", "int8/int8serve.json": "644", "int8/model.safetensors": "644",
                                 "int8/tokenizer.model": "644"}
    assert load_model(folder).tokenizer_path == folder / "tokenizer.model"
