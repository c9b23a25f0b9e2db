"""Fuzz every route of a live server from the OpenAPI document it publishes: no 5xx, every error in its envelope.

Schemathesis generates requests from `/openapi.json` — bodies, path and query parameters and headers that fit the
document (positive) and ones that break it (negative) — and each is sent, authenticated as one account, to the
server. A request fails the run when its answer is a 5xx, or an error (4xx) whose body is not the envelope its route
promises: Cloudflare's `{"success": false, "errors": [{"code", "message"}], "messages": [], "result": ...}`, or
OpenAI's `{"error": {"message", "type", "param", "code"}}` under `/v1/` and `/ai/v1/`.

The short, derandomized version runs in the test suite (`tests/service/test_fuzz.py`); the long one against a real
`int8serve serve` (`--examples 400` per operation and mode: ≥ 10,000 requests):

    .venv/bin/python -m benchmarks.fuzz --model ../shared/models/stories260K/hf --examples 400 \\
        --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from benchmarks.common import free_port, started_server, write_section
from benchmarks.machine import machine_description

__all__ = ["FuzzReport", "envelope_problem", "fuzz"]

OPENAI_PREFIXES = ("/v1/",)


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return f"{self.requests} requests ({statuses}); {len(self.failures)} failures"


def is_openai(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES) or "/ai/v1/" in path


def envelope_problem(path: str, status: int, body: bytes) -> str | None:
    """What is wrong with an answer: a 5xx, or an error outside its route's envelope (None: nothing)."""
    if status >= 500:
        return f"status {status}"
    if status < 400:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return f"status {status} with a body that is not JSON: {body[:80]!r}"
    if is_openai(path):
        error = data.get("error") if isinstance(data, dict) else None
        ok = isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
        return None if ok else f"status {status}: not an OpenAI error body: {body[:120]!r}"
    ok = (isinstance(data, dict) and list(data) == ["success", "errors", "messages", "result"]
          and data["success"] is False and isinstance(data["errors"], list) and len(data["errors"]) == 1
          and isinstance(data["errors"][0].get("code"), int) and isinstance(data["errors"][0].get("message"), str))
    return None if ok else f"status {status}: not a Cloudflare envelope: {body[:120]!r}"


def fuzz(base_url: str, token: str, account: str, examples: int, *, seed_derandomize: bool = True,
         modes: Sequence[GenerationMode] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
         model: str | None = None, timeout: float = 30.0) -> FuzzReport:
    """Send `examples` generated requests per operation and mode to `base_url` as `account`; every problem is in
    the report. `model`: the served model the `/ai/run/{model}` path names (default: generated like the rest)."""
    document = httpx.get(f"{base_url}/openapi.json", timeout=timeout).json()
    schema = schemathesis.openapi.from_dict(document)
    report = FuzzReport()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, timeout=timeout) as client:
        for result in schema.get_all_operations():
            operation = result.ok()
            path_parameters = {"account_id": account} if "{account_id}" in operation.path else {}
            if model is not None and "{model}" in operation.path:
                path_parameters["model"] = model
            for mode in modes:
                strategy = operation.as_strategy(mode, path_parameters=path_parameters or None, headers=headers)
                with contextlib.suppress(Unsatisfiable):  # e.g. no negative case for a route without inputs
                    _run(client, strategy, examples, seed_derandomize, report)
    return report


def _run(client: httpx.Client, strategy: Any, examples: int, derandomize: bool, report: FuzzReport) -> None:
    @settings(max_examples=examples, derandomize=derandomize, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def send(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
        kwargs.pop("base_url", None)
        url = kwargs.pop("url")
        response = client.request(kwargs.pop("method"), url, **_httpx_kwargs(kwargs))
        report.requests += 1
        report.statuses[response.status_code] += 1
        problem = envelope_problem(httpx.URL(url).path, response.status_code, response.content)
        if problem is not None:
            report.failures.append(f"{case.method} {httpx.URL(url).path}: {problem}")

    send()


def _httpx_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Schemathesis' `requests`-style keyword arguments, as httpx takes them."""
    out: dict[str, Any] = {k: v for k, v in kwargs.items() if k in ("headers", "params")}  # no cookies here
    if "json" in kwargs:
        out["json"] = kwargs["json"]
    elif "data" in kwargs:
        out["content"] = kwargs["data"]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model folder for the server the script starts")
    parser.add_argument("--examples", type=int, default=400, help="generated requests per operation and mode")
    parser.add_argument("--write", type=Path, default=None, help="write the result into this Markdown file")
    args = parser.parse_args(argv)
    port, token, account = free_port(), "fuzz-token", "fuzz-account"
    started = time.monotonic()
    with started_server(args.model, port, [f"{token}={account}", "other-token=other-account"],
                        ["--rpm", "0", "--no-cache"]) as base_url:
        report = fuzz(base_url, token, account, args.examples, seed_derandomize=False,
                      model="@cf/meta/llama-2-7b-chat-int8")
    seconds = time.monotonic() - started
    print(report.line())
    for failure in report.failures[:50]:
        print("  FAIL", failure)
    if args.write is not None:
        section = "\n".join([
            "## Fuzzing every route (`benchmarks/fuzz.py`)", "",
            f"`.venv/bin/python -m benchmarks.fuzz --model {args.model} --examples {args.examples}` — "
            f"{machine_description()}, {time.strftime('%Y-%m-%d')}, {seconds:.0f} s.", "",
            f"Schemathesis, from the server's own `/openapi.json`, positive and negative cases: {report.line()}."])
        write_section(args.write, section, "fuzz.py")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
