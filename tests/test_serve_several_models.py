"""`int8serve serve --model NAME=PATH --model NAME=PATH`: several models in one server, each under its card with its
own engine, slots and limits, as an operator runs it (a real process, a real port).

The two models differ in everything a client can see: stories260K (trained: "Once upon a time" greedily continues
", there was a little girl named Lily") under the seed's card, and the random-weight demo model (another vocabulary,
meaningless text) under a test card with other limits (context 256, max_tokens <= 64, 2 slots, 7 requests a
minute, 1 neuron per token).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from benchmarks.common import ServerExited, free_port, launch, serve_command, stop_process, wait_ready
from tests.fresh_cache import fresh_cache
from tests.test_server import start, startup_text, stop

from int8serve.engine.demo import demo_model_dir
from int8serve.model_specs import BUILTIN_CARD, DEFAULT_SERVED_MODEL, ModelSpec, ModelSpecError, served_model_specs

LLAMA = DEFAULT_SERVED_MODEL
DEMO = "@cf/int8serve-test/random-demo"
STORY = ", there was a little girl named Lily"
TOKEN, ACCOUNT = "t-several", "acct-several"


def demo_card(seed: str, name: str = DEMO, template: str | None = None) -> str:
    """The seed's card renamed, with other limits and costs (and a `prompt_template` if given)."""
    text = (seed.replace(LLAMA, name).replace('value: "2048"', 'value: "256"').replace('value: "1800"', 'value: "64"')
            .replace("default: 5\\n", "default: 7\\n").replace("neuron_cost: 0.1836", "neuron_cost: 1.0")
            .replace("max_concurrent_requests: 4", "max_concurrent_requests: 2")
            .replace('\\"default\\": 256', '\\"default\\": 32'))
    if template is not None:
        text = text.replace('      value: "64"\n', f'      value: "64"\n    - property_id: "prompt_template"\n'
                                                   f'      value: "{template}"\n')
    return text


@pytest.fixture(scope="module")
def card_file(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("cards") / "demo.txt"
    path.write_text(demo_card((shared_dir / "seeds" / "000_ef2d276774d6e394.txt").read_text()))
    return path


@pytest.fixture(scope="module")
def server(started: tuple[str, str]) -> str:
    return started[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model_dir(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory, stories_hf: Path, demo_dir: Path, card_file: Path
            ) -> Iterator[tuple[str, str]]:
    """One server, two models (two accounts); its base URL and its start-up lines."""
    process, port = start("--model", f"{LLAMA}={stories_hf}", "--model", f"{DEMO}={demo_dir}", "--card",
                          str(card_file), "--token", f"{TOKEN}={ACCOUNT}", "--token", "t-other=acct-other",
                          "--no-prefix-cache", tmp_path=tmp_path_factory.mktemp("several"))
    try:
        lines: list[str] = []
        while not any("ready: http://" in line for line in lines):  # printed once both models are loaded
            lines.append(process.stderr.readline())
        yield f"http://127.0.0.1:{port}", "".join(lines)
    finally:
        err = stop(process)
    assert process.returncode == 0, err


def run(base: str, model: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/client/v4/accounts/{ACCOUNT}/ai/run/{model}", json=body,
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


def get(base: str, path: str) -> httpx.Response:
    return httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_each_request_reaches_its_own_engine_under_its_own_card(server: str) -> None:
    base = server
    greedy = {"prompt": "Once upon a time", "raw": True, "temperature": 0, "max_tokens": 12}
    llama, demo = run(base, LLAMA, greedy), run(base, DEMO, greedy)
    assert llama.status_code == 200 and demo.status_code == 200, (llama.text, demo.text)
    assert llama.json()["result"]["response"].startswith(", there was a little")  # the trained model
    assert not demo.json()["result"]["response"].startswith(", there was")  # random weights, another vocabulary
    # the stories260K and demo tokenizers cut the same prompt differently
    assert llama.json()["result"]["usage"]["prompt_tokens"] != demo.json()["result"]["usage"]["prompt_tokens"]
    # each card's rate limit and neurons
    assert (llama.headers["x-ratelimit-limit-requests"], demo.headers["x-ratelimit-limit-requests"]) == ("5", "7")
    usage = demo.json()["result"]["usage"]
    assert float(demo.headers["cf-ai-neurons"]) == usage["prompt_tokens"] + usage["completion_tokens"]  # 1 each
    usage = llama.json()["result"]["usage"]
    assert float(llama.headers["cf-ai-neurons"]) == pytest.approx(
        0.1836 * (usage["prompt_tokens"] + usage["completion_tokens"]))
    # each card's limits: max_tokens <= 64 and a 256-token window for the demo card only
    too_many = run(base, DEMO, {"prompt": "x", "max_tokens": 100})
    assert too_many.status_code == 400 and too_many.json()["errors"][0]["code"] == 5006
    assert "at most 64" in too_many.json()["errors"][0]["message"]
    assert run(base, LLAMA, {"prompt": "x", "raw": True, "max_tokens": 100, "temperature": 0}).status_code == 200
    # the OpenAI route picks the engine by the body's "model"
    chat = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                      json={"model": LLAMA, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 12})
    assert chat.status_code == 200 and chat.json()["model"] == LLAMA
    assert chat.json()["choices"][0]["text"] == llama.json()["result"]["response"]


def test_every_listing_shows_both_models(server: str) -> None:
    base = server
    search = get(base, f"/client/v4/accounts/{ACCOUNT}/ai/models/search").json()
    assert [m["name"] for m in search["result"]] == [LLAMA, DEMO] and search["result_info"]["total_count"] == 2
    # the catalog's other built-in card (SmolLM2) is not served here, so not listed
    for name, limit in ((LLAMA, "2048"), (DEMO, "256")):
        schema = get(base, f"/client/v4/accounts/{ACCOUNT}/ai/models/schema?model={name}")
        assert schema.status_code == 200 and "oneOf" in schema.json()["result"]["input"]
        (entry,) = [m for m in search["result"] if m["name"] == name]
        assert {"property_id": "context_length_limit", "value": limit} in entry["properties"]
    models = get(base, "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [LLAMA, DEMO]
    ready = get(base, "/readyz").json()["models"]
    assert (ready[LLAMA]["slots"], ready[DEMO]["slots"]) == (4, 2)  # each engine its card's slots


def test_an_unknown_or_unserved_model_gets_the_usual_error(server: str) -> None:
    base = server
    for name, note in (("@cf/meta/llama-3-8b-instruct", ""),
                       (BUILTIN_CARD, " (the model is in the catalog but not served here)")):
        answer = run(base, name, {"prompt": "hi"})
        assert answer.status_code == 400 and answer.json()["errors"][0] == {
            "code": 5007, "message": f"No such model {name} or task{note}"}
        openai = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
                            json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
        assert openai.status_code == 404 and openai.json()["error"]["code"] == 5007


def test_start_up_lines_describe_each_model(started: tuple[str, str], stories_hf: Path, demo_dir: Path) -> None:
    err = started[1]
    assert f"model {LLAMA}:" in err and f"model {DEMO}:" in err
    assert "rate limits: 5 requests per 60 s" in err and "rate limits: 7 requests per 60 s" in err
    assert f"model: {LLAMA} <- {stories_hf}" in err and f"model: {DEMO} <- {demo_dir}" in err
    assert "context 512 tokens (card 2048, model 512)" in err and "context 256 tokens (card 256, model 2048)" in err
    assert "4 slots" in err and "2 slots" in err
    assert "per account at most 4 requests in this engine" in err  # two accounts: each card's slots
    assert "per account at most 2 requests in this engine" in err
    assert f"serving {LLAMA}, {DEMO}" in err
    assert err.count("decode steps: each layer's kernel calls replayed from a plan") == 2  # both int8, stacked


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "@cf/none/such=/tmp"], "unknown model '@cf/none/such'"),
    (["--model", "/tmp", "--model", "/var"], "2 --model values without a NAME="),
    (["--model", f"{LLAMA}=/tmp", "--model", f"{LLAMA}=/var"], f"the model {LLAMA} is given twice"),
    (["--model", f"{DEMO}=/tmp", "--card", "{nosuch_card}"], "unknown prompt template 'nosuch' (known: "),
])
def test_model_start_up_errors_are_clear(tmp_path: Path, shared_dir: Path, args: list[str], message: str) -> None:
    card = tmp_path / "nosuch.txt"
    card.write_text(demo_card((shared_dir / "seeds" / "000_ef2d276774d6e394.txt").read_text(), template="nosuch"))
    args = [arg.replace("{nosuch_card}", str(card)) for arg in args]
    env = {**os.environ, "INT8SERVE_CACHE": str(fresh_cache(tmp_path / "cache")),
           "INT8SERVE_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-m", "int8serve", "serve", "--port", str(free_port()), *args],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_serve_help_explains_the_model_forms() -> None:
    result = subprocess.run([sys.executable, "-m", "int8serve", "serve", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--model NAME=PATH PATH under the card NAME; repeat for several models" in text
    assert f"--model PATH PATH under the {LLAMA} card (or --served-model-name)" in text
    assert f"no --model the built-in model SmolLM2-135M-Instruct under {BUILTIN_CARD}" in text
    assert "[env INT8SERVE_MODEL]" in text  # its default is said in words ("Default: the built-in model, ...")


def test_model_entries() -> None:
    assert served_model_specs([]) == [ModelSpec(BUILTIN_CARD, None)]
    assert served_model_specs([], "@cf/x/y") == [ModelSpec("@cf/x/y", None)]
    assert served_model_specs(["/m"]) == [ModelSpec(LLAMA, "/m")]
    assert served_model_specs(["/m"], "@cf/x/y") == [ModelSpec("@cf/x/y", "/m")]
    assert served_model_specs([f"{DEMO}=/d", "org/name", BUILTIN_CARD]) == [
        ModelSpec(DEMO, "/d"), ModelSpec(LLAMA, "org/name"), ModelSpec(BUILTIN_CARD, None)]
    assert served_model_specs([f"{BUILTIN_CARD}=/s.gguf"]) == [ModelSpec(BUILTIN_CARD, "/s.gguf")]
    for bad, message in (("=/m", "expected NAME=PATH"), (f"{DEMO}=", "expected NAME=PATH"),
                         ("a b=/m", "expected NAME=PATH"), ("", "empty")):
        with pytest.raises(ModelSpecError, match=message):
            served_model_specs([bad])


def test_an_existing_path_with_an_equals_sign_is_a_path(tmp_path: Path) -> None:
    odd = tmp_path / "v=1"
    odd.mkdir()
    assert served_model_specs([str(odd)]) == [ModelSpec(LLAMA, str(odd))]


def serve_error(tmp_path: Path, *args: str) -> tuple[int, str]:
    """`int8serve serve ARGS` expected to stop at start: its exit status and stderr (a failure if it turns ready)."""
    port = free_port()
    env = {**os.environ, "INT8SERVE_CACHE": str(fresh_cache(tmp_path / "cache")),
           "INT8SERVE_DATA_DIR": str(tmp_path / "data"), "INT8SERVE_TOKENS": ""}
    process = launch(serve_command(port, args), env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, 300)
    except ServerExited as exited:
        return exited.status, exited.output
    finally:
        stop_process(process)  # still running: it turned ready, or was still starting after 300 s
    pytest.fail("the server turned ready")


@pytest.mark.parametrize("flags", [[], ["--no-prefix-cache"], ["--dtype", "fp32"]],
                         ids=["prefix-cache", "no-prefix-cache", "fp32"])
def test_a_template_the_models_tokenizer_cannot_encode_stops_the_start(tmp_path: Path, stories_hf: Path,
                                                                       flags: list[str]) -> None:
    """Found by an audit: the SmolLM2 card's chatml on stories260K's SentencePiece tokenizer (no '<|im_start|>') was
    only caught by the prefix cache's warm-up; without it (--no-prefix-cache, --dtype fp32) the server turned ready
    and answered every request 500/3043. Now every flag stops the start, in one line naming card, model and token."""
    status, err = serve_error(tmp_path, "--model", f"{BUILTIN_CARD}={stories_hf}", *flags)
    assert status == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"int8serve serve: error: model {BUILTIN_CARD}: its card's prompt template 'chatml' needs the control token "
        f"'<|im_start|>', which the tokenizer of {stories_hf} does not have (serve this model under a card naming "
        "its own template)")


SMALL, LONG = "@cf/int8serve-test/small-context", "@cf/int8serve-test/long-default-context"


def small_card(seed: str) -> str:
    """The seed's card with a context of 100 tokens and max_tokens <= 60 (default 32): shorter than the llama2
    template's default system prompt."""
    return (seed.replace(LLAMA, SMALL).replace('value: "2048"', 'value: "100"').replace('value: "1800"', 'value: "60"')
            .replace('\\"default\\": 256', '\\"default\\": 32'))


def long_default_context_card(seed: str) -> str:
    """The seed's card with a default_context of ~2,000 characters: more than stories260K's 512 positions."""
    system = "You are a careful storyteller who writes short and happy tales for small children. " * 24
    return seed.replace(LLAMA, LONG).replace('      value: "1800"\n', '      value: "1800"\n    - property_id: '
                                             f'"default_context"\n      value: "{system.strip()}"\n')


def test_a_default_system_prompt_longer_than_the_context_does_not_stop_the_start(tmp_path: Path, shared_dir: Path,
                                                                                   stories_hf: Path) -> None:
    """Found by an audit: the prefix cache's warm-up prefilled the template's default system prompt past the context
    window ("position 128 exceeds the KV cache's 100") and the start died after "listening". It is now skipped (said
    once); the server starts, raw prompts are answered and templated ones get 413/5021, as without the prefix cache."""
    seed = (shared_dir / "seeds" / "000_ef2d276774d6e394.txt").read_text()
    cards = [tmp_path / "small.txt", tmp_path / "long.txt"]
    cards[0].write_text(small_card(seed))
    cards[1].write_text(long_default_context_card(seed))
    process, port = start("--model", f"{SMALL}={stories_hf}", "--model", f"{LONG}={stories_hf}", "--card",
                          str(cards[0]), "--card", str(cards[1]), "--token", f"{TOKEN}={ACCOUNT}", tmp_path=tmp_path)
    try:
        text = startup_text(process)
        assert "context 100 tokens (card 100, model 512)" in text and "context 512 tokens (card 2048" in text, text
        assert text.count("prefix cache: not warming the ") == 2, text
        assert "in the context of 100 tokens" in text and "in the context of 512 tokens" in text, text
        assert text.count("tokens not warmed: they leave no room for a prompt and its reply") == 2, text  # summary
        base = f"http://127.0.0.1:{port}"
        for model in (SMALL, LONG):
            raw = run(base, model, {"prompt": "Once upon a time", "raw": True, "temperature": 0, "max_tokens": 8})
            assert raw.status_code == 200 and raw.json()["result"]["response"].startswith(", there was"), raw.text
            templated = run(base, model, {"prompt": "Once upon a time", "max_tokens": 8})
            assert templated.status_code == 413 and templated.json()["errors"][0]["code"] == 5021, templated.text
    finally:
        err = stop(process)
    assert process.returncode == 0 and "Traceback" not in err, err
