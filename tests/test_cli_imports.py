"""The command line answers help, usage errors and start-up errors before it imports torch (cli.py, startup.py).

Importing torch takes 1-2 s on the CPUs we run on; a user who mistypes a flag, gives a bad token or names a model
that does not exist should hear it at once. Each case runs in a child forked from an interpreter that has imported
int8serve.cli and nothing else, as a fresh one would, and reports whether torch was imported by the time the command
ended (`_FORKS`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from benchmarks.common import free_port

# One interpreter imports int8serve.cli (what every case's fresh `python -c` imported first, and nothing else) and
# forks a child for each case: the same start, without the 0.4 s of imports each of 71 cases paid again. The child
# runs the command as `python -c` would (cwd, environment, argv, SystemExit's code, exit handlers) and reports its
# exit code and whether torch was imported by the time the command ended.
_FORKS = """
import atexit, json, os, sys, traceback
from int8serve.cli import main

def run(case):
    os.chdir(case["cwd"])
    os.environ.clear()
    os.environ.update(case["env"])
    for fd, path in ((1, os.devnull), (2, case["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = ["-c", *case["args"]]
    try:
        main(case["args"])
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return {"code": code, "torch": "torch" in sys.modules}

for line in sys.stdin:
    case = json.loads(line)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, json.dumps(run(case)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as report:
        answer = report.read()
    os.waitpid(pid, 0)
    print(answer.decode() or json.dumps({"code": "no report", "torch": None}), flush=True)
"""


class _Forks:
    """The interpreter of `_FORKS`, started at the first case."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.stderr = Path(tempfile.mkdtemp(prefix="int8serve-cli-cases-")) / "stderr"

    def run(self, args: Sequence[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> tuple[dict, str]:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, "-c", _FORKS], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        case = {"args": list(args), "cwd": str(cwd), "env": env, "stderr": str(self.stderr)}
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"int8serve {' '.join(args)} did not end within {timeout} s")
        report = json.loads(self.process.stdout.readline())
        return report, self.stderr.read_text()

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


_forks = _Forks()


@pytest.fixture(scope="module", autouse=True)
def _end_forks() -> Iterator[None]:
    yield
    _forks.close()
    shutil.rmtree(_forks.stderr.parent, ignore_errors=True)


def run_cli(*args: str, tmp_path: Path) -> tuple[dict, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the kernels' cache as the other tests use it
    return _forks.run(args, tmp_path, env)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--help"], 0, ""),
    (["serve", "--help"], 0, ""),
    (["generate", "--help"], 0, ""),
    (["serve", "--tokens-file", "/nonexistent/tokens"], 2, "no such tokens file"),
    (["serve", "--token", "no-account"], 2, "expected TOKEN=ACCOUNT_ID"),
    # an account id the usage ledger cannot store (its column holds 128 characters), or one a URL cannot carry as it
    # is: refused at start, rather than every ledger row failing later
    (["serve", "--token", "tok=" + "L" * 129], 2,
     "--token: account id 'LLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLL... (129 characters)' is not usable: an account id "
     "is 1 to 128 characters: ASCII letters, digits and . _ ~ -, starting with a letter or digit"),
    (["serve", "--token", "tok=acct/one"], 2, "--token: account id 'acct/one' is not usable"),
    (["serve", "--account-rpm", "acct one=5"], 2, "account id 'acct one' is not usable"),
    (["serve", "--max-connections", "0"], 2, "--max-connections: Input should be greater than or equal to 1"),
    (["serve", "--model", "@cf/none/such=/nonexistent"], 1, "unknown model '@cf/none/such'"),
    (["serve", "--model", "/nonexistent/folder"], 1, "no such model folder"),
    (["serve", "--model", "."], 1, "model @cf/meta/llama-2-7b-chat-int8: .: not a model folder"),  # cwd: empty
    (["serve", "--redis-url", "redis://127.0.0.1:1/0"], 1, "cannot reach Redis at redis://127.0.0.1:1/0"),
    (["serve", "--database-url", "postgresql://root@127.0.0.1:1/test"], 1, "cannot use the ledger database"),
    (["generate", "--model", "/nonexistent/folder", "hello"], 2, "no such model folder"),
    (["quantize", "/nonexistent/folder", "dst"], 2, "no such model folder"),
    (["generate", "--max-tokens", "0", "hello"], 2, "--max-tokens must be at least 1"),
    (["generate", "--temperature", "-1", "hello"], 2, "--temperature must be between 0 and 5"),
    (["generate", "--frequency-penalty", "nan", "hello"], 2, "--frequency-penalty must be between -2 and 2"),
    (["eval-ppl", "--text", "/nonexistent.txt"], 2, "/nonexistent.txt: no such file"),
    (["quantize", "src", "dst", "--group-size", "7"], 2, "invalid choice: 7"),
])
def test_help_and_errors_come_without_importing_torch(args: list[str], code: int, message: str,
                                                      tmp_path: Path) -> None:
    report, stderr = run_cli(*args, tmp_path=tmp_path)
    assert report["code"] == code, stderr
    assert message in stderr
    assert not report["torch"], f"int8serve {' '.join(args)} imported torch before it ended"


def test_serve_checks_models_files_without_importing_torch(tmp_path: Path, shared_dir: Path) -> None:
    # both models pass their checks (a GGUF file's header; a folder's safetensors header, tokenizer), then Redis fails
    models = shared_dir / "models"
    report, stderr = run_cli("serve", "--model", f"@cf/meta/llama-2-7b-chat-int8={models / 'stories260K' / 'hf'}",
                             "--model", "@hf/huggingfacetb/smollm2-135m-instruct="
                             f"{models / 'smollm2-135m-instruct' / 'SmolLM2-135M-Instruct.Q4_1.gguf'}",
                             "--redis-url", "redis://127.0.0.1:1/0", tmp_path=tmp_path)
    assert report == {"code": 1, "torch": False}, stderr
    assert "cannot reach Redis" in stderr


def test_a_command_that_runs_the_model_imports_torch(tmp_path: Path, stories_hf: Path) -> None:
    # the other side, and a check of the check: the same harness sees torch once a command reaches the engine
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little girl. She liked to play in the park with her dog. " * 8)
    report, stderr = run_cli("eval-ppl", "--model", str(stories_hf), "--text", str(text), "--window", "32",
                             "--max-windows", "1", "--no-model-cache", tmp_path=tmp_path)
    assert report == {"code": 0, "torch": True}, stderr


SECRET = "SUPERSECRET123"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("lines", "message"), [
    (b"MY SECRET123 TOKEN=acct\n", "tokens:1: expected TOKEN=ACCOUNT_ID"),
    (b"# a comment\nexport SUPERSECRET123=acct\n", "tokens:2: expected TOKEN=ACCOUNT_ID"),
    (b"ok=acct\nSUPER\xef\xbb\xbfSECRET123=acct\n", "tokens:2: expected TOKEN=ACCOUNT_ID"),
    (b"SUPERSECRET123\n", "tokens:1: expected TOKEN=ACCOUNT_ID with a token of visible ASCII characters: "
     "there is no '='"),
    (b"ok=acct\nSUPERSECRET123=acct\xff\n", "tokens:2: not UTF-8 text (byte 0xff)"),
    (b"", "holds no tokens"),
    (b"# SUPERSECRET123=acct\n\n   # nothing\n", "holds no tokens"),
])
def test_a_bad_tokens_file_is_refused_without_showing_a_token(lines: bytes, message: str, tmp_path: Path) -> None:
    tokens = _write(tmp_path / "tokens", lines)
    report, stderr = run_cli("serve", "--tokens-file", str(tokens), "--port", "1", "--model", "/nonexistent",
                             tmp_path=tmp_path)
    assert report["code"] == 2, stderr
    assert message in stderr
    assert "SECRET" not in stderr and "Traceback" not in stderr
    assert stderr.count("\n") == 1, stderr  # one line


@pytest.mark.parametrize(("args", "env"), [
    (["--token", f"{SECRET}=acct"], {}),
    (["--metrics-token", SECRET], {}),
    ([], {"INT8SERVE_TOKENS": f"{SECRET}=acct"}),
    ([], {"INT8SERVE_DATABASE_URL": f"postgresql://user:{SECRET}@127.0.0.1:1/db"}),
    (["--database-url", f"postgresql://user:{SECRET}@127.0.0.1:1/db", "--metrics-token", SECRET], {}),
])
def test_a_settings_error_across_fields_shows_no_secret(args: list[str], env: dict[str, str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    report, stderr = run_cli("serve", *args, "--dtype", "fp32", "--kv-cache", "int8", tmp_path=tmp_path)
    assert report["code"] == 2, stderr
    assert "--kv-cache int8 applies to int8 models; --dtype fp32" in stderr
    assert SECRET not in stderr and "--?" not in stderr


@pytest.mark.parametrize(("args", "env", "origin"), [
    (["--metrics-token", f"{SECRET} 2"], {}, "--metrics-token"),  # a space
    ([], {"INT8SERVE_METRICS_TOKEN": f"{SECRET}\u00e9"}, "INT8SERVE_METRICS_TOKEN"),  # not ASCII
])
def test_a_metrics_token_no_header_can_carry_is_refused_at_once_without_showing_it(
        args: list[str], env: dict[str, str], origin: str, tmp_path: Path, stories_hf: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As an API token is: it was found only when the app was built, once the model had loaded (blamed on the API
    tokens), or, while loading, by a scrape with the wrong token: a 500 whose traceback showed a character of it."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    report, stderr = run_cli("serve", "--model", str(stories_hf), "--port", str(free_port()), *args,
                             tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert stderr == (f"int8serve serve: error: {origin}: Value error, expected one or more visible ASCII "
                      "characters (no spaces) (got a hidden value)\n")


def _tokens_file_kinds(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return {"folder": str(folder), "loop": str(tmp_path / "loop"), "dangling": str(tmp_path / "missing")}


@pytest.mark.parametrize(("kind", "message"), [
    ("folder", "folder: a directory, not a tokens file"),
    ("loop", "loop: a loop of symbolic links, not a tokens file"),
    ("dangling", "missing: no such tokens file"),
])
def test_a_tokens_file_that_cannot_be_read_is_named_for_what_it_is(kind: str, message: str, tmp_path: Path) -> None:
    """A directory and a loop of symbolic links were both "no such tokens file"."""
    report, stderr = run_cli("serve", "--tokens-file", _tokens_file_kinds(tmp_path)[kind], "--model", "/nonexistent",
                             tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert message in stderr and stderr.count("\n") == 1, stderr


def test_an_endless_tokens_file_is_refused_in_one_line(tmp_path: Path) -> None:
    """/dev/zero (or any file beyond the bound) ends the start in one line, without reading it into memory."""
    started = time.monotonic()
    report, stderr = run_cli("serve", "--tokens-file", "/dev/zero", "--model", "/nonexistent", tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert stderr.startswith("int8serve serve: error: /dev/zero: larger than ") and stderr.count("\n") == 1, stderr
    assert time.monotonic() - started < 10


def test_a_tokens_file_may_be_a_fifo(tmp_path: Path) -> None:
    """A named pipe (as process substitution's /dev/fd/N) is read as a file is: it was "no such tokens file". With
    its tokens taken, the start goes on to the model, which is missing."""
    fifo = tmp_path / "tokens"
    os.mkfifo(fifo)

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError):  # (the command never read it)
            fifo.write_bytes(b"dG9rZW4==acct1\nsec#ret=acct2\n")

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        report, stderr = run_cli("serve", "--tokens-file", str(fifo), "--model", "/nonexistent/folder",
                                 tmp_path=tmp_path)
    finally:
        if feeder.is_alive():  # the command never opened it: let the writer go
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(10)
    assert report == {"code": 1, "torch": False}, stderr
    assert "no such model folder" in stderr and "token" not in stderr, stderr


def test_a_token_with_equals_signs_is_never_shown(tmp_path: Path) -> None:
    report, stderr = run_cli("serve", "--token", "SECRETHALF1=SECRETHALF2=acct/1", tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert "--token: account id 'acct/1' is not usable" in stderr and "SECRET" not in stderr, stderr


def test_a_bom_at_the_start_of_a_tokens_file_is_skipped() -> None:
    import tempfile

    from int8serve.cli import parse_tokens

    with tempfile.TemporaryDirectory() as folder:
        tokens = _write(Path(folder) / "tokens", "\ufefftok=acct\r\nother=acct2\n".encode())
        assert parse_tokens([], tokens) == {"tok": "acct", "other": "acct2"}


def test_eval_ppl_on_a_text_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    text = _write(tmp_path / "text.txt", b"abc\xffdef")
    report, stderr = run_cli("eval-ppl", "--text", str(text), "--model", "/nonexistent", tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert "text.txt: not UTF-8 text (byte 0xff at offset 3)" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("windows", ["0", "-1"])
def test_max_windows_below_one_is_refused_by_the_parser(windows: str, tmp_path: Path, stories_hf: Path) -> None:
    """--max-windows 0 measured every window (0 read as no limit) and -1 all but the last, with exit 0."""
    text = _write(tmp_path / "t.txt", b"Once upon a time there was a cat. " * 20)
    report, stderr = run_cli("eval-ppl", "--model", str(stories_hf), "--no-model-cache", "--text", str(text),
                             "--window", "32", "--max-windows", windows, tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert f"argument --max-windows: expected a whole number >= 1, got '{windows}'" in stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--raw", "hi \udcff there"], "the prompt is not UTF-8 text (byte 0xff at offset 3)"),
    (["--system", "caf\u00e9 \udcc3", "hi"], "--system is not UTF-8 text (byte 0xc3 at offset 6)"),
])
def test_a_prompt_that_is_not_utf8_is_a_usage_error(args: list[str], message: str, tmp_path: Path,
                                                    stories_hf: Path) -> None:
    """A byte that is not UTF-8 in an argument (Python passes it as a lone surrogate: here written as one, which the
    subprocess gets back as the byte) ended generate, once the model had loaded, in a traceback from the tokenizer."""
    report, stderr = run_cli("generate", "--model", str(stories_hf), "--no-model-cache", *args, tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert stderr == f"int8serve generate: error: {message}\n"


@pytest.mark.parametrize("command", [["generate", "hi"], ["eval-ppl", "--text", "t.txt"], ["quantize", "a", "b"],
                                     ["serve"]])
@pytest.mark.parametrize("threads", ["0", "-1", "1025", "99999999999"])
def test_threads_out_of_range_is_refused_by_the_parser(command: list[str], threads: str, tmp_path: Path) -> None:
    """serve's --threads took any int: -1 ended in a traceback from torch.set_num_threads (called before serve's
    settings were checked), and a count beyond a C int ("Overflow when unpacking long") on every command."""
    report, stderr = run_cli(*command, "--threads", threads, tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert f"argument --threads: expected a whole number from 1 to 1024, got '{threads}'" in stderr
    assert "Traceback" not in stderr


def test_serve_sets_its_threads_once_its_settings_are_checked(tmp_path: Path) -> None:
    """A bad setting beside --threads is said before torch is imported (it was imported to set the threads first)."""
    report, stderr = run_cli("serve", "--threads", "2", "--dtype", "fp32", "--kv-cache", "int8", tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert "--kv-cache int8 applies to int8 models; --dtype fp32" in stderr


def _fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"fp32 weights")
    return folder


@pytest.mark.parametrize(("dst", "message"), [
    ("src", "DST src is the source model SRC"),
    ("./src/../src/", "is the source model SRC"),
    ("src/int8", "DST src/int8 is a folder inside the source model src"),
    ("full", "DST full is a folder that already holds files"),
    ("file.txt", "DST file.txt is an existing file"),
    (".", "DST . is a folder around the source model src"),
    # a DST that cannot be made: said before loading, not as mkdir's traceback after minutes of quantizing
    ("file.txt/int8", "DST file.txt/int8 cannot be made: {tmp}/file.txt is a file, not a folder"),
    ("dangling", "DST dangling cannot be made: dangling is a symbolic link to {tmp}/nowhere, which does not exist"),
    ("dangling/int8", "DST dangling/int8 cannot be made: dangling is a symbolic link to {tmp}/nowhere"),
])
def test_quantize_never_writes_over_a_model_a_file_or_a_folder_with_files(dst: str, message: str,
                                                                          tmp_path: Path) -> None:
    src = _fake_model(tmp_path / "src")
    (src / "int8").mkdir()
    _fake_model(tmp_path / "full")
    (tmp_path / "file.txt").write_text("keep me")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    report, stderr = run_cli("quantize", "src", dst, tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert message.format(tmp=tmp_path.resolve()) in stderr and "Traceback" not in stderr
    assert (src / "model.safetensors").read_bytes() == b"fp32 weights"
    assert (tmp_path / "file.txt").read_text() == "keep me"
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(("removed", "message"), [
    (["tokenizer.model", "tokenizer.json"], "{model}: no tokenizer.model or tokenizer.json"),
    (["tokenizer.model"], "{model}/tokenizer.json: not a byte-level BPE tokenizer (model 'BPE', decoder 'Sequence'); "
                          "a SentencePiece model needs its tokenizer.model"),
])
def test_quantize_refuses_a_source_without_a_usable_tokenizer(removed: list[str], message: str, stories_hf: Path,
                                                              tmp_path: Path) -> None:
    """It wrote the checkpoint without one, said "wrote", and generate and serve then refused it: refused before
    loading now, with serve's own check of the model's files (model_files.check_model_files)."""
    model = shutil.copytree(stories_hf, tmp_path / "hf")
    for name in removed:
        (model / name).unlink()
    report, stderr = run_cli("quantize", str(model), "int8", tmp_path=tmp_path)
    assert report == {"code": 2, "torch": False}, stderr
    assert stderr == f"int8serve quantize: error: {message.format(model=model)}\n"
    assert not (tmp_path / "int8").exists()
