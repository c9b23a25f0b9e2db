"""Where int8serve keeps what it makes once, and the lock that lets one process make it.

The int8 copies of models, the compiled kernels and the built-in model live under one cache folder; a process that
writes one of them holds a lock beside it, so that two servers starting together do not write it twice. Plain
files and locks, no tensors: the command line finds the cache without importing torch. A cache that cannot be written
(read-only, full) costs each writer a warning, never the start: what it would have kept goes to a temporary folder
for this process (`scratch_folder`), or is made again at the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["cache_dir", "locked", "scratch_folder", "usual_mode"]

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$INT8SERVE_CACHE, else $XDG_CACHE_HOME/int8serve, else ~/.cache/int8serve."""
    if os.environ.get("INT8SERVE_CACHE"):
        return Path(os.environ["INT8SERVE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "int8serve"


@contextlib.contextmanager
def locked(folder: Path, doing: str = "writing the int8 copy") -> Iterator[None]:
    """An exclusive lock on `folder` (its `.lock` file beside it), across processes; waits, saying that another
    process is `doing` it, while another holds it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is %s %s; waiting for it", doing, folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def scratch_folder(what: str) -> Path:
    """A new temporary folder for what the cache could not keep (`what` names it), removed when the process ends:
    until then, files in it stay readable (a tokenizer read again, a library loaded)."""
    folder = Path(tempfile.mkdtemp(prefix=f"int8serve-{what}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def usual_mode(path: Path, executable: bool = False) -> None:
    """Give `path` the mode open() gives a new file (0666, 0777 if `executable`, less the umask), for a file made
    by a writer that makes it private (safetensors' save_file and mkstemp: 0600): a checkpoint quantized by one user
    can then be served by another."""
    path.chmod((0o777 if executable else 0o666) & ~_umask())


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (os.umask sets it: a race with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
