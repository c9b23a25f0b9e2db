"""The log handler follows sys.stderr: a line logged after stderr was replaced is written, not lost."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from int8serve.service.request_log import configure_logging


def test_a_line_logged_after_stderr_was_replaced_and_closed_reaches_the_new_stderr(
        monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("int8serve")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))  # restored after the test
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    at_setup = io.StringIO()
    monkeypatch.setattr(sys, "stderr", at_setup)
    configure_logging("text", "info")
    logging.getLogger("int8serve.request").info("first line")
    assert "first line" in at_setup.getvalue()
    at_setup.close()  # as a test's capture is closed when the test ends
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    monkeypatch.setattr(logging, "raiseExceptions", True)  # a failed write is reported on stderr, as by default
    logging.getLogger("int8serve.request").info("second line")
    written = later.getvalue().splitlines()
    assert len(written) == 1 and written[0].endswith("second line"), written  # not "--- Logging error ---"
