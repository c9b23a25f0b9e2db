"""The ledger's durable local spool: rows are on disk before a request is acknowledged, whatever the database does.

Every ledger row is first appended to `<data dir>/ledger-spool.jsonl` (one JSON object per line, then `fsync`),
and only then is the answer that it meters released. The ledger's flusher thread moves spooled rows into the
database in order, on its own, and takes them out of the spool once they are committed: it empties the file when
nothing is left, or replaces it (a new file, fsynced, renamed over the old one) with the rows still waiting. So:

* the database being slow, down or hung never delays or fails a request — rows wait in the spool and are
  replayed, in order, when it returns;
* a crash loses nothing that was acknowledged: the spool is replayed at the next start;
* replaying a row twice (a crash between the database commit and taking it out of the spool) is harmless, because
  rows are inserted idempotently on their request id.

A row the database refuses for its data (not an outage: a value it cannot store) is moved to the dead-letter file
next to the spool, `ledger-dead-letter.jsonl` — one JSON object per line, `{"row": ..., "reason": ..., "time": ...}`
— so that it cannot hold up the rows behind it. So is a line in the middle of the spool that is not JSON at all (a
damaged disk block, a bad hand edit): `read` gives it as an `UnreadableLine`, its bytes as they are, and the ledger
moves it to the dead-letter file as `{"line": ..., "reason": ..., "time": ...}` (`"line_base64"` instead of
`"line"` when its bytes are not UTF-8), byte for byte, for an operator to inspect.

The file is locked (`flock`) while a server uses it: two processes sharing a data directory is an error at start-up
rather than two writers interleaving one file. A torn last line (a crash in the middle of an append, which was
therefore never acknowledged) is dropped when the spool is opened.

An append that fails part way (a full disk, an I/O error) raises, so its rows are not acknowledged, and is undone
at once: the file is cut back to its size before the append, so that the next acknowledged row cannot be glued to
the torn bytes (and lost as an unreadable line at replay). If even that cut fails, every later append tries it
again first and raises while it fails: nothing is appended, nor acknowledged, after garbage. A failed append to the
dead-letter file is cut back the same way; entries after a torn line there (a crash, a cut that failed) start on
a new line.

A spool is not thread-safe: the ledger serialises its calls.

`MemorySpool` is the same interface in memory, for the embedded defaults that have no data directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from base64 import b64encode
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from int8serve.durable import fsync_folder

__all__ = ["DEAD_LETTER_FILE", "REPLACEMENT_SUFFIX", "FileSpool", "MemorySpool", "Spool", "SpoolLockedError",
           "UnreadableLine"]

log = logging.getLogger(__name__)

DEAD_LETTER_FILE = "ledger-dead-letter.jsonl"
REPLACEMENT_SUFFIX = ".new"  # `replace` writes the spool's next contents beside it, in `<spool>.new`


class SpoolLockedError(Exception):
    """Another process holds the spool: two servers were given the same data directory."""


@dataclass(frozen=True)
class UnreadableLine:
    """A whole line of the spool that is not JSON: damaged on disk or by hand, not torn by a crash (a torn last line
    is dropped when the spool is opened). Kept as its bytes, for the dead-letter file."""

    number: int  # from 1, in the spool as it was read
    data: bytes  # without its newline
    reason: str

    def dead_letter_entry(self) -> dict[str, Any]:
        """The line for the dead-letter file, byte for byte: as text when its bytes are UTF-8 (a JSON string gives
        them back exactly), else in base64."""
        try:
            kept = {"line": self.data.decode("utf-8")}
        except UnicodeDecodeError:
            kept = {"line_base64": b64encode(self.data).decode("ascii")}
        return {**kept, "reason": self.reason}


class Spool(Protocol):
    def append(self, rows: Sequence[dict[str, Any]]) -> None: ...

    def read(self) -> list[Any]: ...

    def clear(self) -> None: ...

    def replace(self, rows: Sequence[dict[str, Any]]) -> None: ...

    def dead_letter(self, entries: Sequence[dict[str, Any]]) -> None: ...

    @property
    def dead_letter_name(self) -> str: ...

    def close(self) -> None: ...


class MemorySpool:
    """Not durable: for the in-memory defaults only."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self.dead: list[dict[str, Any]] = []  # rows the database refused, with the reason

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        self._rows.extend(rows)

    def read(self) -> list[Any]:
        return list(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def replace(self, rows: Sequence[dict[str, Any]]) -> None:
        self._rows = list(rows)

    def dead_letter(self, entries: Sequence[dict[str, Any]]) -> None:
        self.dead.extend(entries)

    @property
    def dead_letter_name(self) -> str:
        return "memory"

    def close(self) -> None:
        pass


class FileSpool:
    """JSON lines appended with `fsync`; locked for this process."""

    def __init__(self, path: Path, dead_letter: Path | None = None) -> None:
        self.path = Path(path)
        self.dead_letter_path = Path(dead_letter) if dead_letter is not None else self.path.with_name(
            DEAD_LETTER_FILE)
        self._new = self.path.with_name(self.path.name + REPLACEMENT_SUFFIX)
        self._torn_at: int | None = None  # the size to cut the file back to: an append failed and is not undone yet
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise SpoolLockedError(f"{self.path} is in use by another int8serve process: give each server "
                                       "its own --data-dir") from None
            if _same_file(self._fd, self.path):
                break
            os.close(self._fd)  # the owner replaced the file between our open and our lock: open it again
        if created:
            fsync_folder(self.path.parent)
        self._new.unlink(missing_ok=True)  # a replacement a crash left unfinished: the spool itself is whole
        self._drop_torn_tail()

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append `rows` durably, or raise OSError with the file as it was (see the module docstring)."""
        self._undo_torn_append()
        size = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, _lines(rows))
            os.fsync(self._fd)
        except BaseException:
            self._torn_at = size  # whatever part of `rows` reached the file was never acknowledged
            try:
                self._undo_torn_append()
            except OSError as err:
                log.error("%s: cannot cut off a failed append (%s): no row is appended until it can be", self.path,
                          err)
            raise

    def read(self) -> list[Any]:
        """Each line's JSON value (blank lines skipped), or an `UnreadableLine` for a line that is not JSON (its
        reader moves it to the dead-letter file and says so)."""
        records: list[Any] = []
        for number, line in enumerate(self._contents().split(b"\n")[:-1], 1):  # whole lines: the tail was dropped
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as err:  # UnicodeDecodeError too
                records.append(UnreadableLine(number, line, f"line {number} is not JSON: {type(err).__name__}: "
                                                            f"{str(err)[:200]}"))
        return records

    def clear(self) -> None:
        _truncate(self._fd, 0)
        self._torn_at = None

    def replace(self, rows: Sequence[dict[str, Any]]) -> None:
        """The spool becomes `rows`, atomically: a new file, locked, written and fsynced, renamed over the old one.
        A crash at any point leaves either the old spool or the new one, whole."""
        fd = os.open(self._new, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked before it is the spool: no moment unlocked
            _write_all(fd, _lines(rows))
            os.fsync(fd)
            os.replace(self._new, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                self._new.unlink()
            raise
        old, self._fd = self._fd, fd
        self._torn_at = None  # the new file holds `rows` alone
        os.close(old)  # releases the old file's lock; it has no name any more
        fsync_folder(self.path.parent)

    def dead_letter(self, entries: Sequence[dict[str, Any]]) -> None:
        """Append `entries` to the dead-letter file, durably."""
        created = not self.dead_letter_path.exists()
        fd = os.open(self.dead_letter_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, _new_line(fd, size) + _lines(entries))
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):  # if the cut fails, the next entries start on a new line
                    _truncate(fd, size)
                raise
        finally:
            os.close(fd)
        if created:
            fsync_folder(self.dead_letter_path.parent)

    @property
    def dead_letter_name(self) -> str:
        return str(self.dead_letter_path)

    def close(self) -> None:
        if self._fd >= 0:
            try:  # else the next start drops the torn last line, but keeps any whole line of the failed append
                self._undo_torn_append()
            except OSError as err:
                log.error("%s: cannot cut off a failed append (%s)", self.path, err)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def _contents(self) -> bytes:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def _undo_torn_append(self) -> None:
        """Cut off what a failed append left, if anything; OSError while that cannot be done."""
        if self._torn_at is None:
            return
        _truncate(self._fd, self._torn_at)
        log.warning("%s: cut off a failed append (back to %d bytes)", self.path, self._torn_at)
        self._torn_at = None

    def _drop_torn_tail(self) -> None:
        data = self._contents()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: dropping a torn last line (%d bytes) left by a crash", self.path, len(data) - keep)
            _truncate(self._fd, keep)


def _lines(rows: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(_line(row) for row in rows)


def _line(row: dict[str, Any]) -> bytes:
    try:
        return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (a damaged row on its way to the dead-letter file): escaped
        return json.dumps(row, separators=(",", ":")).encode("ascii") + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _truncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)
    os.fsync(fd)


def _new_line(fd: int, size: int) -> bytes:
    """A newline if the file of `fd` (`size` bytes) ends in the middle of a line, so that what follows starts its
    own line; else nothing."""
    return b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


