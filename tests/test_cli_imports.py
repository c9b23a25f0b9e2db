"""The command line answers help, usage errors and start-up errors before it imports torch (cli.py, startup.py).

Importing torch takes 1-2 s on the CPUs we run on; a user who mistypes a flag, gives a bad token or names a model
that does not exist should hear it at once. Each case runs in a fresh interpreter and reports whether torch was
imported by the time the command ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_RUN = """
import json, sys
from int8serve.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else 1
    if isinstance(exit.code, str):
        print(exit.code, file=sys.stderr)
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def run_cli(*args: str, tmp_path: Path) -> tuple[dict, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the kernels' cache as the other tests use it
    result = subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, timeout=60,
                            env=env, cwd=tmp_path)
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


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
    (["serve", "--max-connections", "0"], 2, "expected a whole number >= 1"),
    (["serve", "--model", "@cf/none/such=/nonexistent"], 1, "unknown model '@cf/none/such'"),
    (["serve", "--model", "/nonexistent/folder"], 1, "no such model folder"),
    (["serve", "--redis-url", "redis://127.0.0.1:1/0"], 1, "cannot reach Redis at redis://127.0.0.1:1/0"),
    (["serve", "--database-url", "postgresql://root@127.0.0.1:1/test"], 1, "cannot use the ledger database"),
    (["generate", "--model", "/nonexistent/folder", "hello"], 2, "no such model folder"),
    (["quantize", "/nonexistent/folder", "dst"], 2, "no such model folder"),
    (["generate", "--max-tokens", "0", "hello"], 2, "--max-tokens must be at least 1"),
    (["generate", "--temperature", "-1", "hello"], 2, "temperature must be >= 0"),
    (["eval-ppl", "--text", "/nonexistent.txt"], 2, "/nonexistent.txt: no such file"),
    (["quantize", "src", "dst", "--group-size", "7"], 2, "invalid choice: 7"),
])
def test_help_and_errors_come_without_importing_torch(args: list[str], code: int, message: str,
                                                      tmp_path: Path) -> None:
    report, stderr = run_cli(*args, tmp_path=tmp_path)
    assert report["code"] == code, stderr
    assert message in stderr
    assert not report["torch"], f"int8serve {' '.join(args)} imported torch before it ended"


def test_a_command_that_runs_the_model_imports_torch(tmp_path: Path, stories_hf: Path) -> None:
    # the other side, and a check of the check: the same harness sees torch once a command reaches the engine
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little girl. She liked to play in the park with her dog. " * 8)
    report, stderr = run_cli("eval-ppl", "--model", str(stories_hf), "--text", str(text), "--window", "32",
                             "--max-windows", "1", "--no-model-cache", tmp_path=tmp_path)
    assert report == {"code": 0, "torch": True}, stderr
