"""Durable writes: what a rename or a new file needs before a crash cannot undo it.

A file's bytes are made durable by fsyncing the file, but its *name* (a rename into place, a file just created) by
fsyncing the folder that holds it. The engine's caches (the kernel library and its record, the model cache's
copies) and the service's ledger spool all need them. A folder of files (an int8 checkpoint: `quantize`, the model
cache) is written whole or not at all by `write_whole`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync_file", "fsync_folder", "partial_folders", "process_alive", "replace_durably", "write_whole"]


def fsync_file(path: Path) -> None:
    """Make the bytes of the file at `path` durable."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Make the names in `folder` (renames, new files) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(written: Path, target: Path) -> None:
    """Rename `written` to `target` once its bytes are on disk, then sync the folder so that the rename is too."""
    fsync_file(written)
    os.replace(written, target)
    fsync_folder(target.parent)


def write_whole(folder: Path, write: Callable[[Path], object], make_room: Callable[[Path], object] | None = None
                ) -> None:
    """Write the folder `folder` whole or not at all: `write(partial)` fills a new folder, whose files are made
    durable and then take `folder`'s place. On any error (an interruption too: Ctrl-C, or SIGTERM and SIGHUP where the
    caller turns them into SystemExit, as `quantize` does) what was written is removed, with the folders above
    `folder` made for it, and the error raised: nothing is left half written. A process ended without unwinding
    (SIGKILL, a signal left to its default action, a crash) leaves its partial folder: `partial_folders` finds it.

    The partial folder lies beside `folder` and is renamed to it (one rename, on one file system); a `folder` already
    there is handed to `make_room` first (the model cache moves its old copy aside). Without `make_room`, `folder` may
    be an existing empty folder, which is kept (a mount point, say, which no rename can replace): the partial folder
    is then made inside it and its files moved up."""
    made = _make_parents(folder.parent)
    try:
        if make_room is None and folder.is_dir():
            _fill(folder, write)
        else:
            _write_beside(folder, write, make_room)
    except BaseException:
        for parent in made:  # deepest first; one that holds something now is not ours alone
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def partial_folders(folder: Path) -> list[tuple[Path, int]]:
    """The partial folders that writes of `folder` (write_whole) have left, each with the id of the process that made
    it: `.partial-<name>-<pid>` beside `folder`, `.partial-<pid>` inside it."""
    patterns = [(folder.parent, re.compile(rf"\.partial-{re.escape(folder.name)}-(\d+)")),
                (folder, re.compile(r"\.partial-(\d+)"))]
    found = []
    for where, pattern in patterns:
        if where.is_dir():
            found += [(entry, int(match[1])) for entry in sorted(where.iterdir())
                      if (match := pattern.fullmatch(entry.name)) and entry.is_dir() and not entry.is_symlink()]
    return found


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs (perhaps another user's); a reused id counts as running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def _make_parents(folder: Path) -> list[Path]:
    """Make `folder` and the folders above it that are missing; the ones made, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if missing:
        missing[0].mkdir(parents=True, exist_ok=True)
    return missing


def _write_beside(folder: Path, write: Callable[[Path], object], make_room: Callable[[Path], object] | None) -> None:
    partial = folder.with_name(f".partial-{folder.name}-{os.getpid()}")
    try:
        write(partial)
        _fsync_files(partial)
        if make_room is not None and folder.exists():
            make_room(folder)
        os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _fill(folder: Path, write: Callable[[Path], object]) -> None:
    """`write` into a partial folder inside the empty `folder`, then its files moved up (never over a file there)."""
    partial = folder / f".partial-{os.getpid()}"
    moved: list[Path] = []
    try:
        write(partial)
        _fsync_files(partial)
        for file in sorted(partial.iterdir()):
            target = folder / file.name
            if target.exists():
                raise FileExistsError(f"{target} appeared while the folder was written")
            os.rename(file, target)
            moved.append(target)
    except BaseException:
        for target in moved:
            target.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _fsync_files(folder: Path) -> None:
    for file in folder.iterdir():
        fsync_file(file)
