"""benchmarks/common.py: what the benchmark scripts share, and the tests with them."""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import httpx
import pytest
from benchmarks.common import (
    ServerExited,
    error_code,
    free_port,
    launch,
    parse_frame,
    percentile,
    serve_command,
    start_server,
    stop_process,
)

# A stand-in for `python -m int8serve serve --port PORT ARGS`: says it starts (with its pid), then answers 200 on
# every path; with --fail it exits 1 at once, with --never-ready it never listens, with --ignore-sigterm it must be
# killed.
FAKE_SERVE = """
import http.server, os, signal, sys
command, flag, port, *rest = sys.argv[1:]
assert (command, flag) == ("serve", "--port")
if "--ignore-sigterm" in rest:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("starting", os.getpid(), *rest, file=sys.stderr, flush=True)
if "--fail" in rest:
    sys.exit("fake serve: error: --fail")
if "--never-ready" in rest:
    while True:
        signal.pause()


class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()


http.server.HTTPServer(("127.0.0.1", int(port)), Ready).serve_forever()
"""


def test_percentile_is_numpys_on_values_in_any_order() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 25) == 1.75 and percentile([1.0, 2.0, 3.0, 4.0], 25) == 1.75
    assert percentile((5.0, 1.0), 50) == 3.0  # any sequence
    assert percentile([4.0, 1.0, 3.0, 2.0], 99) == pytest.approx(3.97)
    assert type(percentile([1.0, 2.0], 50)) is float  # not numpy's float64, for the reports' arithmetic and JSON
    assert math.isnan(percentile([], 50))


def test_parse_frame_of_both_apis() -> None:
    assert parse_frame('data: {"response":"Once"}') == ("data", {"response": "Once"})
    assert parse_frame('data: {"choices":[{"delta":{"content":"Once"}}]}')[0] == "data"
    assert parse_frame("data: [DONE]") == ("done", None)
    workers = parse_frame('data: {"response":"","errors":[{"code":3043,"message":"Internal server error"}]}')
    openai = parse_frame('data: {"error":{"code":"rate_limit_exceeded","message":"Too many"}}')
    assert workers[0] == openai[0] == "error"
    assert (error_code(workers[1]), error_code(openai[1])) == (3043, "rate_limit_exceeded")
    assert parse_frame(": keep-alive") == parse_frame("") == ("other", None)


def test_a_data_line_that_is_not_json_is_a_frame_without_payload() -> None:
    assert parse_frame("data: <html>502 Bad Gateway</html>") == ("data", None)
    assert parse_frame("data: [1, 2]") == ("data", [1, 2])


def test_error_code_of_a_body() -> None:
    assert error_code(b'{"success":false,"errors":[{"code":3040,"message":"Capacity"}]}') == 3040
    assert error_code(b'{"error":{"code":"invalid_request_error"}}') == "invalid_request_error"
    assert error_code(b"not json") is error_code(b"\xff") is error_code(b'{"errors":[]}') is None
    assert error_code([{"code": 1}]) is error_code('{"errors":[{"code":1}]}') is None  # text is no body


@pytest.fixture
def fake_serve(tmp_path: Path) -> list[str]:
    """`start_server`'s `entry` for FAKE_SERVE."""
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVE)
    return [str(script)]


def test_serve_command() -> None:
    assert serve_command(8787, ["--token", "t=a"]) == [sys.executable, "-m", "int8serve", "serve", "--port", "8787",
                                                       "--token", "t=a"]
    assert serve_command(1, entry=["hook.py"]) == [sys.executable, "hook.py", "serve", "--port", "1"]


def test_start_server_returns_once_ready_and_stop_process_gives_the_exit_status(fake_serve: list[str]) -> None:
    server = start_server(["--flag"], entry=fake_serve, timeout=60)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}" and server.log_path is None
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        assert server.process.stderr is not None and server.process.stderr.readline().endswith(" --flag\n")
    finally:
        assert stop_process(server.process) == -signal.SIGTERM


def test_a_server_that_exits_at_start_says_what_it_wrote(fake_serve: list[str], tmp_path: Path) -> None:
    with pytest.raises(ServerExited, match="the server exited with 1:\nstarting") as piped:  # its stderr pipe
        start_server(["--fail"], entry=fake_serve, timeout=60)
    assert piped.value.status == 1 and piped.value.output.endswith("fake serve: error: --fail\n")
    log = tmp_path / "serve.log"
    with pytest.raises(ServerExited) as logged:  # its log file
        start_server(["--fail"], output=log, entry=fake_serve, timeout=60)
    assert logged.value.output == log.read_text() and "fake serve: error: --fail" in str(logged.value)


def test_a_server_not_ready_in_time_is_stopped(fake_serve: list[str], tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with pytest.raises(RuntimeError, match=r"was not ready within 1 s:\nstarting \d+ --never-ready"):
        start_server(["--never-ready"], output=log, entry=fake_serve, timeout=1)
    pid = int(log.read_text().split()[1])
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped


def test_stop_process_kills_what_ignores_sigterm(fake_serve: list[str]) -> None:
    process = launch(serve_command(free_port(), ["--ignore-sigterm", "--never-ready"], fake_serve))
    assert process.stderr is not None and process.stderr.readline().startswith("starting")
    assert stop_process(process, grace=0.5) is None and process.returncode == -signal.SIGKILL
