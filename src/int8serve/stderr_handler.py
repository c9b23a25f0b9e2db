"""The log handler of every int8serve command: stderr as it is when a line is logged.

`logging.StreamHandler(sys.stderr)` keeps the stream it was given. When stderr is replaced later (a process manager
redirecting it, a test capturing it and closing the capture afterwards), a server thread that logs a request's line
after that fails with "I/O operation on closed file" and the line is lost. This handler looks `sys.stderr` up at each
record, as Python's own last-resort handler does.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

__all__ = ["StderrHandler"]


class StderrHandler(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when a record comes, not the one it was made with: a line
    logged after stderr was replaced (a process manager's redirection, a test's capture that has since closed) goes
    to the current stream instead of failing with "I/O operation on closed file"."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass
