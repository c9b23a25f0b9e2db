"""OpenAI-compatible routes (contract §5), over the same request pipeline as `/ai/run`.

Routes, under `/client/v4/accounts/{account_id}/ai/v1/` and as plain `/v1/` aliases (the account then is the one
the bearer token belongs to):

* `POST chat/completions`: `messages` through the card's chat template (the Workers AI llama2 template, exactly as
  `/ai/run` with `messages`);
* `POST completions`: `prompt` as is, no template (`/ai/run` with `raw: true`);
* `GET models`: the served models as an OpenAI list (`id` = card name, `owned_by` = the name's author segment).

Both POST routes call `InferencePipeline.run` with a wire format of their own (one instance per request: it holds
the answer's id, `created` and the "role sent yet" state of a stream), so authentication, the rate limit, the
response cache, metering and the ledger are exactly those of `/ai/run`.

Request fields. The body is translated into a Workers AI body and checked by `validate_run_body`, so types and
ranges are the card's: `temperature` 0–5 (a superset of OpenAI's 0–2; default the card's 0.6, not OpenAI's 1),
`top_p`, `seed` (1–9999999999), `frequency_penalty`, `presence_penalty`, and the extensions `top_k` and
`repetition_penalty`. `max_completion_tokens` wins over `max_tokens` (both given and different: 400). `stop` is a
string or a list of up to 4 non-empty strings. Accepted but without effect ("harmless, as the SDK or common tools
send them"): `user`, `n: 1`, `stream_options` (its `include_usage` is honoured), `logprobs: false`/`null`,
`top_logprobs: null`, `echo: false`, `best_of: 1`, `suffix: null`, `response_format: {"type": "text"}`,
`tools: []`, `tool_choice: "none"`, `parallel_tool_calls`, `store: false`, `metadata`, `options` (Workers AI's
`rejectIfBusy`, contract §5.1). Anything else → 400 naming the field.

Stop sequences are applied to the engine's text by `StopWatcher` (the format's `watch` hook, which the pipeline
applies to the engine request): text that could still be the start of a stop sequence is held back, so a partial
stop string is never streamed; when one matches, the engine request is cancelled and the answer ends there with
`finish_reason: "stop"`, the stop text left out, and usage counting the tokens generated until then. The stop
sequences are part of the sampling parameters (`StopParams`), hence of the response cache key.

Errors are `{"error": {"message", "type", "param", "code"}}` with the Workers AI code as `code` (an integer) and
the same status as on `/ai/run`, except: an unknown model (5007) is 404 (the SDK's NotFoundError) and missing
credentials (9106) are 401.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from int8serve.catalog.card import ModelCard
from int8serve.engine.sampling import SamplingParams
from int8serve.engine.scheduler import RequestHandle, TokenEvent

from .auth import authenticate, token_account
from .errors import BAD_INPUT, ApiError, ErrorKind, json_response, openai_error, openai_error_response
from .inputs import ValidatedRun, validate_run_body
from .pipeline import InferencePipeline
from .streaming import DONE_FRAME, Answer, encode_frame, usage

__all__ = ["ChatFormat", "CompletionFormat", "StopParams", "StopWatcher", "openai_error", "openai_router"]

MAX_STOP_SEQUENCES = 4

# fields both endpoints accept and act on, and harmless ones accepted with these values only (None: any value)
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "frequency_penalty",
           "presence_penalty", "stop", "stream", "stream_options", "top_k", "repetition_penalty", "options"}
_IGNORED_ANY = {"user", "parallel_tool_calls", "metadata"}
_IGNORED_IF: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "store": (None, False),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
}


def _bad(detail: str) -> ApiError:
    return ApiError(BAD_INPUT, detail=detail)


@dataclasses.dataclass(frozen=True)
class StopParams(SamplingParams):
    """Sampling parameters with the OpenAI stop sequences: they reach the cache key with the other parameters."""

    stop: tuple[str, ...] = ()


# --- stop sequences ---------------------------------------------------------------------------------------------


class StopWatcher:
    """A `RequestHandle` look-alike applying `stops` to the events of `inner`: text that may begin a stop sequence
    is held back; a match cancels `inner` and ends the events with `finish_reason` "stop"."""

    def __init__(self, inner: RequestHandle, stops: Sequence[str]) -> None:
        self.inner = inner
        self.request = inner.request
        self.stops = tuple(stops)
        self._pending = ""
        self._done = False

    def cancel(self) -> None:
        self.inner.cancel()

    def _hold(self) -> int:
        """How many characters at the end of the pending text could begin a stop sequence."""
        text = self._pending
        for size in range(min(len(text), max(len(s) for s in self.stops) - 1), 0, -1):
            if any(s.startswith(text[-size:]) for s in self.stops):
                return size
        return 0

    async def events(self) -> AsyncIterator[TokenEvent]:
        async for event in self.inner.events():
            if self._done:  # after a match (billing re-reads the events): only the counts matter
                yield dataclasses.replace(event, text="")
                continue
            self._pending += event.text
            found = [(i, s) for s in self.stops if (i := self._pending.find(s)) >= 0]
            if found:
                index = min(i for i, _ in found)
                text, self._pending, self._done = self._pending[:index], "", True
                self.inner.cancel()
                yield dataclasses.replace(event, text=text, token_id=None, finish_reason="stop", error=None)
                return
            if event.finish_reason is not None:
                text, self._pending = self._pending, ""
                self._done = True
                yield dataclasses.replace(event, text=text)
                return
            keep = self._hold()
            cut = len(self._pending) - keep
            text, self._pending = self._pending[:cut], self._pending[cut:]
            yield dataclasses.replace(event, text=text)


# --- request bodies ---------------------------------------------------------------------------------------------


def _check_fields(body: Any, own: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = [k for k in body if k not in own and k not in _COMMON and k not in _IGNORED_ANY
               and k not in _IGNORED_IF]
    if unknown:
        raise _bad(f"unsupported field(s): {', '.join(repr(k) for k in unknown)}")
    for name, allowed in _IGNORED_IF.items():
        if name in body and not any(body[name] == a and type(body[name]) is type(a) for a in allowed):
            if name == "n":
                raise _bad(f"'n' must be 1 (one choice per request), got {body[name]!r}")
            raise _bad(f"'{name}' is not supported with the value {body[name]!r}")
    return body


def _model_name(body: Any) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise _bad("'model' is required: the name of a served model, e.g. @cf/meta/llama-2-7b-chat-int8")
    return body["model"]


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _bad(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    if any(not s for s in stops):
        raise _bad("'stop' sequences must not be empty")
    return tuple(dict.fromkeys(stops))


def _max_tokens(body: dict[str, Any]) -> Any:
    new, old = body.get("max_completion_tokens"), body.get("max_tokens")
    if new is not None and old is not None and new != old:
        raise _bad("'max_tokens' and 'max_completion_tokens' differ: give one of them")
    return new if new is not None else old


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise _bad("'stream_options' takes only 'include_usage'")
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise _bad("'stream_options.include_usage' must be a boolean")
    return bool(value)


def _message_text(content: Any, index: int) -> Any:
    """OpenAI content parts of type text become one string; other parts (images, audio) are refused."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise _bad(f"'/messages/{index}/content': only text content parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, list):
        raise _bad(f"'prompt' must be one string (batches are not supported), got a list of {len(value)}")
    if not isinstance(value, str):
        raise _bad("'prompt' must be a string (token id prompts are not supported)")
    return value


def _validated(body: dict[str, Any], card: ModelCard, workers_ai: dict[str, Any]) -> ValidatedRun:
    for name in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "top_k",
                 "repetition_penalty", "stream", "options"):
        if body.get(name) is not None:
            workers_ai[name] = body[name]
    max_tokens = _max_tokens(body)
    if max_tokens is not None:
        workers_ai["max_tokens"] = max_tokens
    stops = _stops(body.get("stop"))
    checked = validate_run_body(workers_ai, card)
    return dataclasses.replace(checked, params=StopParams(**dataclasses.asdict(checked.params), stop=stops))


# --- wire formats -----------------------------------------------------------------------------------------------


def _finish(answer: Answer) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


class _OpenAIFormat:
    """What chat and completions share; one instance per request."""

    prefix = ""
    obj = ""
    own: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.id = f"{self.prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = ""
        self.include_usage = False

    def model_in_body(self, body: Any) -> str:
        return _model_name(body)

    def validate(self, body: Any, card: ModelCard) -> ValidatedRun:
        body = _check_fields(body, self.own)
        self.model = card.name
        self.include_usage = _include_usage(body)
        return self._validate(body, card)

    def _validate(self, body: dict[str, Any], card: ModelCard) -> ValidatedRun:
        raise NotImplementedError

    def watch(self, handle: RequestHandle) -> Any:
        """The pipeline's hook on the engine request: stop sequences."""
        stops = getattr(handle.request.params, "stop", ())
        return StopWatcher(handle, stops) if stops else handle

    def _envelope(self, choices: list[dict[str, Any]], obj: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": obj or self.obj, "created": self.created, "model": self.model,
                "choices": choices}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def final_frames(self, answer: Answer, neurons: float) -> Sequence[bytes]:
        frames = [encode_frame(self._envelope([self._last_choice(_finish(answer))], self._chunk_obj))]
        if self.include_usage:
            frames.append(encode_frame({**self._envelope([], self._chunk_obj), "usage": {
                **usage(answer.prompt_tokens, answer.completion_tokens), "neurons": neurons}}))
        frames.append(DONE_FRAME)
        return frames

    _chunk_obj = ""

    def _last_choice(self, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def error_frame(self, kind: ErrorKind) -> bytes:
        return encode_frame(openai_error(kind.code, kind.template, kind.status))


class ChatFormat(_OpenAIFormat):
    prefix = "chatcmpl-"
    obj = "chat.completion"
    _chunk_obj = "chat.completion.chunk"
    own = frozenset({"messages"})

    def __init__(self) -> None:
        super().__init__()
        self._role_sent = False

    def _validate(self, body: dict[str, Any], card: ModelCard) -> ValidatedRun:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' is required: a non-empty list of {role, content} messages")
        converted = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _bad(f"'/messages/{index}' must be an object")
            if message.get("role") not in ("system", "user", "assistant"):
                raise _bad(f"'/messages/{index}/role' must be system, user or assistant")
            converted.append({"role": message["role"], "content": _message_text(message.get("content"), index)})
        return _validated(body, card, {"messages": converted})

    def json_body(self, answer: Answer) -> Any:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                  "finish_reason": _finish(answer)}
        return {**self._envelope([choice]), "usage": usage(answer.prompt_tokens, answer.completion_tokens)}

    def _delta(self, content: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        if content is not None:
            delta["content"] = content
        return delta

    def delta_frame(self, text: str) -> bytes:
        choice = {"index": 0, "delta": self._delta(text), "logprobs": None, "finish_reason": None}
        return encode_frame(self._envelope([choice], self._chunk_obj))

    def _last_choice(self, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "delta": self._delta(None), "logprobs": None, "finish_reason": finish_reason}


class CompletionFormat(_OpenAIFormat):
    prefix = "cmpl-"
    obj = "text_completion"
    _chunk_obj = "text_completion"
    own = frozenset({"prompt"})

    def _validate(self, body: dict[str, Any], card: ModelCard) -> ValidatedRun:
        return _validated(body, card, {"prompt": _prompt(body.get("prompt")), "raw": True})

    def json_body(self, answer: Answer) -> Any:
        choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": _finish(answer)}
        return {**self._envelope([choice]), "usage": usage(answer.prompt_tokens, answer.completion_tokens)}

    def delta_frame(self, text: str) -> bytes:
        return encode_frame(self._envelope([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]))

    def _last_choice(self, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}


# --- errors -----------------------------------------------------------------------------------------------------

def _error_response(err: ApiError) -> Response:
    return openai_error_response(err)


# --- routes -----------------------------------------------------------------------------------------------------


def _created(card: ModelCard) -> int:
    raw = (card.front_matter.get("model") or {}).get("created_at")
    try:
        return int(datetime.fromisoformat(str(raw)).timestamp()) if raw is not None else 0
    except ValueError:
        return 0


def openai_router(pipeline: InferencePipeline, prefix: str = "/client/v4/accounts/{account_id}/ai/v1") -> APIRouter:
    """The OpenAI-compatible routes under `prefix`, and their `/v1` aliases."""
    router = APIRouter()

    async def chat(request: Request, account_id: str) -> Response:
        try:
            return await pipeline.run(request, account_id, None, ChatFormat())
        except ApiError as err:
            return _error_response(err)

    async def completions(request: Request, account_id: str) -> Response:
        try:
            return await pipeline.run(request, account_id, None, CompletionFormat())
        except ApiError as err:
            return _error_response(err)

    async def models(request: Request, account_id: str) -> Response:
        try:
            authenticate(request.headers, account_id, pipeline.tokens)
        except ApiError as err:
            return _error_response(err)
        data = [{"id": card.name, "object": "model", "created": _created(card), "owned_by": card.author}
                for card in (pipeline.catalog.get(name) for name in pipeline.engines)]
        return json_response({"object": "list", "data": data})

    def aliased(handler: Any) -> Any:
        async def alias(request: Request) -> Response:
            try:
                account = token_account(request.headers, pipeline.tokens)
            except ApiError as err:
                return _error_response(err)
            return await handler(request, account)
        return alias

    for path, handler, method in (("/chat/completions", chat, "POST"), ("/completions", completions, "POST"),
                                  ("/models", models, "GET")):
        router.add_api_route(prefix + path, handler, methods=[method])
        router.add_api_route("/v1" + path, aliased(handler), methods=[method])
    return router
