"""benchmarks/model_cache.py: `--fill`'s prompts are exactly as long as asked, in tokens, and within the card's
4,096 characters, so that the serving peak is measured with every KV position written."""

from __future__ import annotations

from pathlib import Path

from benchmarks import model_cache as bench
from int8serve.engine.tokenizer import load_tokenizer


def test_fill_prompts_have_the_tokens_asked_and_fit_the_card(shared_dir: Path) -> None:
    folder = shared_dir / "models" / "llama2-tokenizer"
    tokenizer = load_tokenizer(folder / "tokenizer.model")
    prompts = [bench.fill_prompt(folder, 2016, index) for index in range(4)]
    assert [len(tokenizer.encode(prompt, bos=True)) for prompt in prompts] == [2016] * 4
    assert len(set(prompts)) == 4 and max(map(len, prompts)) <= 4096


def test_a_filled_serving_peak_is_reported_as_measured(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"0" * 64)
    later = {"seconds": 3.0, "peak_rss": 7.5e9, "rss_file": 7.2e9, "load_seconds": 0.1, "warm_seconds": 1.0,
             "cpu_seconds": 3.0, "all_seconds": [3.0], "served_requests": 4, "served_tokens_per_request": 2048,
             "served_seconds": 90.0, "serving_peak_rss": 11.9e9, "serving_rss": 11.8e9}
    alone = {"seconds": 0.06, "cpu_seconds": 0.9, "peak_rss": 0.25e9}

    def serving_row() -> str:
        text = bench.report(tmp_path, None, later, alone, "cmd", "1.0", "gptq")
        return next(line for line in text.splitlines() if line.startswith("| serving:"))

    assert "every slot filled to its context (measured" in serving_row() and "computed" not in serving_row()
    assert serving_row().endswith("<= 12 GB: met |")
    later["served_tokens_per_request"] = 300  # 384 of 2048 positions written: the rest is added
    assert "with every slot full (computed: + the 3.49 GB" in serving_row() and "not met" in serving_row()
