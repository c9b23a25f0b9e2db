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
    """A StreamHandler whose stream is `sys.stderr` at each record (see the module's docstring)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass
