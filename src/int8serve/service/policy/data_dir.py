"""The data directory: what a server keeps there, and that only the server's user can read it.

The files hold every account's usage (the SQLite ledger and its -wal, -shm and -journal files, the spool, its
replacement being written, the dead-letter file). int8serve creates the directory 0700 and each file 0600 — SQLite
gives a database's -wal, -shm and -journal files the mode of the database — but a directory or file that already
exists keeps its mode: one made by an older int8serve (default modes), by the operator, or by a restore from a
backup may let every local user read the ledger. `prepare_data_dir` therefore tightens them at start, before the
ledger or the spool opens a file, and says so in one warning line each:

* one of our files (by name) that this user owns and that others may use becomes 0600. It is changed through a
  descriptor opened without following a symbolic link: nothing else can be changed by a link planted in its place;
* the directory becomes 0700 if this user owns it and it holds only our files (a folder shared with other things
  is the operator's to change); otherwise the warning says what to run;
* a file of ours that is a symbolic link is used as it is (the ledger and the spool follow links, so an operator
  may keep them elsewhere) and never changed through the link: when its target is open to others, the warning
  says what to run. Files of other names are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import stat
from pathlib import Path

from .spool import DEAD_LETTER_FILE, REPLACEMENT_SUFFIX

__all__ = ["LEDGER_FILE", "OUR_FILES", "SPOOL_FILE", "owned_by_this_user", "prepare_data_dir"]

log = logging.getLogger(__name__)

LEDGER_FILE = "usage.sqlite3"
SPOOL_FILE = "ledger-spool.jsonl"
# everything a server writes in its data directory; SQLite's files besides the database: WAL mode's -wal and -shm,
# and -journal (rollback mode, before WAL mode is set on a new database)
OUR_FILES = (LEDGER_FILE, f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm", f"{LEDGER_FILE}-journal", SPOOL_FILE,
             SPOOL_FILE + REPLACEMENT_SUFFIX, DEAD_LETTER_FILE)
PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700
OTHERS = 0o077  # the group's and other users' permission bits


def prepare_data_dir(data_dir: Path) -> None:
    """Make `data_dir` (0700) if it is missing, and take other users' access to it and to our files in it away
    (see the module docstring). OSError if it cannot be made or a file cannot be changed."""
    data_dir.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
    _tighten_folder(data_dir)  # first: in a folder of ours made private, nobody else can swap a file meanwhile
    for name in OUR_FILES:
        _tighten_file(data_dir / name)


def owned_by_this_user(status: os.stat_result) -> bool:
    """May this process change the mode of what `status` describes (it is its user's)?"""
    return status.st_uid == os.geteuid()


def _tighten_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        mode = stat.S_IMODE(status.st_mode)
        if not mode & OTHERS:
            return
        command = f"`chmod {PRIVATE_FOLDER:o} {shlex.quote(str(folder))}`"
        if not owned_by_this_user(status):
            log.warning("%s is %s by others (%04o) and not this user's to change: run %s", folder, _access(mode),
                        mode, command)
        elif others := sorted(set(os.listdir(fd)) - set(OUR_FILES)):
            log.warning("%s is %s by others (%04o) and holds files besides int8serve's (%s): if only int8serve "
                        "uses it, run %s", folder, _access(mode), mode, ", ".join(others[:3]) +
                        (", ..." if len(others) > 3 else ""), command)
        else:
            os.fchmod(fd, PRIVATE_FOLDER)
            log.warning("%s was %s by others (%04o): now %04o", folder, _access(mode), mode, PRIVATE_FOLDER)
    finally:
        os.close(fd)


def _tighten_file(path: Path) -> None:
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(status.st_mode):
        _check_link(path)
    elif stat.S_ISREG(status.st_mode) and stat.S_IMODE(status.st_mode) & OTHERS:
        _tighten_regular_file(path)


def _tighten_regular_file(path: Path) -> None:
    # opened without following a link, and checked again on the descriptor: the file changed is the one checked
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        mode = stat.S_IMODE(status.st_mode)
        if not stat.S_ISREG(status.st_mode) or not mode & OTHERS:
            return
        if not owned_by_this_user(status):
            log.warning("%s is %s by others (%04o) and not this user's to change: run `chmod %o %s`", path,
                        _access(mode), mode, PRIVATE_FILE, shlex.quote(str(path)))
            return
        os.fchmod(fd, PRIVATE_FILE)
        log.warning("%s was %s by others (%04o): now %04o", path, _access(mode), mode, PRIVATE_FILE)
    finally:
        os.close(fd)


def _check_link(path: Path) -> None:
    """Say so when the file a link of ours leads to is open to others; change nothing through the link."""
    with contextlib.suppress(OSError):  # a link to nothing (yet): SQLite or the spool creates it 0600
        status = os.stat(path)
        mode = stat.S_IMODE(status.st_mode)
        if stat.S_ISREG(status.st_mode) and mode & OTHERS:
            target = os.path.realpath(path)
            log.warning("%s is a symbolic link to %s, which is %s by others (%04o): int8serve changes nothing "
                        "through a link; run `chmod %o %s`", path, target, _access(mode), mode, PRIVATE_FILE,
                        shlex.quote(target))


def _access(mode: int) -> str:
    """What others may do, in words: "readable", "readable and writable", ..."""
    granted = [word for word, bits in (("readable", 0o044), ("writable", 0o022)) if mode & bits]
    return " and ".join(granted) or "usable"
