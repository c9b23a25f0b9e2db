"""Request work that must not slow the engine: parsing, checking and tokenizing bodies, off the event loop.

The engine's steps and the event loop run Python in this process, so whatever else holds the GIL stretches every
token: parsing 1 MiB of JSON holds it for 10-25 ms, tokenizing a million characters for ~300 ms, and twenty hostile
clients sending such bodies back to back would hold it all the time. So, by size:

* small bodies (up to `inline_bytes`) and prompts (up to `inline_chars` rendered characters) are handled in a thread
  of this process: microseconds of work, and the event loop never waits for them;
* larger ones go to a worker process that runs only when the CPU has nothing else to do (SCHED_IDLE; nice 19
  where that is refused): it takes neither the GIL of this process nor time from the engine. Each account has at
  most one body there at a time, so a flood from one account waits behind itself, not in front of the others.

No request that fits the context window needs the worker: 2,048 tokens are ~8,000 characters of text, far below
both thresholds. What reaches it is oversized or hostile, and it gets the CPU's leftovers: measured on stories260K
(`benchmarks/hostile.py`, docs/benchmarks.md), 20 clients sending 1 MiB bodies back to back stretch a concurrent
stream's token gaps by 6-19% and leave `/healthz` at a p99 of ~10 ms, where parsing them in a thread of this
process had stretched the gaps tenfold.

The worker process is started on first use (spawned, never forked from this multi-threaded process) with the
served cards and tokenizer files; if it dies it is started again and the request it held fails (500/3043). When
it cannot be started for want of file descriptors (its pipes: the process is at its limit on open files), the
request is answered 429/3040 with `Retry-After`, as the server's other capacity refusals are, and one line is
logged. It is ours, one process and two pipes (`_WorkerProcess`), rather than a `ProcessPoolExecutor`: a pool's
worker killed while it writes a result larger than the pipe's buffer (a checked 1 MiB body is one) leaves the pool's
manager thread blocked for ever on the half-written message, the pool never marked broken, every later large body
hanging and the interpreter's exit too. Here this process holds only the reading end of the results' pipe, so a
worker's death is an end of file at once, whatever it was writing.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from int8serve.catalog.card import ModelCard
from int8serve.engine.chat_template import Control
from int8serve.engine.tokenizer import AnyTokenizer, load_tokenizer

from .errors import CAPACITY, INTERNAL, NO_SUCH_MODEL, ApiError
from .formats import WireFormat
from .protocol.body import parse_json_body
from .protocol.run import RunRequest, ValidatedRun, tokenize_run

__all__ = ["Checked", "RequestWorkers", "Resolver"]

log = logging.getLogger(__name__)

T = TypeVar("T")
INLINE_BYTES = 64 << 10
INLINE_CHARS = 16 << 10
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)  # this process's limit on open files, or the system's


@dataclass(frozen=True)
class Resolver:
    """Model names → served cards (the catalog's other names answer "not served here")."""

    served: Mapping[str, ModelCard]
    catalog: frozenset[str]

    def __call__(self, name: str) -> ModelCard:
        if name not in self.catalog:
            raise ApiError(NO_SUCH_MODEL, model=name, note="")
        if name not in self.served:
            raise ApiError(NO_SUCH_MODEL, model=name, note=" (the model is in the catalog but not served here)")
        return self.served[name]


@dataclass(frozen=True)
class Checked:
    """A body parsed and checked for its model; `fmt` is the wire format that parsed it (it may hold the parsed
    body, e.g. OpenAI's request), `prompt` the body's prompt or messages when the operator logs prompts."""

    fmt: WireFormat
    model: str
    run: ValidatedRun
    prompt: Any = None


def check_body(resolve: Resolver, fmt: WireFormat, raw: bytes, model: str | None, keep_prompt: bool) -> Checked:
    """Bytes → JSON → the model's card → a `ValidatedRun` (raises ApiError)."""
    body = parse_json_body(raw)
    name = model if model is not None else fmt.model_in_body(body)
    try:
        run = fmt.validate(body, resolve(name))
    except ApiError as err:
        err.fields.setdefault("model", name)  # the request log and the rate-limit headers want it
        raise
    prompt = body.get("prompt", body.get("messages")) if keep_prompt and isinstance(body, dict) else None
    return Checked(fmt, name, run, prompt)


class RequestWorkers:
    """Where request bodies are checked and tokenized (see the module docstring)."""

    def __init__(self, resolve: Resolver, tokenizers: Mapping[str, AnyTokenizer], *, threads: int = 2,
                 inline_bytes: int = INLINE_BYTES, inline_chars: int = INLINE_CHARS, keep_prompts: bool = False
                 ) -> None:
        self.resolve = resolve
        self.tokenizers = dict(tokenizers)
        self.inline_bytes = inline_bytes
        self.inline_chars = inline_chars
        self.keep_prompts = keep_prompts
        self._threads = anyio.CapacityLimiter(threads)
        self._worker: _WorkerProcess | None = None
        self._worker_turn = anyio.CapacityLimiter(1)  # one call at a time in the worker; the others wait here
        self._swap = threading.Lock()  # guards `_worker`, set by calls (threads) and `close` (the event loop)
        self._gates: dict[str, asyncio.Semaphore] = {}

    async def check(self, account: str, fmt: WireFormat, raw: bytes, model: str | None) -> Checked:
        if len(raw) <= self.inline_bytes:
            return await anyio.to_thread.run_sync(check_body, self.resolve, fmt, raw, model, self.keep_prompts,
                                                  limiter=self._threads)
        return await self._in_process(account, _check_in_worker, fmt, raw, model, self.keep_prompts)

    async def tokenize(self, account: str, model: str, run: ValidatedRun, window: int) -> RunRequest:
        if sum(len(s) for s in run.segments if not isinstance(s, Control)) <= self.inline_chars:
            return await anyio.to_thread.run_sync(tokenize_run, run, self.tokenizers[model], window,
                                                  limiter=self._threads)
        return await self._in_process(account, _tokenize_in_worker, model, run, window)

    def close(self) -> None:
        self._discard(self._worker)

    def _discard(self, worker: _WorkerProcess | None) -> bool:
        """Stop `worker` and forget it, if it is still the current one (the server's shutdown, on the event loop,
        and a call that found it dead, in a thread, may both try); False if it was not."""
        with self._swap:
            if worker is None or worker is not self._worker:
                return False
            self._worker = None
        worker.stop()
        return True

    async def _in_process(self, account: str, work: Callable[..., T], *args: Any) -> T:
        gate = self._gates.setdefault(account, asyncio.Semaphore(1))
        async with gate:
            # not cancellable while the worker has the call: the pipes stay in step (the call ends on its own)
            return await anyio.to_thread.run_sync(self._call, work, args, limiter=self._worker_turn)

    def _call(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        worker = self._started()
        try:
            ok, value = worker.call(work, args)
        except (EOFError, OSError) as err:  # it died (killed, out of memory): only the call it held fails
            if self._discard(worker):  # not when `close` stopped it (the server is stopping)
                log.error("the request worker process died (%s); a new one starts with the next large request",
                          worker.describe_exit() or type(err).__name__)
            raise ApiError(INTERNAL) from None
        if not ok:
            raise value
        return value

    def _started(self) -> _WorkerProcess:
        worker = self._worker
        if worker is not None and not worker.process.is_alive():  # died between two calls
            log.error("the request worker process died (%s); starting a new one", worker.describe_exit())
            self._discard(worker)
        with self._swap:
            if self._worker is None:
                paths = {name: tokenizer.path for name, tokenizer in self.tokenizers.items()}
                self._worker = _start_worker_process(self.resolve, paths)
            return self._worker


def _start_worker_process(resolve: Resolver, tokenizer_paths: Mapping[str, Path]) -> _WorkerProcess:
    """A new worker process; ApiError 429/3040 if no file descriptor is left for its pipes."""
    try:
        return _WorkerProcess(resolve, tokenizer_paths)
    except OSError as err:
        if err.errno not in OUT_OF_FILES:
            raise
        log.warning("cannot start the request worker process: %s; a large request is answered 429 (code 3040)",
                    err.strerror or err)
        raise ApiError(CAPACITY, headers={"retry-after": "1"}) from None


class _WorkerProcess:
    """One spawned worker process and its two pipes (see the module docstring): `call` sends it a function and its
    arguments and returns (True, result) or (False, the exception it raised); EOFError/OSError once it is dead."""

    def __init__(self, resolve: Resolver, tokenizer_paths: Mapping[str, Path]) -> None:
        context = multiprocessing.get_context("spawn")
        ends: list[Connection] = []  # closed again if the process cannot be started
        try:
            calls_in, self._calls = context.Pipe(duplex=False)
            ends += (calls_in, self._calls)
            self._results, results_out = context.Pipe(duplex=False)
            ends += (self._results, results_out)
            self.process = context.Process(target=_serve, args=(resolve, dict(tokenizer_paths), calls_in,
                                                                results_out),
                                           name="int8serve-request-worker", daemon=True)
            self.process.start()
        except BaseException:
            for end in ends:
                end.close()
            raise
        calls_in.close()  # the worker's ends: with them closed here, its death is an end of file for this process
        results_out.close()

    def call(self, work: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
        self._calls.send((work, args))
        return self._results.recv()

    def describe_exit(self) -> str:
        self.process.join(timeout=1)
        code = self.process.exitcode
        if code is None:
            return ""
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def stop(self) -> None:
        """Kill it (a body it parses is of no use now) and reap it."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self._calls.close()
        self._results.close()


# --- in the worker process --------------------------------------------------------------------------------------

_worker: tuple[Resolver, dict[str, AnyTokenizer]] | None = None


def _serve(resolve: Resolver, tokenizer_paths: Mapping[str, Path], calls: Connection, results: Connection) -> None:
    """The worker's loop: each call's outcome goes back as (True, result) or (False, exception), until the server
    closes its end of the calls' pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the server's to handle: it stops this process
    _start_worker(resolve, tokenizer_paths)
    while True:
        try:
            work, args = calls.recv()
        except EOFError:
            return
        try:
            outcome: tuple[bool, Any] = (True, work(*args))
        except Exception as err:
            outcome = (False, err)
        try:
            results.send(outcome)
        except Exception:  # an outcome that cannot be pickled: nothing of it was written
            log.exception("a request worker's answer could not be sent back")
            results.send((False, ApiError(INTERNAL)))


def _start_worker(resolve: Resolver, tokenizer_paths: Mapping[str, Path]) -> None:
    global _worker
    _lowest_priority()

    tokenizers = {name: load_tokenizer(path) for name, path in tokenizer_paths.items()}
    _worker = (resolve, tokenizers)


def _lowest_priority() -> None:
    """Run only when the CPU has nothing else to do (SCHED_IDLE), else at nice 19: the engine always goes first."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def _check_in_worker(fmt: WireFormat, raw: bytes, model: str | None, keep_prompt: bool) -> Checked:
    assert _worker is not None
    return check_body(_worker[0], fmt, raw, model, keep_prompt)


def _tokenize_in_worker(model: str, run: ValidatedRun, window: int) -> RunRequest:
    assert _worker is not None
    return tokenize_run(run, _worker[1][model], window)
