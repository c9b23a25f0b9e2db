"""`int8serve quantize` writes its checkpoint whole or not at all, and refuses a DST it cannot write before loading.

A DST on a read-only file system was found by mkdir's traceback after the minutes of quantizing; a write that failed
half way (a full disk) ended in safetensors' or shutil's traceback and left a partial folder: int8serve.json, a
model.safetensors or a tokenizer.model cut short. Run in-process, with the failures simulated (a chmod does not stop
the root user the tests may run as, and no test mounts a file system); a quantize stopped by a signal runs in a
subprocess.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError
from tests.fresh_cache import fresh_cache

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


@pytest.mark.parametrize("dst", ["loop", "loop/int8"])
def test_a_destination_through_a_symbolic_link_loop_is_refused_in_one_line(
        dst: str, stories_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ln -s loop loop`: resolving DST raised RuntimeError("Symlink loop from ..."), a traceback."""
    (tmp_path / "loop").symlink_to("loop")
    code, errors = quantize(capsys, stories_hf, tmp_path / dst)
    assert (code, len(errors)) == (2, 1), errors
    assert errors[0].startswith(f"int8serve quantize: error: DST {tmp_path / dst} cannot be resolved ("), errors
    assert "loop" in errors[0].removeprefix(f"int8serve quantize: error: DST {tmp_path / dst}"), errors
    assert errors[0].endswith("); choose another path"), errors
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


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


# quantize, its checkpoint's weights written, then waiting to be stopped (as a 7B's write of minutes would be)
STOPPED_IN_WRITING = """
import sys, time
from int8serve.engine import loader
write = loader.save_file
def write_then_wait(tensors, filename, *args, **kwargs):
    write(tensors, filename, *args, **kwargs)
    print("written", filename, file=sys.stderr, flush=True)
    time.sleep(300)
loader.save_file = write_then_wait
from int8serve.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(("dst", "stop"), [("int8", signal.SIGTERM), ("empty", signal.SIGTERM),
                                           ("int8", signal.SIGHUP)])
def test_a_quantize_stopped_by_sigterm_or_sighup_leaves_nothing(
        dst: str, stop: signal.Signals, stories_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """timeout, docker stop and systemd send SIGTERM, whose default action ends the process without unwinding: it left
    a hidden .partial-int8-<pid> beside DST, or a .partial-<pid> inside an empty DST, which a rerun then refused as a
    folder that already holds files while `ls` showed nothing."""
    out = tmp_path / "out"
    (out / "empty").mkdir(parents=True)
    before = listing(out)
    env = {**os.environ, "INT8SERVE_CACHE": str(fresh_cache(tmp_path / "cache"))}
    # the signal's default action in the child whatever the test runner inherited (under nohup SIGHUP is ignored,
    # and quantize keeps an ignored signal ignored: a CI run started with nohup saw the quantize finish)
    child = subprocess.Popen([sys.executable, "-c", STOPPED_IN_WRITING, "quantize", str(stories_hf), str(out / dst),
                              "--quantizer", "rtn"], stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=lambda: signal.signal(stop, signal.SIG_DFL))
    assert child.stderr is not None
    try:
        said = [next(line for line in child.stderr if line.startswith("written") or "Error" in line)]
        assert said[0].startswith(f"written {out}"), said
        child.send_signal(stop)
        said.append(child.stderr.read())
        assert child.wait(timeout=60) == 128 + stop, said
    finally:
        child.kill()
        child.wait()
    assert "Traceback" not in said[1]
    assert listing(out) == before
    assert quantize(capsys, stories_hf, out / dst) == (0, [])
    assert load_model(out / dst).tokenizer_path == out / dst / "tokenizer.model"


def ended_process() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_partial_folders_left_by_an_ended_quantize_are_removed_and_a_running_ones_named(
        stories_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A quantize ended by SIGKILL (or a crash) leaves its partial folder; the next one removes it once its process is
    gone, and names the folder of one still running rather than saying that an empty-looking DST holds files."""
    ended = ended_process()
    handler = signal.getsignal(signal.SIGTERM)
    beside, inside = tmp_path / f".partial-int8-{ended}", tmp_path / "empty" / f".partial-{ended}"
    for partial in (beside, inside):
        partial.mkdir(parents=True)
        (partial / "model.safetensors").write_bytes(b"half")
    for dst, partial in (("int8", beside), ("empty", inside)):
        main(["quantize", str(stories_hf), str(tmp_path / dst), "--quantizer", "rtn"])
        assert (f"removed {partial}, the partial checkpoint of a quantize that was stopped (process {ended})"
                in capsys.readouterr().err.splitlines())
    assert not beside.exists() and not inside.exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # quantize's own handler, for its duration only
    assert load_model(tmp_path / "empty").tokenizer_path == tmp_path / "empty" / "tokenizer.model"

    running = tmp_path / "running" / f".partial-{os.getpid()}"
    running.mkdir(parents=True)
    assert quantize(capsys, stories_hf, running.parent) == (2, [
        f"int8serve quantize: error: DST {running.parent} holds only {running.name}, the partial checkpoint of a "
        f"quantize still running (process {os.getpid()}): wait for it to end, or remove the folder if that process "
        "is no quantize"])
    assert running.is_dir()
