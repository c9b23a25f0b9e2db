"""`int8serve serve --model org/name` as an operator runs it: the Hub id resolved offline from the Hub cache and the
first start writing the int8 copy (that later starts load it: tests/engine/test_model_cache.py, in-process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.engine.test_hub import lay_out_hub_cache
from tests.fresh_cache import fresh_cache
from tests.test_server import free_port


def serve_until_ready(env: dict[str, str], *args: str) -> str:
    """Start `serve`, wait for /readyz 200, stop it with SIGTERM; its stderr."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "int8serve", "serve", "--port", str(port),
                                "--token", "t0ken=acct", "--no-prefix-cache", *args],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 600  # generous: a busy 2-core machine (issue 16)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not become ready")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return err


def test_serve_a_hub_id_offline_writes_the_int8_copy(tmp_path: Path, stories_hf: Path) -> None:
    lay_out_hub_cache(tmp_path / "hub", "tiny-org/stories260K", stories_hf)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "INT8SERVE_CACHE": str(fresh_cache(tmp_path / "cache")), "INT8SERVE_DATA_DIR": str(tmp_path / "data"),
           "INT8SERVE_TOKENS": ""}
    first = serve_until_ready(env, "--model", "tiny-org/stories260K")
    assert "quantizing" in first and "once: later starts load the copy" in first
    copies = [p for p in (tmp_path / "cache" / "models").iterdir() if (p / "int8serve.json").is_file()]
    assert [p.name.split("-")[0] for p in copies] == ["tiny"]  # tiny-org--stories260K-<key>
