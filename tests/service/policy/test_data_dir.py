"""A data directory that exists already — made by an older int8serve with default modes, by the operator, restored
from a backup — is made the server's user's alone at start: our files that others may read become 0600, the
directory 0700, with one warning line each; what is not ours to change is named with the command to run."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from tests.file_modes import modes

from int8serve.service.policy import Policy, PolicySettings, UsageRow
from int8serve.service.policy.ledger import utc_now
from int8serve.service.policy.policy import LEDGER_FILE, SPOOL_FILE
from int8serve.service.policy.spool import DEAD_LETTER_FILE

from ..conftest import MODEL

LOGGER = "int8serve.service.policy.data_dir"


def _start(data_dir: Path) -> None:
    """Start a policy on `data_dir`, meter one request and stop."""
    policy = Policy.build(PolicySettings(data_dir=data_dir))
    try:
        asyncio.run(policy.ledger.record(UsageRow("r0", utc_now(), "acct", MODEL, 10, 5, 2.754, False, "ok", 1.0)))
        assert policy.ledger.flush()
    finally:
        policy.close()


def _start_logged(data_dir: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """`_start`, and the warning lines about the data directory's modes it logged."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _start(data_dir)
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _as_an_older_version_left_it(data_dir: Path, *others: str) -> None:
    """A ledger with a row, left with default modes (0755, 0644), as older versions made it, plus a crash's -wal and
    -shm files, a dead-letter file and files of `others` names."""
    _start(data_dir)
    for name in (f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm", DEAD_LETTER_FILE, *others):
        (data_dir / name).touch()
    for path in data_dir.iterdir():
        path.chmod(0o644)
    data_dir.chmod(0o755)


@pytest.mark.usefixtures("umask_022")
def test_an_open_data_dir_and_its_files_become_private_at_start(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """0755 and 0644 from before: 0700 and 0600 after the start, one warning line each, and the ledger is the same."""
    data_dir = tmp_path / "data"
    _as_an_older_version_left_it(data_dir)
    said = _start_logged(data_dir, caplog)
    assert modes(data_dir) == {".": "700", **{name: "600" for name in modes(data_dir) if name != "."}}
    assert {LEDGER_FILE, SPOOL_FILE, DEAD_LETTER_FILE} <= set(modes(data_dir))
    assert said == [f"{data_dir} was readable by others (0755): now 0700"] + [
        f"{data_dir / name} was readable by others (0644): now 0600"
        for name in (LEDGER_FILE, f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm", SPOOL_FILE, DEAD_LETTER_FILE)]


def test_writable_by_the_group_is_said_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    _start(data_dir)
    (data_dir / SPOOL_FILE).chmod(0o620)
    said = _start_logged(data_dir, caplog)
    assert said == [f"{data_dir / SPOOL_FILE} was writable by others (0620): now 0600"]
    assert modes(data_dir)[SPOOL_FILE] == "600"


def test_files_of_other_names_are_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not ours: neither they nor the folder that holds them change; the warning says what to run."""
    data_dir = tmp_path / "data"
    _as_an_older_version_left_it(data_dir, "notes.txt", "usage.sqlite3.bak")
    said = _start_logged(data_dir, caplog)
    after = modes(data_dir)
    assert (after["."], after["notes.txt"], after["usage.sqlite3.bak"], after[LEDGER_FILE]) == ("755", "644", "644",
                                                                                               "600")
    assert said[0] == (f"{data_dir} is readable by others (0755) and holds files besides int8serve's (notes.txt, "
                       f"usage.sqlite3.bak): if only int8serve uses it, run `chmod 700 {data_dir}`")


def test_what_is_not_this_users_is_named_with_the_command_to_run(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's folder and files (simulated: the tests may run as root) keep their modes."""
    data_dir = tmp_path / "data"
    _as_an_older_version_left_it(data_dir)
    monkeypatch.setattr("int8serve.service.policy.data_dir.owned_by_this_user", lambda _status: False)
    said = _start_logged(data_dir, caplog)
    after = modes(data_dir)
    assert (after["."], after[LEDGER_FILE], after[DEAD_LETTER_FILE]) == ("755", "644", "644")
    assert said[0] == (f"{data_dir} is readable by others (0755) and not this user's to change: run "
                       f"`chmod 700 {data_dir}`")
    assert said[1] == (f"{data_dir / LEDGER_FILE} is readable by others (0644) and not this user's to change: run "
                       f"`chmod 600 {data_dir / LEDGER_FILE}`")
    assert len(said) == 6  # the ledger, its -wal and -shm, the spool, the dead-letter file


def test_a_link_is_used_but_nothing_is_changed_through_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ledger kept elsewhere by a symbolic link: its target keeps its mode (a link could lead anywhere), the
    warning names it and the command to run."""
    data_dir, elsewhere = tmp_path / "data", tmp_path / "disk" / "ledger.sqlite3"
    _start(tmp_path / "disk")
    (tmp_path / "disk" / LEDGER_FILE).rename(elsewhere)
    elsewhere.chmod(0o644)
    data_dir.mkdir(mode=0o700)
    (data_dir / LEDGER_FILE).symlink_to(elsewhere)
    said = _start_logged(data_dir, caplog)
    assert modes(tmp_path / "disk")["ledger.sqlite3"] == "644"
    assert said == [f"{data_dir / LEDGER_FILE} is a symbolic link to {elsewhere}, which is readable by "
                             f"others (0644): int8serve changes nothing through a link; run `chmod 600 {elsewhere}`"]


def test_a_private_data_dir_says_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    _as_an_older_version_left_it(data_dir)
    _start(data_dir)
    said = _start_logged(data_dir, caplog)
    assert said == []
