"""The request worker process (service/workers.py) when it dies: killed while it writes back a result larger than a
pipe's buffer (a checked 1 MiB body is one), between two calls, or stopped by the server while a call runs. Only the
call it held fails (500/3043), at once; the next call gets a new worker; no process is left behind."""

from __future__ import annotations

import asyncio
import errno
import gc
import multiprocessing
import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import tokenizers

from int8serve.engine.chat_template import render_prompt
from int8serve.engine.sampling_params import SamplingParams
from int8serve.engine.tokenizer import Tokenizer
from int8serve.service.errors import ApiError
from int8serve.service.protocol.run import ValidatedRun
from int8serve.service.workers import RequestWorkers, Resolver

LARGE = 16 << 20  # far beyond a pipe's 64 KiB buffer


def echo(value: object) -> object:
    return value


def pid() -> int:
    return os.getpid()


def large_result_after(seconds: float) -> bytes:
    time.sleep(seconds)
    return b"x" * LARGE


def die_in_the_middle_of_its_answer() -> None:
    """Write the header and the first MiB of a 16 MiB answer, then die, as a worker the OOM killer takes while it
    writes (deterministically: the test does not race the pipe)."""
    (answers,) = [o for o in gc.get_objects() if isinstance(o, Connection) and not o.closed and o.writable]
    os.write(answers.fileno(), struct.pack("!i", LARGE) + b"x" * (1 << 20))
    os.kill(os.getpid(), signal.SIGKILL)


def bad_request() -> None:
    from int8serve.service.errors import BAD_INPUT
    raise ApiError(BAD_INPUT, detail="no")


@pytest.fixture
def workers() -> Iterator[RequestWorkers]:
    pool = RequestWorkers(Resolver({}, frozenset()), {})
    yield pool
    pool.close()


def children() -> list[str]:
    """This process' child processes as `ps` shows them (pid, state — Z a zombie —, command), but `ps` itself."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "--ppid", str(os.getpid())], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if "ps -o" not in line]


def zombies() -> list[str]:
    return [line for line in children() if line.split()[1].startswith("Z")]


def workers_alive() -> list[str]:
    """The spawned worker processes (not multiprocessing's resource tracker, which stays)."""
    return [line for line in children() if "spawn_main" in line]


def test_a_worker_killed_while_it_writes_a_large_result_fails_that_call_alone(workers: RequestWorkers) -> None:
    async def scenario() -> None:
        first = await workers._in_process("acct-a", pid)
        started = time.monotonic()
        with pytest.raises(ApiError) as failed:
            await asyncio.wait_for(workers._in_process("acct-a", die_in_the_middle_of_its_answer), 10)
        assert (failed.value.status, failed.value.code) == (500, 3043) and time.monotonic() - started < 5
        # every account is served again, by a new worker
        answers = await asyncio.wait_for(asyncio.gather(*(workers._in_process(a, echo, a) for a in "abc")), 60)
        assert answers == ["a", "b", "c"]
        assert await workers._in_process("acct-a", pid) != first

    asyncio.run(scenario())
    assert not zombies()


def test_a_worker_killed_while_it_works_fails_that_call(workers: RequestWorkers,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        worker = await workers._in_process("acct-a", pid)
        call = asyncio.create_task(workers._in_process("acct-a", large_result_after, 30))
        await asyncio.sleep(0.5)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(ApiError):
            await asyncio.wait_for(call, 10)
        assert await asyncio.wait_for(workers._in_process("acct-b", echo, 1), 60) == 1

    asyncio.run(scenario())
    assert not zombies()
    assert "the request worker process died (killed by signal 9)" in caplog.text


def test_a_worker_dead_between_calls_is_replaced_before_the_next(workers: RequestWorkers) -> None:
    async def scenario() -> None:
        first = await workers._in_process("acct-a", pid)
        os.kill(first, signal.SIGKILL)
        await asyncio.sleep(0.5)
        assert await asyncio.wait_for(workers._in_process("acct-a", echo, 7), 60) == 7  # not a 500: it held nothing

    asyncio.run(scenario())
    assert not zombies()


def test_closing_the_workers_ends_the_call_in_flight(workers: RequestWorkers,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """As the server stops (its request cut at the drain's end, its caller gone): not said to have died."""
    async def scenario() -> None:
        await workers._in_process("acct-a", pid)
        call = asyncio.create_task(workers._in_process("acct-a", large_result_after, 30))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        workers.close()
        with pytest.raises(ApiError):
            await asyncio.wait_for(call, 10)
        assert time.monotonic() - started < 5

    asyncio.run(scenario())
    assert not zombies() and not workers_alive()
    assert "died" not in caplog.text, caplog.text


def test_an_error_in_the_worker_comes_back_as_it_was_raised(workers: RequestWorkers) -> None:
    with pytest.raises(ApiError) as refused:
        asyncio.run(workers._in_process("acct-a", bad_request))
    assert (refused.value.status, refused.value.code) == (400, 5006)


def test_a_raw_prompt_tokenized_in_the_worker_gets_the_ids_a_thread_gives(stories_tokenizer: Tokenizer,
                                                                          stories_hf: Path) -> None:
    """A long prompt is tokenized in the worker process (its tokenizer loaded from the file there): a raw prompt's
    <s>/</s> are their ids there too, the ids the tokenizer.json gives."""
    prompt = "<s>[INST] Hi [/INST] Hello</s><s>[INST] Bye [/INST]"
    run = ValidatedRun(segments=tuple(render_prompt(prompt, raw=True)), max_tokens=4, params=SamplingParams(),
                       stream=False, reject_if_busy=False, form="prompt", raw=True)
    expected = tokenizers.Tokenizer.from_file(str(stories_hf / "tokenizer.json")).encode(
        prompt, add_special_tokens=False).ids
    resolve = Resolver({}, frozenset())
    for inline_chars in (1 << 14, 0):  # in a thread of this process; in the worker
        pool = RequestWorkers(resolve, {"stories": stories_tokenizer}, inline_chars=inline_chars)
        try:
            tokenized = asyncio.run(pool.tokenize("acct-a", "stories", run, 512))
        finally:
            pool.close()
        assert list(tokenized.prompt_ids) == expected, inline_chars
        assert tokenized.prompt_tokens == len(expected)
    assert not zombies()


def test_no_file_descriptor_for_the_worker_is_a_429_3040(workers: RequestWorkers, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The process at its limit on open files when the worker starts (its second pipe fails, as with EMFILE in an
    audit: a 500/3043 and a traceback): the call is 429/3040 with Retry-After (the capacity refusal that clients
    retry), one log line without a traceback, the first pipe closed again; once descriptors are back the next call
    starts the worker."""
    context = multiprocessing.get_context("spawn")
    real_pipe = context.Pipe
    made: list[tuple[Connection, Connection]] = []

    def second_pipe_fails(duplex: bool = True) -> tuple[Connection, Connection]:
        if made:
            raise OSError(errno.EMFILE, "Too many open files")
        made.append(real_pipe(duplex))
        return made[-1]

    monkeypatch.setattr(context, "Pipe", second_pipe_fails)
    with pytest.raises(ApiError) as refused:
        asyncio.run(workers._in_process("acct-a", echo, 1))
    assert (refused.value.status, refused.value.code, refused.value.headers) == (429, 3040, {"retry-after": "1"})
    assert all(end.closed for end in made[0])
    [record] = [r for r in caplog.records if r.name == "int8serve.service.workers"]
    assert record.getMessage() == ("cannot start the request worker process: Too many open files; a large request "
                                   "is answered 429 (code 3040)") and record.exc_info is None
    monkeypatch.undo()
    assert asyncio.run(workers._in_process("acct-a", echo, 1)) == 1
