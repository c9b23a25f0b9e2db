"""The ledger's database deadlines (`deadline.py`) stay in force whatever a deadline asks for.

`serve --database-timeout 1e300` passed the settings, and its first piece of database work killed the one watchdog
thread of the process (`Condition.wait(1e300)`: "OverflowError: timestamp out of range for platform time_t", a
traceback on stderr); from then on no deadline fired, and a database that hung held the ledger's work forever. The
watchdog now waits at most `threading.TIMEOUT_MAX` at a time, so no deadline, however far, can end it.
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from int8serve.service.policy.deadline import DatabaseTimeoutError, deadline

WATCHDOG = "int8serve-db-deadline"


def _work_past_its_deadline(seconds: float, outcome: list[BaseException | None]) -> None:
    """Database work that runs past `seconds`: as a blocked driver call does once its socket is cut, it fails when
    the watchdog marks it expired (or, if the watchdog never does, gives up after a few seconds)."""
    try:
        with deadline(seconds) as work:
            given_up = time.monotonic() + seconds + 5.0
            while not work.expired and time.monotonic() < given_up:
                time.sleep(0.01)
            raise ConnectionError("server closed the connection unexpectedly")
    except Exception as err:
        outcome.append(err)


@pytest.mark.parametrize("seconds", [1e300, math.inf])
def test_a_deadline_beyond_any_wait_leaves_the_watchdog_running(seconds: float) -> None:
    with deadline(seconds) as far:
        time.sleep(0.2)  # the watchdog waits for the far deadline alone
        outcome: list[BaseException | None] = []
        worker = threading.Thread(target=_work_past_its_deadline, args=(0.2, outcome))
        worker.start()
        worker.join(timeout=10)
        assert not far.expired
    assert [thread.name for thread in threading.enumerate()].count(WATCHDOG) == 1
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], DatabaseTimeoutError), outcome
    assert str(outcome[0]) == "no answer from the database within 0.2 s"


def test_a_deadline_of_no_number_of_seconds_is_refused_where_it_is_asked() -> None:
    """NaN is no time: the watchdog would wait on it without waiting (a busy loop), and never end that work."""
    with pytest.raises(ValueError, match="a database deadline is a number of seconds, got nan"), deadline(math.nan):
        pass
    outcome: list[BaseException | None] = []
    _work_past_its_deadline(0.1, outcome)
    assert len(outcome) == 1 and isinstance(outcome[0], DatabaseTimeoutError), outcome
