"""Connection limits for uvicorn: how many connections, which one goes when they are all taken, and how long a
client may take to send a request's headers or leave an answer unread.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) but not a client that opens a connection and
sends its headers a byte at a time (slowloris): such a connection is held for ever. `HeaderDeadlineProtocol` closes
a connection whose request headers are not complete `header_timeout` seconds after it opened, or after the previous
answer on it ended. The body has a deadline of its own (`RequestLimits.body_timeout`, answered 408/3007).

The number of open connections is bounded by a `ConnectionBudget` of `max_connections`, counted here rather than
with uvicorn's `limit_concurrency` (which let connections that never sent a byte take every place, and answered
everyone else a plain-text 503 that no log line or metric saw). A connection that comes when all are taken makes
room by closing an idle one, so that idle connections never keep anyone out:

1. the oldest connection that has not sent a whole request head yet (a flood of connections that send nothing
   closes itself, oldest first, and never the connections that real clients have already used);
2. else the keep-alive connection idle for the longest time, between two requests, once it has been idle for
   `KEEP_ALIVE_GRACE` seconds;
3. else (every connection has a request in progress, or had one less than `KEEP_ALIVE_GRACE` seconds ago) the
   newcomer is not counted: up to `REFUSALS` of them at once have `REFUSAL_TIMEOUT` seconds to send their request
   head, answered 429/3040 in the route's envelope with `Retry-After` (the lifecycle gate answers it, inside the
   request log and the metrics; probes and scrapes are answered as usual), and then closed; beyond those the
   newcomer is closed at once.

Neither rule closes a connection whose client has sent bytes the event loop has not read yet (they wait in the
kernel: a peek at the socket tells). A connection is idle from the moment its answer ends, and a client sends its
next request on it within milliseconds: closed with that request unread, the connection is reset, and the client
gets a transport error on a request (a POST) it cannot safely send again, then comes back on a new connection to
close another one. The grace keeps a connection whose next request is still on its way (the answer going out, the
request coming back), the peek one whose request has arrived; a request sent after a second of silence may still
meet the close, as it may meet uvicorn's `timeout_keep_alive` (5 s), which every HTTP client has to expect. One
window is left: a connection so new that its client has not sent its request yet, the oldest without a request
head when a newcomer comes (connections opening at once while every other one is busy), is closed, and that
request meets a reset. Sparing young connections would close it, but then a flood of silent connections faster
than `max_connections` in such a grace would keep every client out, where now a client's connection lasts until
`max_connections` newer ones have come.

A request that h11 (uvicorn's HTTP parser) refuses as malformed — its head (differing `Content-Length`s, no `Host`,
a line too long, ...) or its chunked body (a chunk size that is not one) — uvicorn answered with a plain-text 400 of
its own, outside the app: no envelope, request id, log line or metric, and a route reading that body saw its client
leave (408/3008 `aborted` in the log). `HeaderDeadlineProtocol.send_400_response` has the app answer it instead
(`framing.py`: 400/6003 in the route's envelope, `Connection: close`, counted and logged): a head with a request of
its own, made of its request line when that could be read (`REQUEST_LINE`, in the first `HEAD_SNAPSHOT_BYTES`
bytes of the head), else of no target (Workers AI's envelope, the route `unmatched`); a body by the route reading
it. Whatever the client sends after a refused request is not read: the connection closes after its answer.

A connection that has sent nothing needs no deadline shorter than `header_timeout`: it is the first to go when its
place is wanted, and until then it costs one file descriptor within the budget.

A connection also buffers at most `WRITE_BUFFER_BYTES` of answer that its client has not read before the answer
waits for it (asyncio's default is 64 KiB), so a client that stops reading holds little memory, and a stream
notices it soon (`streaming.py` cuts it, or bounds what waits for the connection: `UNSENT_ANSWER_BYTES`). Whatever
the answer, streamed or not, a connection whose unsent answer stays above that mark (the transport's writing
paused, until the client has read all but a quarter of it) for `stall_timeout` seconds is aborted, and so is one
closed with an answer still unsent `stall_timeout` seconds after the close: without it a client that sends
requests and never reads the answers (pipelined, or a single large one) held its connection for as long as it
liked. The stream's own deadline (one frame not handed over within the same `stall_timeout`) starts when a frame is
sent, so after the transport paused: this rule comes first, and the stream then ends as for a client that left
(its engine request cancelled, its row `aborted`), one warning for the two.

Every connection is a file descriptor. `raise_fd_limit` (at start) raises the process's soft limit on open files
to its hard limit and refuses to start when `fds_needed` (the connections, the refused ones, those accepted in one
go before they are counted, the Redis pool's bound `REDIS_CONNECTIONS`, and `RESERVED_FDS` for the rest) does not fit
in it, so that the server closes excess
connections itself before accept() runs out of descriptors. uvicorn accepts up to its backlog in one go, so the
backlog is `ACCEPT_BACKLOG`, not uvicorn's 2048. If accept() runs out all the same (other descriptors, a limit
lowered later), asyncio calls the loop's exception handler for every connection it tries, with a traceback each:
`ConnectionServer` logs one line every `WARNING_INTERVAL` seconds instead. asyncio also schedules a retry of
accept() a second later for every attempt that failed (`_start_serving`), and a retry that comes after the server
closed its socket (a SIGTERM within that second, its drain still running) raised "Invalid file descriptor: -1" with a
traceback each, up to the backlog's count: `ConnectionServer` lets such a retry do nothing
(`_skip_retries_once_closed`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import socket
import sys
import time
from typing import Any
from urllib.parse import unquote

import h11
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from .errors import ApiError
from .framing import MALFORMED_SCOPE_KEY, Malformed, malformed_request
from .policy.redis_state import REDIS_CONNECTIONS

__all__ = ["CLOSE_REASONS", "DEFAULT_HEADER_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "KEEP_ALIVE_GRACE",
           "OVER_LIMIT_SCOPE_KEY", "REDIS_CONNECTIONS", "REFUSALS", "RESERVED_FDS", "ConnectionBudget",
           "ConnectionServer", "FdLimitError", "HeaderDeadlineProtocol", "bytes_waiting", "fds_needed",
           "raise_fd_limit", "uvicorn_config"]

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_STALL_TIMEOUT = 30.0
WRITE_BUFFER_BYTES = 16 << 10
REFUSALS = 16  # connections beyond the limit waiting at once for their request head, to be answered 429
REFUSAL_TIMEOUT = 2.0  # seconds such a connection has to send its request head
KEEP_ALIVE_GRACE = 1.0  # seconds a keep-alive connection is idle before a newcomer may close it
OVER_LIMIT_SCOPE_KEY = "int8serve.over_connection_limit"  # in the scope of a request to answer 429/3040
WARNING_INTERVAL = 10.0  # seconds between two warnings of one kind (a flood would write one a connection)
ACCEPT_BACKLOG = 256  # the listen queue, and how many connections asyncio accepts in one go before they are counted
# descriptors besides the connections and Redis' (REDIS_CONNECTIONS, its pool's bound): ~15 at rest (stdio, the
# event loop, the listening socket, the log, the SQLite ledger and its spool, one per served model's weight file),
# the request worker's pipes, the PostgreSQL ledger's two pools (5 each at most), /proc files read by the metrics
RESERVED_FDS = 96
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"  # asyncio's message
# why connections are closed by the server, as `int8serve_connections_closed_total{reason}` counts them
CLOSE_REASONS = ("evicted", "over_limit", "header_timeout", "write_stalled")
INVALID_REQUEST_WARNING = "Invalid HTTP request received."  # uvicorn's (h11_impl.py), as it words it
HEAD_SNAPSHOT_BYTES = 8192  # of a request head being received, kept for its request line if h11 refuses the head
# a request line (after the empty lines RFC 9112 lets a server skip): method, target, HTTP version
REQUEST_LINE = re.compile(rb"(?:\r?\n)*([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/(1\.[01])\r?\n")


class _Occasional:
    """A warning logged at most once every `WARNING_INTERVAL` seconds, saying how many were left unsaid."""

    def __init__(self, message: str) -> None:
        self.message = message
        self._next = 0.0
        self._unsaid = 0

    def __call__(self, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._unsaid += 1
            return
        more = f" ({self._unsaid} more times since the last warning)" if self._unsaid else ""
        log.warning(self.message + more, *args)
        self._next, self._unsaid = now + WARNING_INTERVAL, 0


class ConnectionBudget:
    """The open connections of one server: at most `limit` counted, and which one to close for a new one (see the
    module docstring). Runs on the server's event loop; `closed` counts the connections closed by the server."""

    def __init__(self, limit: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self.limit = limit
        self._counted: set[HeaderDeadlineProtocol] = set()
        self._unheard: dict[HeaderDeadlineProtocol, None] = {}  # no whole request head yet: the oldest first
        # between two requests, and since when (`time.monotonic()`): the longest idle first
        self._between: dict[HeaderDeadlineProtocol, float] = {}
        self.refusing = 0  # connections beyond the limit, to be answered 429
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self._warn_evicted = _Occasional(f"at the connection limit ({limit}, --max-connections): closing idle "
                                         "connections for new ones")
        self._warn_full = _Occasional(f"every connection (--max-connections {limit}) has a request in progress "
                                      f"or had one less than {KEEP_ALIVE_GRACE:g} s ago: answering new connections "
                                      "429/3040, closing those beyond %d at once")
        self.warn_stalled = _Occasional("aborting a connection whose client left an answer unread for %s s "
                                        "(--stall-timeout)")

    @property
    def open(self) -> int:
        """Connections counted now."""
        return len(self._counted)

    def admit(self, conn: HeaderDeadlineProtocol) -> bool:
        """Count `conn`, a new connection, closing the idlest counted one if the limit is reached; False (`conn` not
        counted) if no counted connection may be closed (see the module docstring)."""
        if len(self._counted) >= self.limit:
            idlest = self._evictable(time.monotonic())
            if idlest is None:
                self._warn_full(REFUSALS)
                return False
            self.release(idlest)
            self.closed["evicted"] += 1
            self._warn_evicted()
            idlest.evict()
        self._counted.add(conn)
        self._unheard[conn] = None
        return True

    def _evictable(self, now: float) -> HeaderDeadlineProtocol | None:
        """The connection to close for a newcomer: the oldest without a whole request head, else the one idle the
        longest if for `KEEP_ALIVE_GRACE` seconds; never one whose client's bytes wait unread. None if there is none."""
        for conn in self._unheard:
            if not conn.has_unread_input():
                return conn
        for conn, since in self._between.items():
            if now - since < KEEP_ALIVE_GRACE:
                return None  # the others have been idle for less time still
            if not conn.has_unread_input():
                return conn
        return None

    def busy(self, conn: HeaderDeadlineProtocol) -> None:
        """`conn` has a request in progress: it is not closed for a newcomer."""
        self._unheard.pop(conn, None)
        self._between.pop(conn, None)

    def idle(self, conn: HeaderDeadlineProtocol) -> None:
        """`conn` answered its request and waits for the next: the newest of the idle ones."""
        if conn in self._counted:
            self._unheard.pop(conn, None)
            self._between.pop(conn, None)
            self._between[conn] = time.monotonic()

    def release(self, conn: HeaderDeadlineProtocol) -> None:
        """`conn` is closed (or closing): no longer counted."""
        self._counted.discard(conn)
        self.busy(conn)


def _over_limit(app: ASGIApp) -> ASGIApp:
    """`app`, told (in the scope) that the request came on a connection beyond the limit."""

    async def over_limit(scope: Scope, receive: Receive, send: Send) -> None:
        scope[OVER_LIMIT_SCOPE_KEY] = True
        await app(scope, receive, send)

    return over_limit


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, counted in `budget`, closing connections whose request headers take longer than
    `header_timeout` (see the module docstring)."""

    header_timeout = DEFAULT_HEADER_TIMEOUT
    stall_timeout = DEFAULT_STALL_TIMEOUT
    budget: ConnectionBudget  # the server's: `uvicorn_config` makes a subclass for it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None  # armed while the answer waits for the client
        self._seen_cycle: object = None
        self._over_limit = False
        # the request head being received, as h11 holds it (its first bytes), and the request before it
        self._head: tuple[object, bytes] = (None, b"")
        self._refused = False  # a request on this connection was refused as malformed: it closes after the answer

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
        if self.budget.admit(self):
            self._arm(self.header_timeout)
        elif self.budget.refusing < REFUSALS:  # answered 429 once its request head is in, then closed
            self._over_limit = True
            self.budget.refusing += 1
            self.app = _over_limit(self.app)
            self._arm(min(self.header_timeout, REFUSAL_TIMEOUT))
        else:
            self.budget.closed["over_limit"] += 1
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_watching_stall()
        self.budget.release(self)
        if self._over_limit:
            self._over_limit = False
            self.budget.refusing -= 1
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next request if it is in already (pipelined)
        if self.transport.is_closing():  # the answer said `Connection: close`
            self._watch_stall_if_unsent()
        elif self.cycle.response_complete:
            self.budget.idle(self)
            self._arm(self.header_timeout)  # the next request on this connection has the same deadline

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # else the connection closes once the refusal is answered: the rest is not read
            super().data_received(data)

    def handle_events(self) -> None:
        if self.conn.their_state is h11.IDLE:  # a request head is coming: h11 holds what has come of it so far
            self._head = (self.cycle, self.conn.trailing_data[0][:HEAD_SNAPSHOT_BYTES])
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._seen_cycle:  # a request's headers are complete
            self._seen_cycle = self.cycle
            self._head = (None, b"")
            _malformed(self.cycle.scope)  # before the app runs: the scope's copies share it
            self._disarm()
            self.budget.busy(self)
            if self._over_limit:
                self.cycle.keep_alive = False  # one answer, then closed

    def send_400_response(self, msg: str) -> None:
        """Have the app answer the request h11 refused (see the module docstring), not uvicorn's plain text. uvicorn
        calls this while it handles h11's error, which `sys.exc_info()` holds. The answer leans on uvicorn's
        internals (its request cycle); should another uvicorn version have moved them, uvicorn's own answer goes
        out, and a warning says why."""
        refusal = sys.exc_info()[1]
        try:
            self._refuse(str(refusal) if refusal is not None else msg)
        except Exception as err:  # any failure here must still answer the client
            _WARN_PLAIN_400(f"{type(err).__name__}: {err}")
            if not self.transport.is_closing():
                super().send_400_response(msg)

    def _refuse(self, reason: str) -> None:
        self._refused = True
        state = self.conn.our_state
        if state is h11.IDLE:  # a request head: the app has not seen this request
            self._answer_refused_head(malformed_request(reason, in_body=False))
        elif state is h11.SEND_RESPONSE:  # the body of a request the app has, which it has not answered yet
            self._refuse_body(malformed_request(reason, in_body=True))
        else:  # its answer is under way or sent: it cannot become a 400, the connection ends as for a client that left
            self.transport.close()

    def _refuse_body(self, error: ApiError) -> None:
        """The request being received ends with `error`: answered at once by an app that has not started on it
        yet, else raised from the route's next `receive` (woken now if it waits for the body)."""
        _malformed(self.cycle.scope).error = error
        self.cycle.keep_alive = False
        self.cycle.message_event.set()

    def _answer_refused_head(self, error: ApiError) -> None:
        """Answer `error` as the app's answer to a request of its own, as uvicorn starts one for a request head."""
        method, target, version = self._refused_request_line()
        raw_path, _, query_string = target.partition(b"?")
        scope = {"type": "http", "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
                 "http_version": version, "server": self.server, "client": self.client, "scheme": self.scheme,
                 "method": method, "root_path": self.root_path,
                 "path": self.root_path + unquote(raw_path.decode("ascii")),
                 "raw_path": self.root_path.encode("ascii") + raw_path, "query_string": query_string,
                 "headers": [], "state": self.app_state.copy(), MALFORMED_SCOPE_KEY: Malformed(error)}
        self.cycle = RequestResponseCycle(
            scope=scope, conn=self.conn, transport=self.transport, flow=self.flow,  # type: ignore[arg-type]
            logger=self.logger, access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            on_response=self.on_response_complete)
        self.cycle.keep_alive = False
        self.cycle.more_body = False
        self.cycle.message_event.set()  # its body is empty
        task = self.loop.create_task(self.cycle.run_asgi(self.app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _refused_request_line(self) -> tuple[str, bytes, str]:
        """The method, target and HTTP version of the request head h11 refused, if its request line could be read
        (`GET`, an empty target and 1.1 if not). A HEAD is answered as a GET: h11, which never read the request,
        frames the answer with its body."""
        before, head = self._head
        line = REQUEST_LINE.match(head) if before is self.cycle else None  # else h11 read on past that head
        if line is None:
            return "GET", b"", "1.1"
        method = line[1].decode("ascii")
        return "GET" if method == "HEAD" else method, line[2], line[3].decode("ascii")

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_stall_if_unsent()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.transport.is_closing():  # closing: what is left must still go within the deadline
            self._stop_watching_stall()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._watch_stall_if_unsent()

    def _watch_stall_if_unsent(self) -> None:
        if self._stall is None and self.transport.get_write_buffer_size():
            self._stall = self.loop.call_later(self.stall_timeout, self._abort_stalled)

    def _stop_watching_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _abort_stalled(self) -> None:
        self._stall = None
        self.budget.closed["write_stalled"] += 1
        self.budget.warn_stalled(self.stall_timeout)
        self.transport.abort()  # the answer is given up: its stream (if it is one) ends as for a client that left

    def has_unread_input(self) -> bool:
        """Bytes from the client wait in the kernel, not read yet: a request is coming in on this connection."""
        return bytes_waiting(self.transport.get_extra_info("socket"))

    def evict(self) -> None:
        """Close this idle connection for a new one (at once, if its client has not read its last answer)."""
        self._disarm()
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.logger.debug("closing a connection whose request headers took over %s s", self.header_timeout)
            self.budget.closed["header_timeout"] += 1
            self.transport.close()
            self._watch_stall_if_unsent()  # its last answer may still be going out


_WARN_PLAIN_400 = _Occasional("a request the HTTP parser refused was answered in uvicorn's plain text, not the API's "
                               "envelope (this uvicorn's internals differ from those int8serve was written for): %s")


def _malformed(scope: Any) -> Malformed:
    """The `Malformed` of the request of `scope` (an ASGI scope), put there if it is not yet."""
    malformed: Malformed = scope.setdefault(MALFORMED_SCOPE_KEY, Malformed())
    return malformed


def bytes_waiting(sock: Any) -> bool:
    """Bytes from the peer wait unread in `sock` (a socket, or the wrapper an asyncio transport hands out), by a
    non-blocking peek: asyncio's wrapper has no `recv`, so a socket object is made on its descriptor for the peek
    and detached, never closing it. False at the end of the input, and for a socket that is gone."""
    if sock is None:
        return False
    try:
        peek = socket.socket(fileno=sock.fileno())
    except (OSError, ValueError):  # closed already (its descriptor -1)
        return False
    try:
        return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing waiting (BlockingIOError), or reset: nothing left to answer
        return False
    finally:
        peek.detach()


class FdLimitError(Exception):
    """The process may not open the file descriptors its connection limit needs."""


def fds_needed(max_connections: int) -> int:
    """File descriptors a server of `max_connections` may hold at once (see the module docstring)."""
    return max_connections + REFUSALS + ACCEPT_BACKLOG + REDIS_CONNECTIONS + RESERVED_FDS


def raise_fd_limit(max_connections: int) -> int:
    """Raise the soft limit on open files to the hard one; the limit now. FdLimitError if `fds_needed` exceeds it."""
    needed = fds_needed(max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit of "unlimited" beyond the kernel's: as much as is needed
            wanted = max(soft, needed)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError):
                pass
    if soft != resource.RLIM_INFINITY and needed > soft:
        most = soft - fds_needed(0)
        fix = f"lower --max-connections to {most} or less" if most >= 1 else "--max-connections cannot help"
        raise FdLimitError(f"--max-connections {max_connections} needs up to {needed} open files ({REFUSALS} "
                           f"refused connections, {ACCEPT_BACKLOG} being accepted, {REDIS_CONNECTIONS} to Redis and "
                           f"{RESERVED_FDS} for the rest beside them), but this process may open {soft} (ulimit -n): "
                           f"raise the hard limit (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=) or {fix}")
    return soft


class ConnectionServer(uvicorn.Server):
    """uvicorn's server, logging accept()'s running out of file descriptors once every `WARNING_INTERVAL` seconds
    instead of a traceback for every connection it tries."""

    async def startup(self, sockets: list[Any] | None = None) -> None:
        loop = asyncio.get_running_loop()
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        warn = _Occasional(f"cannot accept new connections: %s (this process may open {limit} files, ulimit -n); "
                           "they wait in the listen queue")
        previous = loop.get_exception_handler()

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if context.get("message") == ACCEPT_OUT_OF_RESOURCES:
                warn(context.get("exception"))
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handle)
        _skip_retries_once_closed(loop)
        uvicorn_errors = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _AnsweredByTheApp) for f in uvicorn_errors.filters):
            uvicorn_errors.addFilter(_AnsweredByTheApp())
        await super().startup(sockets)


class _AnsweredByTheApp(logging.Filter):
    """Drops uvicorn's warning for each request its HTTP parser refuses (`Invalid HTTP request received.`, logged
    before `send_400_response`): the app answers that request and logs it as any request, so the warning only
    doubled the line, once per request a client could send by the thousand. If the app's answer cannot be made,
    `send_400_response` warns (`_WARN_PLAIN_400`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != INVALID_REQUEST_WARNING


def _skip_retries_once_closed(loop: asyncio.AbstractEventLoop) -> None:
    """Make `loop`'s retries of accept() (asyncio's selector loops schedule `_start_serving` a second after accept()
    ran out of descriptors) do nothing once the listening socket is closed, instead of raising on its fd of -1."""
    start_serving = getattr(loop, "_start_serving", None)
    if start_serving is None or getattr(start_serving, "skips_closed", False):  # another loop; or done already
        return

    def start_serving_if_open(protocol_factory: Any, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        if sock.fileno() == -1:  # the server closed while this retry waited
            return
        start_serving(protocol_factory, sock, *args, **kwargs)

    start_serving_if_open.skips_closed = True  # type: ignore[attr-defined]
    loop._start_serving = start_serving_if_open  # type: ignore[attr-defined]


def uvicorn_config(app: Any, *, host: str, port: int, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                   stall_timeout: float = DEFAULT_STALL_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                   connections: ConnectionBudget | None = None, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for `app` with int8serve's connection limits; `connections`: the budget to count them in
    (the one the metrics read), by default a new one of `max_connections`."""
    budget = connections if connections is not None else ConnectionBudget(max_connections)
    protocol = type("HeaderDeadline", (HeaderDeadlineProtocol,), {"header_timeout": header_timeout,
                                                                  "stall_timeout": stall_timeout, "budget": budget})
    options.setdefault("backlog", ACCEPT_BACKLOG)
    return uvicorn.Config(app, host=host, port=port, http=protocol, **options)
