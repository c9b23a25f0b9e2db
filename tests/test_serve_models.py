"""`int8serve serve --model org/name` as an operator runs it: the Hub id resolved offline from the Hub cache and the
first start writing the int8 copy (that later starts load it: tests/engine/test_model_cache.py, in-process)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from benchmarks.common import start_server
from tests.engine.test_hub import lay_out_hub_cache
from tests.fresh_cache import fresh_cache


def serve_until_ready(env: dict[str, str], *args: str) -> str:
    """Start `serve`, wait for /readyz 200, stop it with SIGTERM; its stderr."""
    # 600 s: generous, a busy 2-core machine (issue 16)
    process = start_server(["--token", "t0ken=acct", "--no-prefix-cache", *args], env=env, timeout=600).process
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
