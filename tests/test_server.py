"""`int8serve serve` as an operator runs it: a real process, a real port, a generated or configured token."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

MODEL = "@cf/meta/llama-2-7b-chat-int8"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(*args: str, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "INT8SERVE_CACHE": str(tmp_path / "cache"), "INT8SERVE_TOKENS": ""}
    process = subprocess.Popen([sys.executable, "-m", "int8serve", "serve", "--port", str(port), *args],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process, port
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("the server did not become ready")


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    return err


def test_serve_makes_and_prints_a_token_when_none_is_configured(tmp_path: Path, shared_dir: Path) -> None:
    process, port = start("--model", str(shared_dir / "models" / "stories260K" / "hf"), tmp_path=tmp_path)
    try:
        # the start-up lines are printed before uvicorn starts; read them from the live process
        lines = []
        while not any("curl" in line for line in lines):
            lines.append(process.stderr.readline())
        text = "".join(lines)
        token, account = re.search(r"API token (\S+) for account (\S+);", text).groups()
        assert "context 512 tokens" in text and "4 slots" in text
        url = f"http://127.0.0.1:{port}/client/v4/accounts/{account}/ai/run/{MODEL}"
        answer = httpx.post(url, headers={"Authorization": f"Bearer {token}"},
                            content=b'{"prompt": "Once upon a time", "raw": true, "max_tokens": 12}',
                            timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        assert answer.json()["result"]["usage"]["completion_tokens"] <= 12
        assert httpx.post(url, content=b'{"prompt": "x"}', timeout=10).json()["errors"][0]["code"] == 9106
    finally:
        assert process.poll() is None
        stop(process)
    assert process.returncode == 0


def test_serve_demo_model_with_configured_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# token=account\nsecret-b=acct-b\n")
    process, port = start("--token", "secret-a=acct-a", "--tokens-file", str(tokens), tmp_path=tmp_path)
    try:
        for token, account in (("secret-a", "acct-a"), ("secret-b", "acct-b")):
            answer = httpx.post(f"http://127.0.0.1:{port}/client/v4/accounts/{account}/ai/run/{MODEL}",
                                headers={"Authorization": f"Bearer {token}"},
                                json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
            assert answer.status_code == 200, answer.text
            assert "meaningless" in answer.headers["x-int8serve-demo-model"]
    finally:
        err = stop(process)
    assert "RANDOM weights" in err and "API token" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["--token", "no-equals-sign"], "expected TOKEN=ACCOUNT_ID"),
    (["--served-model-name", "@cf/none/such"], "unknown model"),
    (["--model", "/no/such/folder"], "no such model folder"),
])
def test_serve_start_up_errors_are_clear(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "INT8SERVE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "int8serve", "serve", "--port", str(free_port()), *args],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
