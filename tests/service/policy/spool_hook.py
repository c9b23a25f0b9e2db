"""`int8serve serve` with its ledger spool instrumented, for `test_crash.py` (run as a script, not collected).

After every spool append has been fsynced, the request ids of the appended rows are added to the file named by
`INT8SERVE_TEST_SPOOL_MARKS` (one line each, fsynced too). While the file named by `INT8SERVE_TEST_SPOOL_HOLD`
exists, the append then never returns: the process stays between "the row is durable" and "the answer may leave",
where the test kills it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from int8serve.cli import main
from int8serve.service.policy.spool import FileSpool

_append = FileSpool.append


def _mark(request_ids: Sequence[str]) -> None:
    """Append `request_ids` to the marks file, durably."""
    fd = os.open(os.environ["INT8SERVE_TEST_SPOOL_MARKS"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, "".join(f"{rid}\n" for rid in request_ids).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def append_then_mark(self: FileSpool, rows: Sequence[dict[str, Any]]) -> None:
    """The real append (write + fsync), then the marks, then (when asked) a hold forever."""
    _append(self, rows)
    _mark([row["request_id"] for row in rows])
    hold = os.environ.get("INT8SERVE_TEST_SPOOL_HOLD")
    if hold and os.path.exists(hold):
        threading.Event().wait()


if __name__ == "__main__":
    FileSpool.append = append_then_mark  # type: ignore[method-assign]
    main()
