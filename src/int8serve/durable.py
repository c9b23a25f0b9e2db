"""Durable writes: what a rename or a new file needs before a crash cannot undo it.

A file's bytes are made durable by fsyncing the file, but its *name* (a rename into place, a file just created) by
fsyncing the folder that holds it. The engine's caches (the kernel library and its record) and the service's ledger
spool both need the latter.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_folder"]


def fsync_folder(folder: Path) -> None:
    """Make the names in `folder` (renames, new files) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
