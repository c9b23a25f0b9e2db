"""Service fixtures: real engines on the stories260K int8 model behind a real uvicorn server on a loopback port.

Three engines are served, all on the same (read-only) model weights:

* `MODEL` (the built-in card's name): the plain stories260K int8 engine, 4 slots, with a prefix cache as `serve`
  gives it — real, coherent text;
* `SLOW_MODEL`: the same model slowed to ~25 ms per step, 1 slot and a queue of 1 — to fill the engine on purpose
  (capacity errors, `rejectIfBusy`, a disconnect freeing its slot well before the answer would have ended);
* `SCRIPTED_MODEL`: a stand-in whose "logits" always pick the next token of `SCRIPT`, a fixed sequence of
  byte-fallback tokens spelling `SCRIPT_TEXT` (accents, an emoji, CJK) — to check SSE framing byte by byte.

`UNSERVED_MODEL` has a card but no engine.

The shared `app` runs the card's policy without the requests-per-minute limit and without the response cache (the
card's limit of 5 a minute and cache hits would change what the HTTP tests observe); neurons are metered and the
ledger is written (in memory). The policy tests (`tests/service/policy/`) build apps of their own.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from cloudflare import Cloudflare
from fastapi import FastAPI

from int8serve.catalog.card import builtin_cards, parse_card
from int8serve.catalog.registry import Catalog
from int8serve.engine.loader import LoadedModel
from int8serve.engine.prefix_cache import PrefixCache
from int8serve.engine.scheduler import Engine
from int8serve.engine.tokenizer import Tokenizer
from int8serve.service.app import create_app
from int8serve.service.connections import ConnectionServer, uvicorn_config
from int8serve.service.policy import Policy

ACCOUNT = "023e105f4ecef8ad9ca31a8372d0c353"
OTHER_ACCOUNT = "0123456789abcdef0123456789abcdef"
TOKEN = "svc-test-token-0001"
OTHER_TOKEN = "svc-test-token-0002"  # valid, but for OTHER_ACCOUNT
TOKENS = {TOKEN: ACCOUNT, OTHER_TOKEN: OTHER_ACCOUNT}
MODEL = "@cf/meta/llama-2-7b-chat-int8"
SLOW_MODEL = "@cf/int8serve-test/stories-slow"
SCRIPTED_MODEL = "@cf/int8serve-test/scripted-utf8"
UNSERVED_MODEL = "@cf/int8serve-test/not-served"
CONTEXT = 512  # stories260K's context: the window is min(card 2048, engine 512)
SLOW_STEP_SECONDS = 0.025

# Pieces of the stories260K tokenizer: "▁H" then raw UTF-8 bytes, so that "é", "🙂", "世", "界" each span
# several tokens and most tokens complete no character.
SCRIPT_PIECES = ["▁H", "<0xC3>", "<0xA9>", "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "▁",
                 "<0xE4>", "<0xB8>", "<0x96>", "<0xE7>", "<0x95>", "<0x8C>"]
SCRIPT_TEXT = "Hé 🙂 世界"
SCRIPT_DELTAS = ["H", "é", " ", "🙂", " ", "世", "界"]


class SlowModel:
    """The real model, sleeping before every forward: long answers take seconds instead of milliseconds."""

    def __init__(self, model: Any, delay: float) -> None:
        self.model, self.delay, self.config = model, delay, model.config

    def new_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.new_cache(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        time.sleep(self.delay)
        return self.model(*args, **kwargs)


class ScriptedModel:
    """Logits that make any sampler pick `script[i]` as the i-th generated token, then EOS.

    The generated index is the position being predicted minus the prompt length, which is remembered per slot at
    the prompt's first (and, for the short prompts used here, only) prefill chunk.
    """

    def __init__(self, model: Any, script: list[int], eos_id: int) -> None:
        self.model, self.config, self.script, self.eos_id = model, model.config, script, eos_id
        self.prompt_len: dict[int, int] = {}

    def new_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.new_cache(*args, **kwargs)

    def __call__(self, tokens: torch.Tensor, cache: Any, slots: list[int], starts: list[int], **_: Any) -> torch.Tensor:
        batch, seq = tokens.shape
        logits = torch.full((batch, self.config.vocab_size), -1e9)
        for row, (slot, start) in enumerate(zip(slots, starts, strict=True)):
            if start == 0:
                self.prompt_len[slot] = seq
            index = start + seq - self.prompt_len[slot]
            logits[row, self.script[index] if index < len(self.script) else self.eos_id] = 0.0
        return logits


class LiveServer:
    """A uvicorn server for `app` on a free loopback port, in a background thread, with the connection limits of
    `int8serve serve` (`uvicorn_config`: `header_timeout`, `max_connections`). `sock`: serve on this bound socket."""

    def __init__(self, app: FastAPI, sock: socket.socket | None = None, **limits: Any) -> None:
        config = uvicorn_config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=2, **limits)
        self.server = ConnectionServer(config)
        sockets = [sock] if sock is not None else None
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets}, name="uvicorn-test",
                                       daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def stuck_reader(app: FastAPI, body: dict[str, Any], token: str, **limits: Any
                 ) -> Iterator[tuple[LiveServer, socket.socket]]:
    """`app` served (with the connection `limits` of `LiveServer`) with a 4 KiB send buffer, and a client with a
    2 KiB receive buffer that POSTs `body` to /v1/chat/completions and reads nothing: the buffers between them fill
    within a few frames of a stream."""
    server_sock = socket.socket()
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server_sock.bind(("127.0.0.1", 0))
    with LiveServer(app, sock=server_sock, **limits) as live, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect(("127.0.0.1", live.port))
        payload = json.dumps(body).encode()
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        yield live, sock


# --- data and models --------------------------------------------------------------------------------------------


# stories_hf, stories_int8 and stories_tokenizer come from tests/conftest.py


def _renamed_card(name: str) -> Any:
    builtin = builtin_cards()[0]
    text = Path(builtin.source_path).read_text(encoding="utf-8")
    text = text.replace(builtin.name, name).replace(builtin.id, str(uuid.uuid5(uuid.NAMESPACE_URL, name)))
    return parse_card(text, f"test card {name}")


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog([*builtin_cards(), *(_renamed_card(n) for n in (SLOW_MODEL, SCRIPTED_MODEL, UNSERVED_MODEL))])


@pytest.fixture(scope="session")
def engines(stories_int8: LoadedModel, stories_tokenizer: Tokenizer) -> Iterator[dict[str, Engine]]:
    model, tok = stories_int8.model, stories_tokenizer
    script = [tok.processor.piece_to_id(p) for p in SCRIPT_PIECES]
    assert tok.decode(script) == SCRIPT_TEXT
    built = {
        MODEL: Engine(model, tok, max_slots=4, max_queue=16, max_seq_len=CONTEXT,  # with a prefix cache, as `serve`
                      prefix_cache=PrefixCache(model.config, model.cache_dtype, capacity_tokens=512)),
        SLOW_MODEL: Engine(SlowModel(model, SLOW_STEP_SECONDS), tok, max_slots=1, max_queue=1,  # type: ignore[arg-type]
                           max_seq_len=CONTEXT),
        SCRIPTED_MODEL: Engine(ScriptedModel(model, script, tok.eos_id), tok, max_slots=2,  # type: ignore[arg-type]
                               max_queue=4, max_seq_len=CONTEXT),
    }
    for engine in built.values():
        engine.start()
    yield built
    for engine in built.values():
        engine.stop()


@pytest.fixture(scope="session")
def app(catalog: Catalog, engines: dict[str, Engine]) -> Iterator[FastAPI]:
    policy = Policy.in_memory(rate_limits=False, cache=False)
    yield create_app(catalog, engines, TOKENS, policy=policy)
    policy.close()


@pytest.fixture(scope="session")
def server(app: FastAPI) -> Iterator[LiveServer]:
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="session")
def base_url(server: LiveServer) -> str:
    return server.url


@pytest.fixture(scope="session")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def run_url() -> str:
    return f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"


@pytest.fixture(scope="session", autouse=True)
def _no_cloudflare_env() -> Iterator[None]:
    """The SDK adds X-Auth-* headers from the environment; tests choose their credentials explicitly."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("CLOUDFLARE_"):
                mp.delenv(name)
        yield


@pytest.fixture(scope="session")
def sdk(base_url: str) -> Iterator[Cloudflare]:
    client = Cloudflare(api_token=TOKEN, base_url=f"{base_url}/client/v4", max_retries=0, timeout=60)
    yield client
    client.close()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail with `what` after a generous deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_idle(engines: dict[str, Engine], timeout: float = 30.0) -> None:
    """Poll until no engine runs or queues anything (a generous deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = [e.stats() for e in engines.values()]
        if all(s.running == 0 and s.waiting == 0 for s in stats):
            return
        assert time.monotonic() < deadline, f"engines still busy: {stats}"
        time.sleep(0.01)


def uncancelled(engines: dict[str, Engine]) -> list[str]:
    """The request ids in the engines (running or queued) that nobody cancelled."""
    handles = []
    for engine in engines.values():
        with engine._wake:
            handles += [seq.handle for seq in engine._running.values()] + list(engine._waiting)
    return [h.request.request_id for h in handles if not h.cancelled.is_set()]


def assert_no_leak(engines: dict[str, Engine], grace: float = 5.0) -> None:
    """Once a test is over, whatever is left in the engines must have been cancelled (its client left): a request
    that still runs, or still waits, uncancelled `grace` seconds after the test is a leak — it is reported, not
    waited for. The cancelled ones are then waited for, so that the next test starts on idle engines."""
    deadline = time.monotonic() + grace
    while leaked := uncancelled(engines):
        assert time.monotonic() < deadline, f"requests left running after the test, never cancelled: {leaked}"
        time.sleep(0.01)
    wait_idle(engines)


@pytest.fixture(autouse=True)
def _engines_idle_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """No test leaves work in an engine for the next one, and none leaks a request nobody cancelled (only for tests
    that use the engines)."""
    yield
    if "engines" in request.fixturenames:
        assert_no_leak(request.getfixturevalue("engines"))
