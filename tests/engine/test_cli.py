"""The int8serve command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.fresh_cache import fresh_cache

from int8serve.engine.demo import demo_model_dir


def run(*args: str, cache: Path, **variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "INT8SERVE_CACHE": str(cache), **variables}
    return subprocess.run([sys.executable, "-m", "int8serve", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight demo model (a test fixture now: without --model the commands use SmolLM2)."""
    return demo_model_dir(tmp_path_factory.mktemp("demo"))


def test_generate_reports_figures_and_a_seed_gives_the_same_text(cache: Path, demo: Path) -> None:
    result = run("generate", "--model", str(demo), "Hello there", "--max-tokens", "12", "--seed", "3", cache=cache)
    assert result.returncode == 0, result.stderr
    assert "generated tokens 12" in result.stderr and "decode" in result.stderr and "tok/s" in result.stderr
    assert "RANDOM" not in result.stderr  # no demo warning: nothing runs the demo model unless told to
    again = run("generate", "--model", str(demo), "Hello there", "--max-tokens", "12", "--seed", "3", cache=cache)
    assert again.stdout == result.stdout  # same seed, same text


def test_generate_real_model_raw_greedy(cache: Path, stories_hf: Path) -> None:
    result = run("generate", "--model", str(stories_hf), "--raw", "--temperature", "0", "--max-tokens", "30",
                 "Once upon a time", cache=cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(", there was a little girl named Lily")
    assert "prompt tokens 5, generated tokens 30" in result.stderr


def test_generate_raw_reads_the_models_control_tokens(cache: Path, stories_hf: Path) -> None:
    """`--raw` is the model's own format, as `"raw": true` is: <s>/</s> are BOS/EOS (the tokenizer.json's ids)."""
    import tokenizers

    prompt = "<s>[INST] Hi [/INST] Hello</s><s>[INST] Bye [/INST]"
    ids = tokenizers.Tokenizer.from_file(str(stories_hf / "tokenizer.json")).encode(prompt, add_special_tokens=False)
    result = run("generate", "--model", str(stories_hf), "--raw", "--temperature", "0", "--max-tokens", "2", prompt,
                 cache=cache)
    assert result.returncode == 0, result.stderr
    assert f"prompt tokens {len(ids.ids)}, " in result.stderr and len(ids.ids) == 41


def test_generate_refuses_max_tokens_the_api_refuses(cache: Path, stories_hf: Path) -> None:
    """--max-tokens past the card's limit (Llama-2's 1800 for a plain PATH) is the API's 5006: a usage error, said
    before the model loads; the limit itself is taken."""
    refused = run("generate", "--model", str(stories_hf), "--raw", "--max-tokens", "1801", "Once", cache=cache)
    assert refused.returncode == 2 and "--max-tokens must be at most 1800" in refused.stderr, refused.stderr
    taken = run("generate", "--model", str(stories_hf), "--raw", "--temperature", "0", "--max-tokens", "1800",
                "Once", cache=cache)
    assert taken.returncode == 0, taken.stderr


def test_generate_keeps_the_servers_context(cache: Path, stories_hf: Path, tmp_path: Path) -> None:
    """The context is the server's, min(the card's, the model's): a model of 4096 positions under Llama-2's card
    (2048) refuses a prompt of 2048 tokens and more, as the server does (413/5021), and fits --max-tokens to the
    room left below it."""
    import json
    import shutil

    longer = tmp_path / "stories-4096"
    shutil.copytree(stories_hf, longer)
    config = json.loads((longer / "config.json").read_text())
    (longer / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    refused = run("generate", "--model", str(longer), "--raw", "--max-tokens", "1", "a" + " a" * 2100, cache=cache)
    assert refused.returncode == 2, refused.stderr
    assert re.search(r"the prompt is \d+ tokens; the context is 2048 \(the card's 2048, the model's 4096\)",
                     refused.stderr), refused.stderr
    fitted = run("generate", "--model", str(longer), "--raw", "--temperature", "0", "--max-tokens", "1800",
                 "a" + " a" * 2040, cache=cache)
    assert fitted.returncode == 0, fitted.stderr
    prompt, generated = map(int, re.search(r"prompt tokens (\d+), generated tokens (\d+)", fitted.stderr).groups())
    assert prompt + generated <= 2048 and prompt > 2000


def test_quantize_then_generate_from_the_int8_checkpoint(cache: Path, stories_meta: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    result = run("quantize", str(stories_meta), str(out), cache=cache)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= {"int8serve.json", "model.safetensors", "tokenizer.model"}
    described = " ".join(run("quantize", "--help", cache=cache).stdout.split())
    assert all(p.name in described for p in out.iterdir()), sorted(p.name for p in out.iterdir())  # as --help says
    gen = run("generate", "--model", str(out), "--raw", "--temperature", "0", "--max-tokens", "30",
              "Once upon a time", cache=cache)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith(", there was a little girl named Lily")


def test_eval_ppl_compare_to_fp32_prints_the_metrics(cache: Path, stories_hf: Path, shared_dir: Path) -> None:
    result = run("eval-ppl", "--model", str(stories_hf), "--text", str(shared_dir / "corpus" / "tinystories.txt"),
                 "--compare-to", "fp32", "--max-windows", "8", cache=cache)
    assert result.returncode == 0, result.stderr
    assert "PPL ratio" in result.stdout and "KLD" in result.stdout and "top-1" in result.stdout
    assert "over 2048 tokens in 8 windows" in result.stdout


def test_eval_ppl_measures_the_servers_kv_cache_or_the_one_asked_for(cache: Path, stories_hf: Path,
                                                                     shared_dir: Path) -> None:
    """By default the cache serve keeps on this CPU (the line says which and why), so that the figures are the
    server's; --kv-cache int8 measures that cache's rounding too: a larger KLD."""
    kld = {}
    for kind in ("auto", "int8"):
        result = run("eval-ppl", "--model", str(stories_hf), "--text", str(shared_dir / "corpus" / "tinystories.txt"),
                     "--compare-to", "fp32", "--max-windows", "8", "--kv-cache", kind, cache=cache)
        assert result.returncode == 0, result.stderr
        said = [line for line in result.stderr.splitlines() if line.startswith("KV cache: ")]
        if kind == "auto":
            assert len(said) == 1 and re.fullmatch(r"KV cache: (fp16|bf16) \(the default here: prefill attends .+\)",
                                                   said[0]), result.stderr
        else:
            assert said == ["KV cache: int8"]
        kld[kind] = float(re.search(r"KLD ([\d.]+)", result.stdout)[1])
    assert kld["int8"] > kld["auto"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "/no/such/model", "hi"], "no such model folder"),
        (["generate", "--max-tokens", "0", "hi"], "--max-tokens must be at least 1"),
        (["generate", "--model", "@cf/none/such=/tmp", "hi"], "unknown model '@cf/none/such'"),
        (["generate", "--model", "@cf/x/y=", "hi"], "expected NAME=PATH"),
        (["generate", "--temperature", "-1", "hi"], "temperature"),
        (["eval-ppl", "--text", "/no/such/file.txt"], "no such file"),
        (["generate", "--dtype", "fp32", "--kv-cache", "int8", "hi"], "--kv-cache int8 applies to int8 models"),
        (["eval-ppl", "--dtype", "fp32", "--kv-cache", "bf16", "--text", "x"], "--kv-cache bf16 applies to int8"),
    ],
)
def test_user_errors_are_one_clear_line(cache: Path, args: list[str], message: str) -> None:
    result = run(*args, cache=cache)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("command", "variable", "choices"), [
    ("generate", "INT8SERVE_ATTENTION", "auto, avx512, avx2, scalar, torch"),
    ("generate", "INT8SERVE_ACTIVATION", "auto, avx512, avx2, scalar"),
    ("generate", "INT8SERVE_DECODE_PLAN", "auto, off"),
    ("eval-ppl", "INT8SERVE_ATTENTION", "auto, avx512, avx2, scalar, torch"),
])
def test_a_bad_engine_variable_is_one_clear_line(cache: Path, stories_hf: Path, shared_dir: Path, command: str,
                                                 variable: str, choices: str) -> None:
    """An engine variable is read when the model first runs: its ValueError ended generate and eval-ppl with a
    traceback (serve said it in one line)."""
    args = {"generate": ["--raw", "--max-tokens", "2", "Once"],
            "eval-ppl": ["--text", str(shared_dir / "corpus" / "tinystories.txt"), "--max-windows", "1"]}[command]
    result = run(command, "--model", str(stories_hf), *args, cache=cache, **{variable: "bogus"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"int8serve {command}: error: {variable}='bogus': expected "
                                                      f"one of {choices}")
    assert "Traceback" not in result.stderr
