"""Structured logs: one line per request on the `int8serve.request` logger, as text or JSON.

The line's fields travel on the log record as `record.fields` (a dict); `JsonFormatter` writes them as one JSON
object per line, `TextFormatter` (the default) writes the message, which already reads `key=value ...`.

Fields of an inference request's line (`metrics.RequestObservation`): `request_id` (the `cf-ai-req-id` header),
`account`, `model`, `status` (the HTTP status sent), `error_code` (the Workers AI code of an error answer or of a
stream's error frame, else null), `outcome` (ok, aborted, error, rejected; `aborted`: the client left, error_code
3008 — a stream keeps the 200 it was sent and is sent no error frame; logged at INFO), `prompt_tokens`,
`completion_tokens`, `neurons`, `cached`, `stream`, and timings in seconds: `queue_s` (waiting for a slot), `ttft_s`
(request received → first token), `total_s` (request received → answer complete).

Every other answer (a 401, a 404, the lifecycle gate's 503, the models' list, ...) has a line of its own, written by
`metrics.MetricsMiddleware`: `request_id`, `account` (once the token is known: else null), `route` (the route
template, as in the metrics), `status`, `error_code` (the answer's `errors[0].code` or `error.code`), `outcome` (ok,
rejected) and `total_s`. Probes and scrapes that are answered as expected (`/healthz`, `/metrics` 2xx, `/readyz`
200 or 503) are logged at DEBUG only: they come every few seconds.

Prompt and response text are never logged unless the operator asks for it (`--log-prompts`): then `prompt` (the
body's `prompt` or `messages`) and `response` are added.

Values come from clients (a model name in a URL, a prompt), so no log line may carry their control characters: an
escape sequence would rewrite the operator's terminal, a newline would forge a log line. `EscapeControls`, on every
handler `configure_logging` installs (uvicorn's access log included), writes them as `\x1b`, `\n`, ... . Values
written as JSON (quoted text values, every JSON line) go through `_json`: `json.dumps` escapes only what JSON
requires (below U+0020), so it also escapes DEL, the C1 controls (U+0085 NEL, U+009B CSI) and U+2028/U+2029, which
terminals act on and line-splitting readers (Python's `str.splitlines`, many log viewers) take for line ends.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..stderr_handler import StderrHandler

__all__ = ["ACCOUNT_SCOPE_KEY", "LOG_FORMATS", "OBSERVED_SCOPE_KEY", "REQUEST_ID_SCOPE_KEY", "REQUEST_LOGGER",
           "EscapeControls", "JsonFormatter", "TextFormatter", "configure_logging", "escape_controls", "log_request"]

REQUEST_LOGGER = "int8serve.request"
# what the middleware leaves in an HTTP request's ASGI scope for those inside it
REQUEST_ID_SCOPE_KEY = "int8serve.request_id"  # its `cf-ai-req-id`
ACCOUNT_SCOPE_KEY = "int8serve.account"  # the account its token acts for, once authenticated
OBSERVED_SCOPE_KEY = "int8serve.observed"  # an inference request: its own line is written (RequestObservation)
LOG_FORMATS = ("text", "json")

request_log = logging.getLogger(REQUEST_LOGGER)
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_JSON_UNESCAPED_CONTROLS = re.compile(r"[\x7f-\x9f\u2028\u2029]")  # the ones json.dumps leaves raw


def escape_controls(text: str) -> str:
    """`text` with every control character written as a Python escape (`\x1b`, `\n`)."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _json(value: Any) -> str:
    """`value` as one line of JSON without any control character (parsed back, it is `value` again)."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return _JSON_UNESCAPED_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class EscapeControls(logging.Filter):
    """Escapes control characters in a record's message arguments (and in a message without arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.args:  # a record logged without arguments has `args == ()`
            if isinstance(record.msg, str):
                record.msg = escape_controls(record.msg)
        elif isinstance(record.args, tuple):
            record.args = tuple(escape_controls(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: escape_controls(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if value else "0"
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=' for c in value):
        return escape_controls(value)
    return _json(value)


def log_request(fields: Mapping[str, Any], level: int | None = None) -> None:
    """Write one request line (by default INFO; WARNING for 5xx answers and stream error frames, not for a client
    that left: outcome `aborted`)."""
    message = "request " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
    status = fields.get("status") or 0
    if level is None:
        failed = status >= 500 or (status == 200 and fields.get("error_code"))
        level = logging.WARNING if failed and fields.get("outcome") != "aborted" else logging.INFO
    request_log.log(level, message, extra={"fields": dict(fields)})


class TextFormatter(logging.Formatter):
    """`2026-01-01T00:00:00.000Z INFO int8serve.request request request_id=... status=200 ...`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts`, `level`, `logger`, `message` (or the request fields), `exc_info`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out["event"] = "request"
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return _json(out)


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def configure_logging(log_format: str = "text", level: str = "info") -> logging.Handler:
    """Send the `int8serve` loggers (and, for JSON, uvicorn's) to stderr in `log_format`. Returns the handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(EscapeControls())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # uvicorn's own handlers in text mode
        for existing in logging.getLogger(name).handlers:
            existing.addFilter(EscapeControls())
    names = ["int8serve"] + (["uvicorn", "uvicorn.error", "uvicorn.access"] if log_format == "json" else [])
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    return handler
