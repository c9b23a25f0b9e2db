"""What the benchmark scripts share: a server to measure (started, waited for and stopped: the tests that start
`int8serve serve` use these too), how to read its streams and errors, percentiles, the command that reruns them, and
their sections of `docs/benchmarks.md` (the machine they ran on is `machine.py`; Redis and PostgreSQL to serve with
are `backends.py`).

Each script writes its results between two markers that name it (`<!-- benchmarks/NAME.py LABEL: begin -->` ...
`end -->`), so that rerunning one script replaces its own section and keeps the others.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

__all__ = ["LaunchedServer", "ServerExited", "display_command", "error_code", "free_port", "launch", "parse_frame",
           "percentile", "publish", "replace_section", "running_server", "serve_command", "start_server",
           "started_server", "stop_process", "wait_ready", "write_section"]

DOCS_HEADER = ("# Benchmarks\n\nMeasured performance of int8serve on its CPU machine. Each section is written by the "
               "script it names; rerun the command it shows to refresh it.\n")


def free_port() -> int:
    """A TCP port free on loopback now (for a server about to start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile of `values` (in any order) by numpy's default, linear interpolation between the closest
    ranks (as vLLM reports them); NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def parse_frame(line: str) -> tuple[str, Any]:
    """One line of a server-sent event stream, of either API (Workers AI or OpenAI): ("done" | "error" | "data" |
    "other", its JSON payload). "other" is a line with no data (a comment, a blank line); a data line that is not
    JSON is "data" with no payload, so that a benchmark reading a damaged stream counts it and goes on."""
    if not line.startswith("data:"):
        return "other", None
    data = line.removeprefix("data:").strip()
    if data == "[DONE]":
        return "done", None
    try:
        payload = json.loads(data)
    except ValueError:
        return "data", None
    if error_code(payload) is not None or (isinstance(payload, dict) and ("error" in payload or payload.get("errors"))):
        return "error", payload
    return "data", payload


def error_code(answer: Any) -> int | str | None:
    """`errors[0].code` of a Cloudflare envelope (or a stream's error frame), or `error.code` of an OpenAI error;
    an answer's body (bytes) is read as JSON first. None when there is none, or the body is not JSON."""
    if isinstance(answer, bytes):
        try:
            answer = json.loads(answer)
        except ValueError:
            return None
    if not isinstance(answer, dict):
        return None
    errors = answer.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return errors[0].get("code")
    error = answer.get("error")
    if isinstance(error, dict):
        return error.get("code")
    return None


def display_command(script: str, argv: Sequence[str], hidden: Sequence[str] = ()) -> str:
    """The command that reruns `benchmarks/SCRIPT.py` with `argv`, less the options in `hidden` (with their
    values): those that only name this run's own output files."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in hidden:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in hidden)):
            shown.append(arg)
    return shlex.join([".venv/bin/python", "-m", f"benchmarks.{script}", *shown])


def section_markers(script: str, label: str = "") -> tuple[str, str]:
    name = f"benchmarks/{script}" + (f" {label}" if label else "")
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def replace_section(text: str, body: str, script: str, label: str = "") -> str:
    """`text` with the section of `script` (and `label`) replaced by `body` between its markers, or appended."""
    begin, end = section_markers(script, label)
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: section, text, count=1)
    return text.rstrip("\n") + "\n\n" + section


def write_section(path: Path, body: str, script: str, label: str = "") -> None:
    """Replace the section of `script` (and `label`) in the Markdown file `path` by `body`, or append it."""
    text = path.read_text() if path.exists() else DOCS_HEADER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, body, script, label))


def publish(report: str, path: Path | None, script: str, label: str = "") -> None:
    """Print a script's report and, given a file (--write), put it in the script's section there."""
    print(report, flush=True)
    if path:
        write_section(path, report, script, label)
        print(f"wrote the section into {path}", flush=True)


@contextlib.contextmanager
def environment(name: str, value: str | None) -> Iterator[None]:
    """The environment variable `name` = `value` for the duration (None: leave it alone), restored after."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def serve_command(port: int, args: Sequence[str] = (), entry: Sequence[str] = ("-m", "int8serve")) -> list[str]:
    """`python -m int8serve serve --port PORT ARGS`; `entry` is another way in (a script that wraps int8serve)."""
    return [sys.executable, *entry, "serve", "--port", str(port), *args]


def launch(command: Sequence[str], output: Path | int = subprocess.PIPE, env: Mapping[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` (a server) and return at once. Its stdout and stderr go into the file `output` (made
    anew); with subprocess.PIPE its stderr is a text pipe for the caller to read (the start-up lines, what a stop
    reports) and its stdout is dropped; with subprocess.DEVNULL both are dropped."""
    if isinstance(output, Path):
        with output.open("w") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=cwd)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=output, stdin=subprocess.DEVNULL, text=True,
                            env=env, cwd=cwd)


@dataclass
class LaunchedServer:
    """A server process on a loopback port, and the file its output goes to (if any)."""

    process: subprocess.Popen
    port: int
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(args: Sequence[str], port: int | None = None, output: Path | int = subprocess.PIPE,
                 env: Mapping[str, str] | None = None, entry: Sequence[str] = ("-m", "int8serve"),
                 cwd: Path | None = None, timeout: float = 600.0, interval: float = 0.3) -> LaunchedServer:
    """`int8serve serve ARGS` on `port` (a free one by default), launched as `launch` does, returned once
    `/readyz` is 200. When it exits first, ServerExited; when it is not ready within `timeout`, RuntimeError (it is
    stopped then)."""
    port = port or free_port()
    log_path = output if isinstance(output, Path) else None
    server = LaunchedServer(launch(serve_command(port, args, entry), output, env, cwd), port, log_path)
    try:
        wait_ready(server.url, server.process, timeout, log_path, interval)
    except BaseException:
        stop_process(server.process)
        raise
    return server


@contextlib.contextmanager
def running_server(model: Path, port: int, tokens: Sequence[str], extra: Sequence[str] = (),
                   timeout: float = 600.0) -> Iterator[LaunchedServer]:
    """`int8serve serve --model MODEL` on `port` with `tokens` (TOKEN=ACCOUNT) and `extra` flags, its data and log
    in a temporary folder; yields it once `/readyz` is 200, stops it with SIGTERM at the end."""
    with tempfile.TemporaryDirectory(prefix="int8serve-bench-") as tmp:
        args = ["--model", str(model), "--data-dir", str(Path(tmp) / "data"), *(f"--token={t}" for t in tokens),
                *extra]
        server = start_server(args, port, Path(tmp) / "server.log", {**os.environ, "PYTHONUNBUFFERED": "1"},
                              timeout=timeout)
        try:
            yield server
        finally:
            stop_process(server.process)


@contextlib.contextmanager
def started_server(model: Path, port: int, tokens: Sequence[str], extra: Sequence[str] = (),
                   timeout: float = 600.0) -> Iterator[str]:
    """`running_server`, yielding its base URL."""
    with running_server(model, port, tokens, extra, timeout) as server:
        yield server.url


class ServerExited(RuntimeError):
    """The server exited before it was ready: its exit status, and what it wrote (its log, or its stderr pipe)."""

    def __init__(self, status: int, output: str) -> None:
        super().__init__(f"the server exited with {status}:\n{output[-3000:]}")
        self.status, self.output = status, output


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float, log_path: Path | None = None,
               interval: float = 0.3) -> None:
    """Poll `url`/readyz every `interval` seconds until 200. ServerExited if `process` exits first (with its log
    `log_path`, or what its stderr pipe holds); RuntimeError after `timeout` seconds (with the end of the log)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ServerExited(process.returncode, exit_output(process, log_path))
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/readyz").status_code == 200:
                    return
            time.sleep(interval)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
    raise RuntimeError(f"the server at {url} was not ready within {timeout:.0f} s" + (f":\n{tail}" if tail else ""))


def exit_output(process: subprocess.Popen, log_path: Path | None) -> str:
    """What a process that exited wrote: its log file, or its stderr pipe (read to the end)."""
    if log_path is not None:
        return log_path.read_text(errors="replace") if log_path.exists() else ""
    if process.stderr is None:
        return ""
    _, err = process.communicate(timeout=30)
    return err.decode(errors="replace") if isinstance(err, bytes) else err


def stop_process(process: subprocess.Popen, grace: float = 30.0) -> int | None:
    """SIGTERM, and up to `grace` seconds to exit (then SIGKILL): its exit status, or None when it was killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None
    return process.returncode
