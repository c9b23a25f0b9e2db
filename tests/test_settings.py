"""`int8serve serve` settings: flags > INT8SERVE_* variables > the --config TOML file > defaults, every field documented
in --help, bad values named by where they came from, secrets never printed."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pytest

from int8serve import cli
from int8serve.cli import build_parser, main
from int8serve.engine.quant_options import QUANTIZER_TIMES
from int8serve.settings import (
    CHOICE_VARIABLES,
    CONFIG_ENV,
    DEFAULT_CACHE_TTL,
    DEFAULT_DAILY_NEURONS,
    ENGINE_VARIABLE_HELP,
    ENGINE_VARIABLES,
    ServeSettings,
    SettingsFileError,
    check_engine_variables,
    env_name,
    flag_name,
    help_text,
    known_variables,
    load_settings,
    unknown_variable_warnings,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No INT8SERVE_* variable of the machine or of another test leaks in."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("INT8SERVE_"):
            monkeypatch.delenv(name)


def flags(*argv: str) -> dict:
    """What the command line gives load_settings: only the flags that were typed."""
    return {k: v for k, v in vars(build_parser().parse_args(["serve", *argv])).items() if k != "command"}


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "int8serve.toml"
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_given() -> None:
    loaded = load_settings(flags())
    s = loaded.settings
    assert (s.model, s.dtype, s.port, s.max_queue, s.shutdown_timeout, s.response_cache, s.cache_ttl) == (
        [], "int8", 8787, 32, 30.0, True, DEFAULT_CACHE_TTL)
    assert s.served_model_name is None
    assert set(loaded.sources.values()) == {"default"}


def test_flag_beats_variable_beats_file_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, 'port = 1111\nmax-queue = 7\nprefill_chunk = 64\nlog_format = "json"\n'
                                    'account_rpm = {a = 5}\n')
    monkeypatch.setenv("INT8SERVE_PORT", "2222")
    monkeypatch.setenv("INT8SERVE_MAX_QUEUE", "8")
    loaded = load_settings(flags("--config", str(config), "--port", "3333"))
    s = loaded.settings
    assert s.port == 3333  # flag over variable over file
    assert s.max_queue == 8  # variable over file
    assert s.prefill_chunk == 64 and s.log_format == "json" and s.account_rpm == {"a": 5}  # file over default
    assert s.cache_ttl == DEFAULT_CACHE_TTL  # default
    assert (loaded.sources["port"], loaded.sources["max_queue"], loaded.sources["prefill_chunk"],
            loaded.sources["cache_ttl"]) == ("flag", "env", "file", "default")


def test_config_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(write_config(tmp_path, "rpm = 0\nresponse_cache = false\n")))
    s = load_settings(flags()).settings
    assert s.rpm == 0 and s.response_cache is False


def test_lists_and_tables_from_each_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INT8SERVE_TOKENS", "t1=a, t2=b")
    monkeypatch.setenv("INT8SERVE_ACCOUNT_RPM", "a=60,b=0")
    monkeypatch.setenv("INT8SERVE_CARD", "x.txt,y")
    s = load_settings(flags()).settings
    assert s.tokens == ["t1=a", "t2=b"] and s.account_rpm == {"a": 60, "b": 0} and s.card == [Path("x.txt"), Path("y")]
    s = load_settings(flags("--token", "t3=c", "--account-rpm", "c=1", "--account-rpm", "d=2")).settings
    assert s.tokens == ["t3=c"] and s.account_rpm == {"c": 1, "d": 2}  # flags replace the variables


def test_models_from_each_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--model is repeatable (PATH or NAME=PATH), the variable comma-separated, the file a string or a list."""
    argv = ["--model", "/m/llama", "--model", "@hf/huggingfacetb/smollm2-135m-instruct=/m/smol.gguf"]
    assert load_settings(flags(*argv)).settings.model == argv[1::2]
    monkeypatch.setenv("INT8SERVE_MODEL", "@cf/a/b=/m/a, @cf/c/d=org/name")
    assert load_settings(flags()).settings.model == ["@cf/a/b=/m/a", "@cf/c/d=org/name"]
    monkeypatch.delenv("INT8SERVE_MODEL")
    assert load_settings(flags("--config", str(write_config(tmp_path, 'model = "/m/x"\n')))).settings.model == [
        "/m/x"]
    config = write_config(tmp_path, 'model = ["@cf/a/b=/m/a", "/m/y"]\n')
    assert load_settings(flags("--config", str(config))).settings.model == ["@cf/a/b=/m/a", "/m/y"]
    with pytest.raises(ValueError, match=r"--model: .*expected NAME=PATH .*got '@cf/a/b='"):
        load_settings(flags("--model", "@cf/a/b="))


def test_boolean_flags_override_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INT8SERVE_RESPONSE_CACHE", "false")
    monkeypatch.setenv("INT8SERVE_LOG_PROMPTS", "true")
    assert load_settings(flags()).settings.response_cache is False
    s = load_settings(flags("--cache", "--no-log-prompts")).settings
    assert s.response_cache is True and s.log_prompts is False
    assert load_settings(flags("--daily-neurons")).settings.daily_neurons == DEFAULT_DAILY_NEURONS


@pytest.mark.parametrize(("source", "message"), [
    ("flag", "--max-queue: Input should be greater than or equal to 0 (got '-1')"),
    ("env", "INT8SERVE_MAX_QUEUE: Input should be greater than or equal to 0 (got '-1')"),
    ("file", "max_queue in "),
])
def test_a_bad_value_names_where_it_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                               message: str) -> None:
    argv: list[str] = []
    if source == "flag":
        argv = ["--max-queue", "-1"]
    elif source == "env":
        monkeypatch.setenv("INT8SERVE_MAX_QUEUE", "-1")
    else:
        argv = ["--config", str(write_config(tmp_path, "max_queue = -1\n"))]
    with pytest.raises(ValueError, match="greater than or equal to 0") as info:
        load_settings(flags(*argv))
    assert message in str(info.value)


def test_solo_prefill_tokens_is_the_engines_choice_by_default_and_takes_no_negative(monkeypatch: pytest.MonkeyPatch
                                                                                    ) -> None:
    assert load_settings(flags()).settings.solo_prefill_tokens is None  # the engine's: where it pays
    assert load_settings(flags("--solo-prefill-tokens", "0")).settings.solo_prefill_tokens == 0
    monkeypatch.setenv("INT8SERVE_SOLO_PREFILL_TOKENS", "1024")
    assert load_settings(flags()).settings.solo_prefill_tokens == 1024
    with pytest.raises(ValueError, match=r"--solo-prefill-tokens: Input should be greater than or equal to 0"):
        load_settings(flags("--solo-prefill-tokens", "-128"))


@pytest.mark.parametrize("threads", ["0", "1025", "99999999999"])
def test_threads_beyond_what_torch_takes_are_refused_from_each_source(threads: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """INT8SERVE_THREADS or the file's threads = 99999999999 passed the settings and ended serve, after its
    start-up checks, in a traceback from torch.set_num_threads ("Overflow when unpacking long")."""
    monkeypatch.setenv("INT8SERVE_THREADS", threads)
    with pytest.raises(ValueError, match=rf"INT8SERVE_THREADS: Input should be .+ (1|1024) \(got '{threads}'\)"):
        load_settings(flags())
    monkeypatch.delenv("INT8SERVE_THREADS")
    with pytest.raises(ValueError, match=r"threads in .+: Input should be"):
        load_settings(flags("--config", str(write_config(tmp_path, f"threads = {threads}\n"))))
    assert load_settings(flags("--config", str(write_config(tmp_path, "threads = 1024\n")))).settings.threads == 1024


def test_bad_variables_are_errors_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INT8SERVE_PORT", "eighty")
    with pytest.raises(ValueError, match=r"INT8SERVE_PORT: .*integer"):
        load_settings(flags())
    monkeypatch.setenv("INT8SERVE_PORT", "80")
    monkeypatch.setenv("INT8SERVE_ACCOUNT_RPM", "a=lots")
    with pytest.raises(ValueError, match=r"INT8SERVE_ACCOUNT_RPM: .*expected ACCOUNT=N"):
        load_settings(flags())


@pytest.mark.parametrize("token", ["s3cret token", "s3cr\u00e9t", "s3cret\u200b", ""])
def test_a_metrics_token_must_be_one_a_header_can_carry(token: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked with the settings, as the API tokens are; the error names where it came from, never the token."""
    with pytest.raises(ValueError) as flag:
        load_settings(flags("--metrics-token", token))
    monkeypatch.setenv("INT8SERVE_METRICS_TOKEN", token)
    with pytest.raises(ValueError) as env:
        load_settings(flags())
    monkeypatch.delenv("INT8SERVE_METRICS_TOKEN")
    config = write_config(tmp_path, f"metrics_token = {json.dumps(token)}\n")
    with pytest.raises(ValueError) as file:
        load_settings(flags("--config", str(config)))
    for refused, origin in [(flag, "--metrics-token"), (env, "INT8SERVE_METRICS_TOKEN"),
                            (file, f"metrics_token in {config}")]:
        assert str(refused.value) == (f"{origin}: Value error, expected one or more visible ASCII characters (no "
                                      "spaces) (got a hidden value)")
    assert load_settings(flags("--metrics-token", "s3cret-token_~!")).settings.metrics_token == "s3cret-token_~!"


def test_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(SettingsFileError, match="no such config file"):
        load_settings(flags("--config", str(tmp_path / "missing.toml")))
    with pytest.raises(SettingsFileError, match="not a readable TOML file"):
        load_settings(flags("--config", str(write_config(tmp_path, "port = = 1\n"))))
    with pytest.raises(SettingsFileError, match=r"unknown setting.*max_queeue"):
        load_settings(flags("--config", str(write_config(tmp_path, "max_queeue = 1\n"))))
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("port = 8080\n# café\n".encode("latin-1"))
    with pytest.raises(SettingsFileError, match=rf"^{latin1}:2: not UTF-8 text \(byte 0xe9\)"):
        load_settings(flags("--config", str(latin1)))


def test_an_endless_or_huge_config_file_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """`--config /dev/zero` read until the machine ran out of memory (23.5 GB, killed); a pipe still works."""
    with pytest.raises(SettingsFileError, match=r"^/dev/zero: larger than 1 MiB; not a config file$"):
        load_settings(flags("--config", "/dev/zero"))
    big = write_config(tmp_path, "port = 8080\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(SettingsFileError, match="larger than 1 MiB"):
        load_settings(flags("--config", str(big)))
    read, write = os.pipe()
    os.write(write, b"max_queue = 7\n")
    os.close(write)
    try:
        assert load_settings(flags("--config", f"/dev/fd/{read}")).settings.max_queue == 7
    finally:
        os.close(read)


def test_a_setting_in_two_spellings_is_refused(tmp_path: Path) -> None:
    """`max_queue = 5` and `max-queue = 6` both: the last won, unsaid (one spelling twice is TOML's own error)."""
    with pytest.raises(SettingsFileError, match=r"a setting given twice, in two spellings \(max-queue, max_queue\)"):
        load_settings(flags("--config", str(write_config(tmp_path, "max_queue = 5\nmax-queue = 6\n"))))


@pytest.mark.parametrize("field", ["data_dir", "tokens_file"])
def test_an_empty_path_is_refused_from_each_source(field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    """`INT8SERVE_DATA_DIR=` (a compose file's `${DATA_DIR}` unset) put the ledger in the current directory, a new
    one, unseen; an empty tokens file path failed later as "no such tokens file"."""
    flag = "--" + field.replace("_", "-")
    for value in ("", "  "):
        with pytest.raises(ValueError, match=f"^{flag}: Value error, must not be empty"):
            load_settings(flags(flag, value))
        monkeypatch.setenv(f"INT8SERVE_{field.upper()}", value)
        with pytest.raises(ValueError, match=f"^INT8SERVE_{field.upper()}: Value error, must not be empty"):
            load_settings(flags())
        monkeypatch.delenv(f"INT8SERVE_{field.upper()}")
        config = write_config(tmp_path, f"{field} = {json.dumps(value)}\n")
        with pytest.raises(ValueError, match=f"^{field} in {config}: Value error, must not be empty"):
            load_settings(flags("--config", str(config)))


def test_cli_reports_settings_errors_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--config", str(write_config(tmp_path, "shutdown_timeout = -5\n"))])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "int8serve serve: error: shutdown_timeout in" in err and "Traceback" not in err


def test_help_documents_every_setting_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, info in ServeSettings.model_fields.items():
        assert flag_name(name) in text, name
        assert env_name(name) in text, name
        assert " ".join(info.description.split()[:6]) in text, name
    assert "INT8SERVE_CONFIG" in text and "--config" in text


def test_help_says_each_default_once_and_each_bound(capsys: pytest.CaptureFixture[str]) -> None:
    """A default said in words ("Default: the built-in model ...") is not followed by a bare "default: none"; every
    bound of a setting beyond its type's (at least 1 or 16, at most 2592000, ...) is in its help, as the code checks
    it; and what the help says of signals and queues is what the server does."""
    for name, info in ServeSettings.model_fields.items():
        text = help_text(name)
        assert ("Default:" in info.description) != ("; default:" in text), text
        for bound in info.metadata:
            if least := getattr(bound, "ge", 0):
                assert f"at least {least}" in info.description or f"{least} to " in info.description, name
            if most := getattr(bound, "le", None):
                assert f"at most {most}" in info.description or f" to {most}" in info.description, name
    assert "SIGTERM, SIGINT or SIGHUP" in help_text("shutdown_timeout")  # server.py drains on each
    assert "per model" in help_text("max_queue")  # each served model's engine has its own queue
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "default: none" not in " ".join(capsys.readouterr().out.split()).split("--model PATH|NAME=PATH")[1][:900]


@pytest.mark.parametrize("command", ["serve", "generate", "quantize", "eval-ppl"])
def test_every_commands_help_lists_the_engine_variables_with_their_values(command: str,
                                                                          capsys: pytest.CaptureFixture[str]
                                                                          ) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, and breaks them at a hyphen
    assert set(ENGINE_VARIABLE_HELP) == ENGINE_VARIABLES
    for name, (values, what) in ENGINE_VARIABLE_HELP.items():
        assert f"{name}={'|'.join(values)}:{''.join(what.split())}" in text, name


def test_the_engine_variables_values_in_the_help_are_the_engines() -> None:
    """--help lists them without importing torch; these are the values the engine takes."""
    from int8serve.engine import decode_plan, kernels
    from int8serve.engine.kernels import activation, attention, gemv, matmul

    taken = {"INT8SERVE_KERNEL": set(gemv._IMPLS), "INT8SERVE_ATTENTION": set(attention.SETTINGS),
             "INT8SERVE_ACTIVATION": set(activation.IMPLS), "INT8SERVE_PREFILL_MATMUL": set(matmul.SETTINGS),
             "INT8SERVE_DECODE_PLAN": set(decode_plan.SETTINGS)}
    assert kernels.ENV_PATH == "INT8SERVE_KERNEL" and attention.ENV == "INT8SERVE_ATTENTION"
    assert activation.ENV == "INT8SERVE_ACTIVATION" and matmul.ENV == "INT8SERVE_PREFILL_MATMUL"
    assert decode_plan.ENV == "INT8SERVE_DECODE_PLAN"
    for name, values in taken.items():
        assert set(ENGINE_VARIABLE_HELP[name][0]) == values, name


@pytest.mark.parametrize("variable", CHOICE_VARIABLES)
@pytest.mark.parametrize("command", ["serve", "generate", "quantize", "eval-ppl"])
def test_every_command_refuses_a_bad_engine_variable_at_its_start(variable: str, command: str,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before anything runs, on every CPU: a path may read a variable only on some CPUs (on a Sapphire Rapids
    eval-ppl never read INT8SERVE_ATTENTION, and a bad value was taken without a word)."""
    choices = ENGINE_VARIABLE_HELP[variable][0]
    for value in (*choices, f" {choices[-1].upper()} ", ""):  # (case and spaces ignored, empty = auto)
        check_engine_variables({variable: value})
    monkeypatch.setenv(variable, "bogus")
    args = {"serve": [], "generate": ["--model", "nowhere", "hi"], "quantize": ["nowhere", "elsewhere"],
            "eval-ppl": ["--model", "nowhere", "--text", "nothing.txt"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"int8serve {command}: error: {variable}='bogus': expected one of {', '.join(choices)}")


def test_the_commands_check_and_the_engine_read_a_variable_through_one_function(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """check_engine_variables repeated the engine's reading (case and spaces ignored, empty = auto) and its message,
    two texts that could drift apart; both are now engine.variables.env_choice's, which imports no torch."""
    import os

    from int8serve.engine import decode_plan, kernels, variables
    from int8serve.engine.kernels import activation, attention

    readers = {"INT8SERVE_KERNEL": kernels.requested_path, "INT8SERVE_ATTENTION": attention.setting,
               "INT8SERVE_ACTIVATION": activation.setting, "INT8SERVE_DECODE_PLAN": decode_plan.setting}
    assert set(readers) == set(CHOICE_VARIABLES)
    assert kernels.env_choice is attention.env_choice is activation.env_choice is variables.env_choice
    for variable, read in readers.items():
        monkeypatch.setenv(variable, " Bogus ")
        with pytest.raises(ValueError) as engine:
            read()
        with pytest.raises(ValueError) as command:
            check_engine_variables(os.environ)
        assert str(command.value) == str(engine.value) == (
            f"{variable}='bogus': expected one of {', '.join(ENGINE_VARIABLE_HELP[variable][0])}")
        monkeypatch.delenv(variable)
    asked = []

    def spy(variable: str, choices: tuple[str, ...], environ: object = None) -> str:
        asked.append((variable, choices, environ))
        return "auto"

    monkeypatch.setattr(variables, "env_choice", spy)
    environ = {"INT8SERVE_KERNEL": "bogus"}
    check_engine_variables(environ)
    assert asked == [(variable, ENGINE_VARIABLE_HELP[variable][0], environ) for variable in CHOICE_VARIABLES]


def test_the_quantizers_times_are_the_measured_ones_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """serve, quantize and eval-ppl say one thing of how long each quantizer takes (they said an hour, minutes,
    seconds), and its figures are docs/benchmarks.md's and the README's."""
    for command in ("serve", "quantize", "eval-ppl"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert QUANTIZER_TIMES in " ".join(capsys.readouterr().out.split()), command
    figures = re.findall(r"\d+ s\b", QUANTIZER_TIMES)
    assert figures == ["581 s", "1395 s", "808 s"]
    root = Path(__file__).parents[1]
    for document in ("README.md", "docs/benchmarks.md"):
        text = " ".join((root / document).read_text().split())
        assert all(figure in text for figure in figures), document


def test_summary_says_where_each_value_came_from_and_hides_secrets(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INT8SERVE_REDIS_URL", "redis://:hunter2@cache.internal:6379/0")
    config = write_config(tmp_path, 'database_url = "postgresql+psycopg://app:s3cret@db:5432/usage"\n')
    loaded = load_settings(flags("--config", str(config), "--token", "very-secret-token=acct"))
    text = "\n".join(loaded.summary())
    assert "hunter2" not in text and "s3cret" not in text and "very-secret-token" not in text
    assert "redis://:***@cache.internal:6379/0  (env)" in text
    assert f"postgresql+psycopg://app:***@db:5432/usage  (file {config})" in text
    assert re.search(r"^tokens +1 given  \(flag\)$", text, re.M)
    assert len(loaded.summary()) == len(ServeSettings.model_fields)


def test_the_quantizer_of_a_first_start(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(flags()).settings.quantizer == "gptq"
    assert load_settings(flags("--quantizer", "rtn")).settings.quantizer == "rtn"
    monkeypatch.setenv("INT8SERVE_QUANTIZER", "rtn")
    assert load_settings(flags()).settings.quantizer == "rtn"
    with pytest.raises(ValueError, match=r"^--quantizer: Input should be 'gptq' or 'rtn' \(got 'awq'\)$"):
        load_settings(flags("--quantizer", "awq"))


def test_the_kv_cache_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(flags()).settings.kv_cache == "auto"
    assert load_settings(flags("--kv-cache", "int8")).settings.kv_cache == "int8"
    monkeypatch.setenv("INT8SERVE_KV_CACHE", "int8")
    assert load_settings(flags()).settings.kv_cache == "int8"
    with pytest.raises(ValueError, match="--kv-cache int8 applies to int8 models"):
        load_settings(flags("--dtype", "fp32"))
    monkeypatch.delenv("INT8SERVE_KV_CACHE")
    assert load_settings(flags("--dtype", "fp32")).settings.kv_cache == "auto"  # (the fp32 model's cache stays fp32)
    for kind in ("bf16", "fp16"):
        assert load_settings(flags("--kv-cache", kind)).settings.kv_cache == kind
        with pytest.raises(ValueError, match=f"--kv-cache {kind} applies to int8 models"):
            load_settings(flags("--kv-cache", kind, "--dtype", "fp32"))
    with pytest.raises(ValueError, match=r"^--kv-cache: Input should be 'auto', 'bf16', 'fp16' or 'int8' \(got 'fp8'"):
        load_settings(flags("--kv-cache", "fp8"))


def test_account_ids_the_ledger_can_store(tmp_path: Path) -> None:
    """An account id is at most 128 characters (the ledger's column) of letters, digits and . _ ~ - (a URL carries
    them as they are): a token file, --token or --account-rpm naming another is refused at start, with the rule."""
    from int8serve.cli import UsageError, parse_tokens
    from int8serve.service.policy.ledger import usage_table

    assert usage_table().c.account.type.length == 128
    longest = "a" * 128
    assert parse_tokens([f"t1={longest}", "t2=023e105f4ecef8ad9ca31a8372d0c353", "t3=acct_b.x~1-2"], None) == {
        "t1": longest, "t2": "023e105f4ecef8ad9ca31a8372d0c353", "t3": "acct_b.x~1-2"}
    for account in ["a" * 129, "acct one", "acct/one", "-acct", "..", "compte-é", "acct\x1b"]:
        with pytest.raises(UsageError, match="is not usable: an account id is 1 to 128 characters"):
            parse_tokens([f"tok={account}"], None)
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-a=acct-a\n# a comment\ntok-b=" + "b" * 200 + "\n")
    with pytest.raises(UsageError, match=r"tokens:3: account id 'b{40}\.\.\. \(200 characters\)' is not usable"):
        parse_tokens([], tokens)
    with pytest.raises(ValueError, match="account id 'x y' is not usable"):
        load_settings(flags("--account-rpm", "x y=5"))
    assert load_settings(flags("--account-rpm", f"{longest}=5")).settings.account_rpm == {longest: 5}


def test_the_database_timeout_reaches_the_ledger() -> None:
    from int8serve.service.policy.settings import DEFAULT_DATABASE_TIMEOUT as POLICY_DEFAULT
    from int8serve.settings import DEFAULT_DATABASE_TIMEOUT
    from int8serve.startup import policy_settings

    assert DEFAULT_DATABASE_TIMEOUT == POLICY_DEFAULT == load_settings(flags()).settings.database_timeout
    assert policy_settings(load_settings(flags("--database-timeout", "2.5")).settings).database_timeout == 2.5
    with pytest.raises(ValueError, match=r"^--database-timeout: Input should be greater than 0 \(got '0'\)$"):
        load_settings(flags("--database-timeout", "0"))


@pytest.mark.parametrize(("text", "message"), [
    ("port = true", "port = true: expected a number, got a boolean"),
    ("max_queue = true", "max_queue = true: expected a number, got a boolean"),
    ("shutdown_timeout = false", "shutdown_timeout = false: expected a number, got a boolean"),
    ("max-queue = \"64\"", "max_queue = '64': expected a number, got a string"),
    ("prefix_cache = 1", "prefix_cache = 1: expected true or false, got a number"),
    ("log_prompts = \"yes\"", "log_prompts = 'yes': expected true or false, got a string"),
    ("account_rpm = { acct = true }", "acct: expected a whole number, got a boolean"),
])
def test_the_config_file_is_strict_for_numbers_and_booleans(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(SettingsFileError) as err:
        load_settings(flags("--config", str(path)))
    assert str(err.value).startswith(f"{path}: ") and str(err.value).endswith(message)


def test_daily_neurons_true_in_the_config_file_is_the_flag_alone(tmp_path: Path) -> None:
    on = load_settings(flags("--config", str(write_config(tmp_path, "daily_neurons = true"))))
    assert on.settings.daily_neurons == DEFAULT_DAILY_NEURONS and on.sources["daily_neurons"] == "file"
    off = load_settings(flags("--config", str(write_config(tmp_path, "daily_neurons = false"))))
    assert off.settings.daily_neurons is None
    some = load_settings(flags("--config", str(write_config(tmp_path, "daily_neurons = 500\nport = 9000\n"
                                                                      "shutdown_timeout = 5"))))
    assert (some.settings.daily_neurons, some.settings.port, some.settings.shutdown_timeout) == (500, 9000, 5.0)


def test_a_config_files_string_is_one_entry_a_variables_is_a_comma_list(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`model = '/models/a,b'` in the file is one path, where there is one (it was split into '/models/a' and 'b');
    the variable keeps its documented comma-separated form, and the file's array form works."""
    (tmp_path / "a,b").mkdir()
    one = load_settings(flags("--config", str(write_config(tmp_path, f"model = '{tmp_path}/a,b'"))))
    assert one.settings.model == [f"{tmp_path}/a,b"]
    two = load_settings(flags("--config", str(write_config(tmp_path, "model = ['/m/a', '/m/b']"))))
    assert two.settings.model == ["/m/a", "/m/b"]
    monkeypatch.setenv("INT8SERVE_MODEL", "/m/a, /m/b")
    assert load_settings(flags()).settings.model == ["/m/a", "/m/b"]


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("model", "a=/m/x,b=/m/y", "no file or folder 'a=/m/x,b=/m/y'"),
    ("model", "/m/x, /m/y", "no file or folder '/m/x, /m/y'"),
    ("card", "/c/x.txt,/c/y.txt", "no file or folder '/c/x.txt,/c/y.txt'"),
    ("tokens", "SECRET1=acct1,SECRET2=acct2", "its account id would hold a comma"),
])
def test_a_config_files_string_of_several_entries_says_to_write_a_list(tmp_path: Path, key: str, value: str,
                                                                      problem: str) -> None:
    """Before f57c623 such a string was split on commas; since, it was one entry, and `model = "a=/x,b=/y"` failed
    later with "no such model folder", naming neither the file nor the array it needs."""
    config = write_config(tmp_path, f"{key} = '{value}'\n")
    with pytest.raises(SettingsFileError) as info:
        load_settings(flags("--config", str(config)))
    assert str(info.value) == (f"{key} in {config}: one string is one entry ({problem}); for several write a list: "
                               f'{key} = ["...", "..."]')
    assert "SECRET" not in str(info.value)


def test_a_config_key_written_as_a_flag_or_mistyped_names_the_setting(tmp_path: Path) -> None:
    """Every serve flag typed as a key of the file: a setting, or an error naming the setting it is (`token`,
    `cache`, `no_cache` were "unknown setting(s)" without a hint, where a mistyped variable gets one)."""
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    checked = 0
    for action in serve._actions:
        for option in action.option_strings:
            key = option.removeprefix("--").replace("-", "_")
            if key in ServeSettings.model_fields or option in ("-h", "--help", "--config"):
                continue
            value = "true" if isinstance(action, argparse.BooleanOptionalAction) else '["a=b"]'
            with pytest.raises(SettingsFileError) as info:
                load_settings(flags("--config", str(write_config(tmp_path, f"{key} = {value}\n"))))
            hint = f"{action.dest} = false" if option.startswith("--no-") else action.dest
            assert f"unknown setting(s) {key} (did you mean {hint}?)" in str(info.value), option
            checked += 1
    assert checked == 6  # --token, --cache and the --no- flags of the 4 on/off settings
    with pytest.raises(SettingsFileError, match=r"unknown setting\(s\) max_queeue \(did you mean max_queue\?\)"):
        load_settings(flags("--config", str(write_config(tmp_path, "max_queeue = 1\n"))))


def test_token_errors_name_the_line_and_the_problem_never_the_token(tmp_path: Path) -> None:
    from int8serve.cli import UsageError, parse_tokens

    cases = [("\ufeffok=a\nMY SECRET TOKEN=acct\n", "the token has a space or other blank at character 3"),
             ("x=a\nexport SECRETTOKEN=acct", "it starts with 'export'"),
             ("a=b\n\nSECRET\u200bTOKEN=acct", "an invisible or non-ASCII character ('\\u200b') at character 7"),
             ("SECRETTOKEN=", "there is no account id after '='")]
    for text, problem in cases:
        path = tmp_path / "tokens"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(UsageError) as err:
            parse_tokens([], path)
        assert problem in str(err.value) and "SECRET" not in str(err.value)
        assert str(err.value).startswith(f"{path}:{text.count(chr(10)) + 1 if not text.endswith(chr(10)) else 2}:")
    with pytest.raises(UsageError) as err:
        parse_tokens(["SECRET TOKEN=acct"], None)
    assert "SECRET" not in str(err.value) and str(err.value).startswith("--token: ")


def test_a_token_may_hold_equals_signs_and_hashes(tmp_path: Path) -> None:
    """An entry is split at its last '=' (an account id holds none): a base64 token's padding, or any '=' in a token,
    was taken for the separator and the rest refused as the account id, printed with the token's second half. A '#'
    starts a comment only at the start of a line or after whitespace: one inside a token (valid for --token) cut
    the line short."""
    from int8serve.cli import UsageError, parse_tokens

    assert parse_tokens(["SECRETHALF1=SECRETHALF2=acct1", "dG9rZW4==acct2", " a=b = acct3 "], None) == {
        "SECRETHALF1=SECRETHALF2": "acct1", "dG9rZW4=": "acct2", "a=b": "acct3"}
    path = tmp_path / "tokens"
    path.write_text("# a comment\n  # an indented one\ndG9rZW4==acct1\nsec#ret=acct2\n#x==acct3\n")
    assert parse_tokens([], path) == {"dG9rZW4=": "acct1", "sec#ret": "acct2"}
    for entry in ["SECRETHALF1=SECRETHALF2=acct/1", "SECRETHALF1=SECRETHALF2=", "SECRET=HALF=acct 1"]:
        path.write_text(f"ok=acct\n{entry}\n")
        for entries, tokens_file in (([entry], None), ([], path)):
            with pytest.raises(UsageError) as err:
                parse_tokens(entries, tokens_file)
            assert "SECRET" not in str(err.value) and "HALF" not in str(err.value), str(err.value)
    with pytest.raises(UsageError, match=r"^--token: account id 'acct/1' is not usable"):
        parse_tokens(["SECRETHALF1=SECRETHALF2=acct/1"], None)
    path.write_text("tok=acct1 # the main account\nsec#ret2=acct2\t# after a tab\n")  # a comment after an entry
    assert parse_tokens([], path) == {"tok": "acct1", "sec#ret2": "acct2"}


def test_tokens_file_lines_are_counted_as_an_editor_counts_them(tmp_path: Path) -> None:
    """Lines end at '\\n' (a '\\r' before it is dropped): a form feed or another character `splitlines` ends lines
    at made the errors name a later line than the one at fault."""
    from int8serve.cli import UsageError, parse_tokens

    path = tmp_path / "tokens"
    path.write_bytes(b"a=acct1\x0c\r\nb=acct2\x1c\n\x0bc=acct3\r\nSECRET TOKEN=acct\n")
    with pytest.raises(UsageError, match=r"tokens:4: expected TOKEN=ACCOUNT_ID"):
        parse_tokens([], path)
    path.write_bytes(b"a=acct1\x0c\r\nb=acct2\x1c\n\x0bc=acct3\r\n")
    assert parse_tokens([], path) == {"a": "acct1", "b": "acct2", "c": "acct3"}


def test_a_tokens_file_may_be_a_pipe(tmp_path: Path) -> None:
    """`--tokens-file <(pass show int8serve)` (a /dev/fd/N pipe) was refused as "no such tokens file": only a regular
    file was read. A pipe is read as a file is, up to a bound."""
    from int8serve.cli import UsageError, parse_tokens

    read, write = os.pipe()
    try:
        os.write(write, b"tok=acct1\n")
        os.close(write)
        assert parse_tokens([], Path(f"/dev/fd/{read}")) == {"tok": "acct1"}
    finally:
        os.close(read)
    with pytest.raises(UsageError, match=rf"^/dev/zero: larger than {cli.MAX_TOKENS_FILE_BYTES} bytes"):
        parse_tokens([], Path("/dev/zero"))


# --- INT8SERVE_* variables that nothing reads ----------------------------------------------------------------------

PACKAGE = Path(__file__).parents[1] / "src" / "int8serve"
# an INT8SERVE_ name in the package's Python code (not `__INT8SERVE_PARAMETER_RANGES__`, a placeholder of the page)
VARIABLE_NAME = re.compile(r"(?<![A-Za-z0-9_])INT8SERVE_[A-Z0-9_]*[A-Z0-9]")


def test_every_int8serve_variable_named_in_the_package_is_known() -> None:
    """A variable added to the code without adding it to the known names would be warned of as a typo at every
    start: every INT8SERVE_ name the package's Python code holds is a setting's, INT8SERVE_CONFIG or the engine's."""
    named = {name for path in PACKAGE.rglob("*.py") for name in VARIABLE_NAME.findall(path.read_text())}
    assert {"INT8SERVE_KERNEL", "INT8SERVE_PREFILL_MATMUL", "INT8SERVE_CACHE", "INT8SERVE_MAX_QUEUE"} <= named
    assert named - known_variables() == set()
    assert not ENGINE_VARIABLES - named  # and no engine variable is known that the code no longer reads
    # the kernels' INT8SERVE_ names (INT8SERVE_TILE_LOAD, ...) are macros: C++ reads no environment
    for path in (*PACKAGE.rglob("*.cpp"), *PACKAGE.rglob("*.h")):
        assert "getenv" not in path.read_text(), path


def test_unknown_variables_are_named_with_the_closest_known_one() -> None:
    environ = {"INT8SERVE_MAX_QUEU": "4", "INT8SERVE_MAX_QUEUE": "8", "int8serve_port": "1", "INT8SERVE_KERNL": "avx2",
               "INT8SERVE_FROBNICATE": "1", "INT8SERVE_TEST_DATABASE_URL": "x", "INT8SERVE_CONFIG": "f", "PATH": "/"}
    assert unknown_variable_warnings(environ) == [
        "INT8SERVE_FROBNICATE is not a variable int8serve reads: it is ignored ('int8serve serve --help' names each "
        "setting's variable)",
        "INT8SERVE_KERNL is not a variable int8serve reads: it is ignored (did you mean INT8SERVE_KERNEL?)",
        "INT8SERVE_MAX_QUEU is not a variable int8serve reads: it is ignored (did you mean INT8SERVE_MAX_QUEUE?)",
    ]


@pytest.mark.parametrize("command", [["serve", "--max-queue", "3"], ["quantize", "src", "dst"]])
def test_every_command_warns_of_an_unknown_variable_once_and_goes_on(command: list[str],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A typo'd variable was ignored without a word; one of another version must not stop a server either."""
    monkeypatch.setenv("INT8SERVE_MAX_QUEU", "4")
    monkeypatch.setenv("INT8SERVE_PORT", "2222")
    ran = []
    monkeypatch.setitem(cli.COMMANDS, command[0], lambda args: ran.append(args))
    main(command)
    err = capsys.readouterr().err
    assert err.count("warning") == 1, err
    assert f"int8serve {command[0]}: warning: INT8SERVE_MAX_QUEU is not a variable int8serve reads: it is ignored " \
           "(did you mean INT8SERVE_MAX_QUEUE?)" in err
    assert len(ran) == 1  # the command ran
    if command[0] == "serve":
        settings = cli.serve_settings(ran[0]).settings
        assert (settings.max_queue, settings.port) == (3, 2222)


def test_a_renamed_variable_is_read_under_its_new_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """INT8SERVE_DATA became INT8SERVE_DATA_DIR (a74ee7a): an old deployment's INT8SERVE_DATA was warned of as a typo
    and the server started on ./data, leaving its ledger and the spool of rows not yet written aside."""
    old = tmp_path / "old-data"
    monkeypatch.setenv("INT8SERVE_DATA", str(old))
    loaded = load_settings(flags())
    assert (loaded.settings.data_dir, loaded.sources["data_dir"]) == (old, "env")
    assert load_settings(flags("--data-dir", str(tmp_path / "flag"))).settings.data_dir == tmp_path / "flag"
    monkeypatch.setitem(cli.COMMANDS, "serve", lambda args: None)
    main(["serve"])
    assert capsys.readouterr().err == ("int8serve serve: warning: INT8SERVE_DATA is the old name of "
                                       "INT8SERVE_DATA_DIR: serve reads it as INT8SERVE_DATA_DIR while "
                                       "INT8SERVE_DATA_DIR is not set; rename it to INT8SERVE_DATA_DIR\n")
    monkeypatch.setenv("INT8SERVE_DATA_DIR", str(old))  # the same: fine
    assert load_settings(flags()).settings.data_dir == old
    monkeypatch.setenv("INT8SERVE_DATA_DIR", str(tmp_path / "new-data"))  # which one holds the ledger? refused
    with pytest.raises(ValueError, match=rf"^INT8SERVE_DATA={old} and INT8SERVE_DATA_DIR={tmp_path}/new-data are "
                                         r"both set: INT8SERVE_DATA is the old name of INT8SERVE_DATA_DIR"):
        load_settings(flags())


def test_the_connection_defaults_repeated_in_the_settings_are_the_servers() -> None:
    """settings.py repeats service.connections' defaults (so that reading the settings imports no service code):
    the flags' defaults are the ones the server uses without them."""
    from int8serve import settings
    from int8serve.service import connections

    for name in ("DEFAULT_MAX_CONNECTIONS", "DEFAULT_HEADER_TIMEOUT", "DEFAULT_STALL_TIMEOUT"):
        assert getattr(settings, name) == getattr(connections, name), name
