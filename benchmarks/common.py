"""What the benchmark scripts share: a server to measure, the machine they ran on, and their sections of
`docs/benchmarks.md`.

Each script writes its results between two markers that name it (`<!-- benchmarks/NAME.py LABEL: begin -->` ...
`end -->`), so that rerunning one script replaces its own section and keeps the others.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

__all__ = ["free_port", "machine_description", "started_server", "stop_process", "write_section"]

DOCS_HEADER = ("# Benchmarks\n\nMeasured performance of int8serve on its CPU machine. Each section is written by the "
               "script it names; rerun the command it shows to refresh it.\n")
ISA_FLAGS = ("avx2", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_description() -> str:
    """`AMD EPYC (2 CPUs; avx2, avx512_vnni, avx512_bf16; no amx_bf16, ...)`, from lscpu."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)}
    flags = fields.get("Flags", "").split()
    present = [f for f in ISA_FLAGS if f in flags]
    missing = [f for f in ISA_FLAGS if f not in flags]
    return (f"{fields.get('Model name', '?')} ({fields.get('CPU(s)', os.cpu_count())} CPUs; {', '.join(present)}"
            + (f"; no {', '.join(missing)}" if missing else "") + ")")


def section_markers(script: str, label: str = "") -> tuple[str, str]:
    name = f"benchmarks/{script}" + (f" {label}" if label else "")
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def write_section(path: Path, body: str, script: str, label: str = "") -> None:
    """Replace the section of `script` (and `label`) in the Markdown file `path` by `body`, or append it."""
    begin, end = section_markers(script, label)
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else DOCS_HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _: section, text, count=1) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@contextlib.contextmanager
def started_server(model: Path, port: int, tokens: Sequence[str], extra: Sequence[str] = (),
                   timeout: float = 600.0) -> Iterator[str]:
    """`int8serve serve --model MODEL` on `port` with `tokens` (TOKEN=ACCOUNT) and `extra` flags, its data in a
    temporary folder; yields its base URL once `/readyz` is 200, stops it with SIGTERM at the end."""
    with tempfile.TemporaryDirectory(prefix="int8serve-bench-") as tmp:
        command = [sys.executable, "-m", "int8serve", "serve", "--model", str(model), "--port", str(port),
                   "--data-dir", str(Path(tmp) / "data"), *(f"--token={t}" for t in tokens), *extra]
        log_path = Path(tmp) / "server.log"
        with log_path.open("w") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process, timeout, log_path)
            yield url
        finally:
            stop_process(process)


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/readyz").status_code == 200:
                    return
            time.sleep(0.3)
    raise RuntimeError(f"the server at {url} was not ready within {timeout:.0f} s")


def stop_process(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
