"""`int8serve serve`'s flags are checked by ServeSettings alone, as their INT8SERVE_* variables are.

A review found serve's flags checked twice, by argparse helpers of the command line and by the settings, with other
bounds and words: `--prefix-cache-tokens 0` said "expected a whole number >= 1" where the bound is 16, and
`--cache-ttl 99999999` passed the command line to be refused by the settings only. Each value of a flag now goes to
ServeSettings as typed, as a variable's does: it takes or refuses the same values, and a refusal is one line naming the
flag and the bound it breaks (exit 2), said before anything loads. `--threads` is checked as every command checks it.
These run `main` in this process and stop it where serve would start checking its models (`startup.prepare`).
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import pytest

from int8serve import startup
from int8serve.cli import main
from int8serve.settings import (
    MAX_THREADS,
    PREFIX_CACHE_BLOCK_TOKENS,
    ServeSettings,
    env_name,
    flag_name,
    load_settings,
)

# every number setting of serve but --threads (checked as the other commands check theirs: below)
NUMBER_FLAGS = ("--port", "--max-queue", "--prefill-chunk", "--solo-prefill-tokens", "--prefix-cache-tokens",
                "--shutdown-timeout", "--max-connections", "--header-timeout", "--body-timeout", "--stall-timeout",
                "--max-inflight-per-account", "--database-timeout", "--rpm", "--cache-ttl", "--daily-neurons")
NASTY = ("0", "-1", "7" * 400, "nan", "inf", "1e400", "1e300", "", " 5")
# each number setting's upper bound and a value just above it (--threads': MAX_THREADS, below)
BOUNDS = {"--port": ("65535", "65536"), "--max-queue": ("1000000", "1000001"),
          "--prefill-chunk": ("1048576", "1048577"), "--solo-prefill-tokens": ("1048576", "1048577"),
          "--prefix-cache-tokens": ("2147483647", "2147483648"), "--shutdown-timeout": ("86400", "86400.5"),
          "--max-connections": ("1000000", "1000001"), "--header-timeout": ("86400", "86400.5"),
          "--body-timeout": ("86400", "86400.5"), "--stall-timeout": ("86400", "86400.5"),
          "--max-inflight-per-account": ("1000000", "1000001"), "--database-timeout": ("86400", "86400.5"),
          "--rpm": ("1000000000", "1000000001"), "--cache-ttl": ("2592000", "2592001"),
          "--daily-neurons": ("1000000000000", "1000000000000.5")}


class Reached(Exception):
    """serve got past its settings to the checks of its models: the settings it had."""


@pytest.fixture(autouse=True)
def settings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No INT8SERVE_* variable of the machine leaks in, and serve stops where it would check its models."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("INT8SERVE_"):
            monkeypatch.delenv(name)

    def stop(settings: ServeSettings) -> None:
        raise Reached(settings)

    monkeypatch.setattr(startup, "prepare", stop)


def serve(*argv: str) -> ServeSettings:
    """The settings `int8serve serve ARGV` starts with; SystemExit when it refuses them."""
    with pytest.raises(Reached) as reached:
        main(["serve", *argv])
    return reached.value.args[0]


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """What `int8serve serve ARGV` says when it refuses its flags (exit 2, as argparse's)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def field_of(flag: str) -> str:
    return next(name for name in ServeSettings.model_fields if flag_name(name) == flag)


def test_every_number_setting_is_checked_here() -> None:
    def is_number(annotation: Any) -> bool:
        union = get_origin(annotation) in (Union, UnionType)
        kinds = set(get_args(annotation)) - {type(None)} if union else {annotation}
        return bool(kinds) and kinds <= {int, float}

    numbers = {name for name, info in ServeSettings.model_fields.items() if is_number(info.annotation)}
    assert numbers == {field_of(flag) for flag in NUMBER_FLAGS} | {"threads"}
    assert set(BOUNDS) == set(NUMBER_FLAGS)


@pytest.mark.parametrize("flag", NUMBER_FLAGS)
def test_each_number_setting_takes_its_upper_bound_and_refuses_more_in_one_line(
        flag: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A number had no upper bound: --database-timeout 1e300 (or its variable) passed the settings and killed the
    ledger's deadline thread at its first database work (a traceback, then no deadline fired), and a --max-queue,
    --rpm or --prefill-chunk of 400 digits was taken as it was. Each has a bound now, which --help says
    (tests/test_settings.py)."""
    bound, above = BOUNDS[flag]
    field, variable = field_of(flag), env_name(field_of(flag))
    said = f"Input should be less than or equal to {bound} (got {above!r})"
    assert refused(capsys, flag, above) == f"int8serve serve: error: {flag}: {said}\n"
    for value in ("7" * 400, "1e300"):
        assert refused(capsys, flag, value).startswith(f"int8serve serve: error: {flag}: Input should be ")
    assert getattr(serve(flag, bound), field) == float(bound)
    monkeypatch.setenv(variable, above)
    assert refused(capsys) == f"int8serve serve: error: {variable}: {said}\n"
    monkeypatch.setenv(variable, bound)
    assert getattr(serve(), field) == float(bound)


@pytest.mark.parametrize(("argv", "variable"), [(["--account-rpm", "acct=1000000001"], "acct=1000000001"),
                                                (["--account-rpm", "a=5", "--account-rpm", f"acct={'7' * 400}"],
                                                 f"a=5,acct={'7' * 400}")])
def test_an_accounts_requests_per_minute_are_bounded_as_rpm(argv: list[str], variable: str,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    said = "Value error, acct: requests per minute must be at most 1000000000"
    assert refused(capsys, *argv).startswith(f"int8serve serve: error: --account-rpm: {said} (got ")
    monkeypatch.setenv("INT8SERVE_ACCOUNT_RPM", variable)
    assert refused(capsys).startswith(f"int8serve serve: error: INT8SERVE_ACCOUNT_RPM: {said} (got ")
    assert serve("--account-rpm", "acct=1000000000").account_rpm == {"acct": 1_000_000_000}


@pytest.mark.parametrize("value", NASTY)
@pytest.mark.parametrize("flag", NUMBER_FLAGS)
def test_a_flag_takes_what_its_variable_takes_and_refuses_it_in_one_line(
        flag: str, value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    field = field_of(flag)
    monkeypatch.setenv(env_name(field), value)
    try:
        from_variable: Any = getattr(load_settings({}).settings, field)
    except ValueError as err:
        from_variable = str(err)
    monkeypatch.delenv(env_name(field))
    if not isinstance(from_variable, str):  # taken: the same value from the flag
        assert getattr(serve(flag, value), field) == from_variable
        return
    said = refused(capsys, flag, value)
    assert said == f"int8serve serve: error: {from_variable.replace(env_name(field), flag, 1)}\n"
    assert said.startswith(f"int8serve serve: error: {flag}: ")


@pytest.mark.parametrize(("argv", "message"), [
    (["--prefix-cache-tokens", "0"], "--prefix-cache-tokens: Input should be greater than or equal to 16 (got '0')"),
    (["--prefix-cache-tokens", "5"], "--prefix-cache-tokens: Input should be greater than or equal to 16 (got '5')"),
    (["--cache-ttl", "99999999"], "--cache-ttl: Input should be less than or equal to 2592000 (got '99999999')"),
    (["--cache-ttl", "0"], "--cache-ttl: Input should be greater than or equal to 1 (got '0')"),
    (["--max-connections", "0"], "--max-connections: Input should be greater than or equal to 1 (got '0')"),
    (["--port", "65536"], "--port: Input should be less than or equal to 65535 (got '65536')"),
    (["--rpm", "-1"], "--rpm: Input should be greater than or equal to 0 (got '-1')"),
    (["--header-timeout", "0"], "--header-timeout: Input should be greater than 0 (got '0')"),
    (["--daily-neurons", "nan"], "--daily-neurons: Input should be a finite number (got 'nan')"),
    (["--max-queue", "2.5"], "--max-queue: Input should be a valid integer, unable to parse string as an integer "
                             "(got '2.5')"),
    (["--dtype", "fp8"], "--dtype: Input should be 'int8' or 'fp32' (got 'fp8')"),
    (["--kv-cache", "fp8"], "--kv-cache: Input should be 'auto', 'bf16', 'fp16' or 'int8' (got 'fp8')"),
    (["--quantizer", "awq"], "--quantizer: Input should be 'gptq' or 'rtn' (got 'awq')"),
    (["--log-format", "xml"], "--log-format: Input should be 'text' or 'json' (got 'xml')"),
    (["--cache-scope", "world"], "--cache-scope: Input should be 'account' or 'global' (got 'world')"),
    (["--log-level", "loud", "--max-queue", "-1"], "--max-queue: Input should be greater than or equal to 0 (got "
     "'-1'); --log-level: Input should be 'critical', 'error', 'warning', 'info' or 'debug' (got 'loud')"),
])
def test_a_refusal_names_the_flag_and_the_settings_bound(argv: list[str], message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert refused(capsys, *argv) == f"int8serve serve: error: {message}\n"


def test_the_flags_values_are_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = serve("--port", "0", "--max-queue", " 5", "--prefix-cache-tokens", "16", "--cache-ttl", "2592000",
                     "--shutdown-timeout", "0", "--header-timeout", "1e-3", "--daily-neurons", "--dtype", "fp32",
                     "--log-level", "debug", "--cache-scope", "global")
    assert (settings.port, settings.max_queue, settings.prefix_cache_tokens, settings.cache_ttl) == (0, 5, 16, 2592000)
    assert (settings.shutdown_timeout, settings.header_timeout, settings.daily_neurons) == (0.0, 0.001, 10_000.0)
    assert (settings.dtype, settings.log_level, settings.cache_scope) == ("fp32", "debug", "global")
    monkeypatch.setenv("INT8SERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("INT8SERVE_DTYPE", "fp32")
    assert (serve().max_queue, serve("--max-queue", "9").max_queue, serve("--dtype", "int8").dtype) == (7, 9, "int8")


def test_help_shows_each_choice_and_default_from_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, info in ServeSettings.model_fields.items():
        if get_origin(info.annotation) is Literal:
            choices = "{" + ",".join(get_args(info.annotation)) + "}"
            assert f"{flag_name(name)} {choices}" in text, name
            assert f"{env_name(name)}; default: {info.default}]" in text, name


@pytest.mark.parametrize("value", [*NASTY, "1025"])
def test_threads_are_checked_as_every_command_checks_them(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    if value == " 5":
        assert serve("--threads", value).threads == 5
        return
    said = refused(capsys, "--threads", value).splitlines()[-1]
    assert said == f"int8serve serve: error: argument --threads: expected a whole number from 1 to {MAX_THREADS}, " \
                   f"got {value!r}"
    with pytest.raises(SystemExit):
        main(["generate", "--threads", value, "hello"])
    assert capsys.readouterr().err.splitlines()[-1] == said.replace("int8serve serve:", "int8serve generate:")


def test_a_prefill_chunk_the_prefix_cache_cannot_take_is_refused_before_anything_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--prefill-chunk 100 passed the settings: serve listened, printed its token, loaded the model, and only then
    said that the chunk must be a multiple of the prefix cache's block (exit 1)."""
    from int8serve.engine.prefix_cache import DEFAULT_BLOCK_TOKENS

    assert PREFIX_CACHE_BLOCK_TOKENS == DEFAULT_BLOCK_TOKENS
    problem = "Value error, expected a multiple of 16 with the prefix cache, whose blocks are 16 tokens " \
              "(--no-prefix-cache turns it off) (got {})"
    assert refused(capsys, "--prefill-chunk", "100") == \
        f"int8serve serve: error: --prefill-chunk: {problem.format(repr('100'))}\n"
    config = tmp_path / "int8serve.toml"
    config.write_text("prefill_chunk = 8\n")
    assert refused(capsys, "--config", str(config)) == \
        f"int8serve serve: error: prefill_chunk in {config}: {problem.format(8)}\n"
    monkeypatch.setenv("INT8SERVE_PREFILL_CHUNK", "24")
    assert refused(capsys) == f"int8serve serve: error: INT8SERVE_PREFILL_CHUNK: {problem.format(repr('24'))}\n"
    # without the prefix cache (off, or the fp32 reference's: none) any chunk of 1 or more
    assert serve("--no-prefix-cache").prefill_chunk == serve("--dtype", "fp32").prefill_chunk == 24
    monkeypatch.setenv("INT8SERVE_PREFIX_CACHE", "false")
    assert serve("--prefill-chunk", "100").prefill_chunk == 100
    assert serve("--prefix-cache", "--prefill-chunk", "96").prefill_chunk == 96


@pytest.mark.parametrize("tokens", ["2147483648", "9" * 20, "7" * 400])
def test_a_prefix_cache_no_memory_could_hold_is_refused_before_anything_loads(
        tokens: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--prefix-cache-tokens (or its variable) of 20 digits or more passed the settings and ended serve, once the
    model had loaded, in torch's C++ stack dump ("Overflow when unpacking long long"); fewer, in "Storage size
    calculation overflowed". At most 2**31 - 1 tokens now (about a TiB of keys and values even for stories260K)."""
    shown = repr(tokens) if len(tokens) < 79 else f"'{tokens[:76]}..."
    assert refused(capsys, "--prefix-cache-tokens", tokens) == (
        "int8serve serve: error: --prefix-cache-tokens: Input should be less than or equal to 2147483647 "
        f"(got {shown})\n")
    monkeypatch.setenv("INT8SERVE_PREFIX_CACHE_TOKENS", tokens)
    assert refused(capsys).startswith("int8serve serve: error: INT8SERVE_PREFIX_CACHE_TOKENS: Input should be less "
                                      "than or equal to 2147483647")
    assert serve("--prefix-cache-tokens", "2147483647").prefix_cache_tokens == 2**31 - 1
