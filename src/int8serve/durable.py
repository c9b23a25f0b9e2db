"""Durable writes: what a rename or a new file needs before a crash cannot undo it.

A file's bytes are made durable by fsyncing the file, but its *name* (a rename into place, a file just created) by
fsyncing the folder that holds it. The engine's caches (the kernel library and its record, the model cache's
copies) and the service's ledger spool all need them.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_file", "fsync_folder", "replace_durably"]


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
