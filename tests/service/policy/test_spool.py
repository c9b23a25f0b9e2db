"""A spool append that fails part way (a full disk) must leave nothing behind: its rows were not acknowledged, and
the torn bytes would otherwise glue the NEXT acknowledged row into an unreadable line, lost at replay. The same for
the dead-letter file. The failures are real partial writes: a file-size limit (RLIMIT_FSIZE, in a subprocess, as a
full disk would) and a write that stops half way. A whole line of the spool that is not JSON (not a torn last line)
is dead-lettered at replay, byte for byte."""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from int8serve.service.policy import spool as spool_module
from int8serve.service.policy.ledger import Ledger, UsageRow, make_database, utc_now
from int8serve.service.policy.spool import DEAD_LETTER_FILE, FileSpool

from ..conftest import MODEL

# A ledger whose database is away (a SQLite file in a folder that does not exist), so rows stay in the spool; the
# file-size limit then makes the append of row 2 fail 40 bytes in, as a full disk would. Prints the ids acknowledged.
FULL_DISK_SCRIPT = textwrap.dedent("""
    import asyncio, json, resource, signal, sys
    from pathlib import Path
    from int8serve.service.policy.ledger import Ledger, UsageRow, make_database, utc_now
    from int8serve.service.policy.spool import FileSpool

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE a write fails with EFBIG, like ENOSPC
    spool = Path(sys.argv[1])
    database = make_database(f"sqlite:///{spool.parent / 'missing' / 'usage.sqlite3'}", 1.0)

    def row(n):
        return UsageRow(f"row-{n}", utc_now(), "acct-a", "m", 10, n, 1.5, False, "ok", 3.0)

    async def main():
        ledger = Ledger(database, FileSpool(spool), timeout=1.0, spool_name=str(spool)).start()
        acknowledged = []
        for n in (1, 2, 3, 4):
            limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            if n == 2:
                resource.setrlimit(resource.RLIMIT_FSIZE, (spool.stat().st_size + 40, limits[1]))
            try:
                await ledger.record(row(n))
                acknowledged.append(f"row-{n}")
            except Exception as err:
                print(f"row {n} refused: {err}", file=sys.stderr)
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        ledger.close(timeout=1.0)
        print(json.dumps(acknowledged))

    asyncio.run(main())
""")


def _row(request_id: str) -> dict:
    return UsageRow(request_id, utc_now(), "acct-a", MODEL, 10, 5, 2.754, False, "ok", 12.5).to_json()


def _ids(path: Path) -> list[str]:
    spool = FileSpool(path)
    try:
        return [r["request_id"] for r in spool.read()]
    finally:
        spool.close()


def _half_then_full_disk(fd: int, data: bytes) -> None:
    """A write that stops half way: the first half reaches the file, then the disk is full."""
    os.write(fd, data[:len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def _failing_truncate(fd: int, size: int) -> None:
    """A disk that cannot even cut a file back."""
    raise OSError(errno.EIO, "Input/output error")


def test_every_acknowledged_row_is_replayed_after_an_append_failed_on_a_full_disk(tmp_path: Path) -> None:
    spool = tmp_path / "ledger-spool.jsonl"
    done = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(spool)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert "row 2 refused" in done.stderr  # neither the spool nor the database took it: not acknowledged
    acknowledged = json.loads(done.stdout)
    assert acknowledged == ["row-1", "row-3", "row-4"]
    assert spool.read_bytes().count(b"\n") == 3 and spool.read_bytes().endswith(b"\n")  # no torn line left
    ledger = Ledger(make_database("sqlite://"), FileSpool(spool))
    assert [s.row.request_id for s in ledger._unflushed] == acknowledged
    ledger.close(timeout=1.0)


def test_a_partial_append_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger-spool.jsonl"
    spool = FileSpool(path)
    spool.append([_row("r1")])
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(spool_module, "_write_all", _half_then_full_disk)
        with pytest.raises(OSError):
            spool.append([_row("r2"), _row("r3")])
    assert path.read_bytes() == before  # not even the whole line of r2: the batch was not acknowledged
    spool.append([_row("r4")])
    spool.close()
    assert _ids(path) == ["r1", "r4"]


def test_no_row_is_appended_after_a_torn_append_that_cannot_be_cut_off(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger-spool.jsonl"
    spool = FileSpool(path)
    spool.append([_row("r1")])
    before = path.read_bytes()
    real_truncate = spool_module._truncate
    monkeypatch.setattr(spool_module, "_truncate", _failing_truncate)
    with monkeypatch.context() as patch:
        patch.setattr(spool_module, "_write_all", _half_then_full_disk)
        with pytest.raises(OSError):
            spool.append([_row("r2")])
    torn = path.read_bytes()
    assert torn.startswith(before) and len(torn) > len(before)
    with pytest.raises(OSError):  # refused, so never acknowledged behind the torn bytes
        spool.append([_row("r3")])
    assert path.read_bytes() == torn
    monkeypatch.setattr(spool_module, "_truncate", real_truncate)  # the disk works again
    spool.append([_row("r4")])
    assert path.read_bytes().startswith(before)
    spool.close()
    assert _ids(path) == ["r1", "r4"]


def test_replacing_the_spool_ends_a_pending_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger-spool.jsonl"
    spool = FileSpool(path)
    with monkeypatch.context() as patch:
        patch.setattr(spool_module, "_truncate", _failing_truncate)
        patch.setattr(spool_module, "_write_all", _half_then_full_disk)
        with pytest.raises(OSError):
            spool.append([_row("r1")])
    spool.replace([_row("r0")])  # a new file, with the rows waiting alone: nothing is left to cut off
    spool.append([_row("r2")])
    spool.close()
    assert _ids(path) == ["r0", "r2"]


def test_a_partial_dead_letter_is_cut_off_and_entries_start_on_their_own_line(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spool = FileSpool(tmp_path / "ledger-spool.jsonl")
    dead = tmp_path / DEAD_LETTER_FILE
    spool.dead_letter([{"row": _row("d1"), "reason": "r"}])
    before = dead.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(spool_module, "_write_all", _half_then_full_disk)
        with pytest.raises(OSError):
            spool.dead_letter([{"row": _row("d2"), "reason": "r"}])
    assert dead.read_bytes() == before
    with dead.open("ab") as f:
        f.write(b'{"row": {"request_id": "torn')  # a crash in the middle of an entry
    spool.dead_letter([{"row": _row("d3"), "reason": "r"}])
    spool.close()
    lines = dead.read_bytes().splitlines()
    assert json.loads(lines[0])["row"]["request_id"] == "d1" and lines[1] == b'{"row": {"request_id": "torn'
    assert json.loads(lines[2])["row"]["request_id"] == "d3" and len(lines) == 3


DAMAGED_LINES = [  # whole lines in the middle of a spool that are not JSON: a bad hand edit, a damaged disk block
    b'{"request_id": "half-edited", ',
    b"\x00" * 12,  # a block of zeros, as a file system may leave after a power loss
    b'{"request_id": "caf\xe9"}\r',  # Latin-1, not UTF-8; a carriage return is part of the line
]


def test_a_line_that_is_not_json_is_dead_lettered_byte_for_byte_at_replay(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A line in the middle of the spool that is not JSON goes to the dead-letter file as it is (skipped, it would be
    lost at the spool's next rewrite), said once in the log; the rows around it are written. A torn last line (a
    crash in the middle of an append, never acknowledged) is still dropped, and not dead-lettered."""
    caplog.set_level(logging.WARNING)
    path = tmp_path / "ledger-spool.jsonl"
    whole = [json.dumps(_row("ok-1")).encode(), *DAMAGED_LINES, json.dumps(_row("ok-2")).encode()]
    path.write_bytes(b"\n".join(whole) + b'\n{"request_id": "torn')
    ledger = Ledger(make_database(f"sqlite:///{tmp_path / 'usage.sqlite3'}"), FileSpool(path),
                    spool_name=str(path))
    try:
        assert [s.row.request_id for s in ledger._unflushed] == ["ok-1", "ok-2"]
        assert ledger.rejected == len(DAMAGED_LINES)
        assert _ids_in(path) == ["ok-1", "ok-2"]  # the spool holds the rows alone already
        dead = [json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_bytes().splitlines()]
        kept = [entry["line"].encode() if "line" in entry else base64.b64decode(entry["line_base64"])
                for entry in dead]
        assert kept == DAMAGED_LINES
        assert [entry["reason"].split(":")[0] for entry in dead] == ["line 2 is not JSON", "line 3 is not JSON",
                                                                      "line 4 is not JSON"]
        assert "line" in dead[0] and "line_base64" in dead[2] and all("time" in entry for entry in dead)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == len(DAMAGED_LINES)
        assert all("unreadable ledger row" in e and DEAD_LETTER_FILE in e for e in errors)
        assert sum("torn last line" in r.getMessage() for r in caplog.records) == 1
        ledger.create_schema()
        assert ledger.flush(timeout=10) and path.read_bytes() == b""
    finally:
        ledger.close()


def _ids_in(path: Path) -> list[str]:
    """The request ids of the spool file's lines, read as they are (the spool is locked by its ledger)."""
    return [json.loads(line)["request_id"] for line in path.read_bytes().splitlines()]
