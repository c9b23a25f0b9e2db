"""The first start quantizes once (issue 14): what the first and a later start of a 7B-shape model cost.

    .venv/bin/python -m benchmarks.model_cache --make-fp16 data/llama2-7b-shape-fp16   # once: 13.5 GB, random
    .venv/bin/python -m benchmarks.model_cache --model data/llama2-7b-shape-fp16 --write docs/benchmarks.md

The model is a Hugging Face folder of the Llama-2-7B shape with random fp16 weights (the bytes, not the values,
decide the cost). With an empty `$INT8SERVE_CACHE` (a temporary folder):
1. the first start's load, alone in a process: quantize from fp16 and write the int8 copy; its time and the
   process's peak resident size (VmHWM) against the size of the int8 copy (goal: <= 1.3x);
2. a later start: `int8serve serve --model DIR`, from the spawn to `/readyz` 200 (goal: <= 15 s), and its peak RSS;
   with `--requests N` (default 4), that server then answers N concurrent requests and its peak RSS while serving
   with the card's 4 slots x 2048 KV positions is taken (issue 10's goal: <= 12 GB): with `--fill` measured with
   every slot filled to its context, else computed from the positions the requests wrote;
3. the later start's loading step alone (`load_cached` in a process of its own).
Only one 7B process runs at a time: run it under `flock /tmp/int8serve-7b.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import start_server, stop_process, write_section
from benchmarks.engine import LLAMA2_7B
from benchmarks.machine import machine_description
from int8serve.engine.loader import DEFAULT_QUANTIZER, QUANTIZERS

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "models" / "llama2-tokenizer" / "tokenizer.model"
GOAL_READY_S, GOAL_RSS_RATIO = 15.0, 1.3
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near old bridges"


def hf_tensors() -> list[tuple[str, tuple[int, ...]]]:
    c = LLAMA2_7B
    names = [("model.embed_tokens.weight", (c.vocab_size, c.dim))]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        names += [(p + "self_attn.q_proj.weight", (c.dim, c.dim)), (p + "self_attn.k_proj.weight", (c.dim, c.dim)),
                  (p + "self_attn.v_proj.weight", (c.dim, c.dim)), (p + "self_attn.o_proj.weight", (c.dim, c.dim)),
                  (p + "mlp.gate_proj.weight", (c.hidden_dim, c.dim)),
                  (p + "mlp.up_proj.weight", (c.hidden_dim, c.dim)),
                  (p + "mlp.down_proj.weight", (c.dim, c.hidden_dim)),
                  (p + "input_layernorm.weight", (c.dim,)), (p + "post_attention_layernorm.weight", (c.dim,))]
    return [*names, ("model.norm.weight", (c.dim,)), ("lm_head.weight", (c.vocab_size, c.dim))]


def make_fp16(destination: Path) -> None:
    """A Llama-2-7B-shape Hugging Face folder, random fp16 weights, written one tensor at a time."""
    destination.mkdir(parents=True, exist_ok=True)
    c = LLAMA2_7B
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
              "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
              "intermediate_size": c.hidden_dim, "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16"}
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(TOKENIZER, destination / "tokenizer.model")
    tensors, header, offset = hf_tensors(), {}, 0
    for name, shape in tensors:
        size = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(destination / "model.safetensors", "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, shape in tensors:
            scale = 1.0 if "norm" in name else shape[-1] ** -0.5
            f.write((torch.randn(shape, generator=generator) * scale).half().numpy().tobytes())
    print(f"wrote {destination} ({(offset + len(encoded)) / 1e9:.1f} GB)", file=sys.stderr)


_FIRST_LOAD = """
import json, sys, time
from pathlib import Path
from int8serve.engine.model_cache import cache_folder, load_cached
started = time.perf_counter()
load_cached(Path(sys.argv[1]), quantizer=sys.argv[2])
seconds = time.perf_counter() - started
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
size = sum(p.stat().st_size for p in cache_folder(Path(sys.argv[1]), quantizer=sys.argv[2]).iterdir())
import os
cpu = sum(os.times()[:2])
print(json.dumps({"seconds": seconds, "peak_rss": int(status["VmHWM"].split()[0]) * 1024, "copy_bytes": size,
                  "cpu_seconds": cpu}))
"""


def first_load(model: Path, env: dict[str, str]) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", _FIRST_LOAD, str(model), env["INT8SERVE_QUANTIZER"]],
                            capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def fill_prompt(model: Path, tokens: int, index: int) -> str:
    """Raw text that the model's tokenizer makes exactly `tokens` tokens with its BOS, distinct for each index: digits,
    one token each in Llama's tokenizer, so that a prompt of ~2,000 tokens stays within the card's 4,096 characters."""
    from int8serve.engine.model_files import find_tokenizer
    from int8serve.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(find_tokenizer(model))
    text = f"Request {index}: "
    digits = "".join(str((index + i) % 10) for i in range(max(0, tokens - len(tokenizer.encode(text, bos=True)))))
    counted = len(tokenizer.encode(text + digits, bos=True))
    if counted != tokens:
        raise RuntimeError(f"a prompt of {len(digits)} digits makes {counted} tokens, not {tokens}")
    return text + digits


def serve_requests(port: int, count: int, prompt_words: int, max_tokens: int,
                   fill: tuple[Path, int] | None = None) -> dict[str, float]:
    """`count` concurrent requests of distinct prompts; their tokens and the time until all ended. With `fill`
    (the model folder, the context): raw prompts of context - max_tokens tokens, so that the slots' every KV position
    is written, and the first request is sent alone, the others a second later, so that the largest prefill forward
    (a prompt alone in the engine: `--solo-prefill-tokens`) is part of the peak too."""
    import httpx

    url = f"http://127.0.0.1:{port}/client/v4/accounts/bench/ai/run/@cf/meta/llama-2-7b-chat-int8"
    words = WORDS.split()
    prompts = [fill_prompt(fill[0], fill[1] - max_tokens, index) if fill else
               f"Request {index}: " + " ".join(words[(index + i) % len(words)] for i in range(prompt_words))
               for index in range(count)]

    def one(index: int) -> int:
        if fill and index:
            time.sleep(1.0)
        body = {"prompt": prompts[index], "max_tokens": max_tokens, "stream": False, "seed": index + 1,
                **({"raw": True} if fill else {})}
        answer = httpx.post(url, json=body, headers={"Authorization": "Bearer bench"}, timeout=3600, trust_env=False)
        if answer.status_code != 200:
            raise RuntimeError(f"request {index}: {answer.status_code} {answer.text[:500]}")
        usage = answer.json()["result"]["usage"]
        return usage["prompt_tokens"] + usage["completion_tokens"]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        tokens = list(pool.map(one, range(count)))
    return {"requests": count, "tokens_per_request": sum(tokens) / count, "seconds": time.perf_counter() - started}


def process_rss(pid: int) -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) * 1024 for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def later_start(model: Path, env: dict[str, str], data: Path, requests: int = 0, prompt_words: int = 150,
                max_tokens: int = 32, fill: bool = False) -> dict[str, float]:
    started = time.perf_counter()
    log = data.with_name("server.log")
    args = ["--model", str(model), "--data-dir", str(data), "--token", "bench=bench", "--rpm", "0", "--no-cache"]
    # no time limit: a 7B start on a slow machine takes what it takes
    server = start_server(args, output=log, env=env, timeout=math.inf, interval=0.1)
    process = server.process
    try:
        seconds = time.perf_counter() - started
        ready_rss = process_rss(process.pid)
        text = log.read_text()
        loaded, warmed = re.search(r"loaded in ([\d.]+) s", text), re.search(r"warmed in ([\d.]+) s", text)
        ticks = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]  # utime, stime
        result = {"seconds": seconds, "peak_rss": ready_rss["VmHWM"], "rss_file": ready_rss["RssFile"],
                  "load_seconds": float(loaded.group(1)) if loaded else float("nan"),
                  "warm_seconds": float(warmed.group(1)) if warmed else float("nan"),
                  "cpu_seconds": sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")}
        if requests:
            context = re.search(r"context (\d+) tokens", text)
            if fill and not context:
                raise RuntimeError("--fill: the server's start line names no context")
            served = serve_requests(server.port, requests, prompt_words, max_tokens,
                                    (model, int(context.group(1))) if fill and context else None)
            serving_rss = process_rss(process.pid)
            result.update({f"served_{key}": value for key, value in served.items()})
            result.update({"serving_peak_rss": serving_rss["VmHWM"], "serving_rss": serving_rss["VmRSS"]})
        return result
    finally:
        stop_process(process)
        print(log.read_text()[-3000:], file=sys.stderr)


def kv_cache_bytes(slots: int = 4, positions: int = 2048) -> int:
    """The bf16 KV cache `serve` reserves for the 7B shape: its pages are touched as positions are written."""
    c = LLAMA2_7B
    return c.n_layers * 2 * slots * c.n_kv_heads * positions * (c.dim // c.n_heads) * 2


def report(model: Path, first: dict[str, float] | None, later: dict[str, float], alone: dict[str, float],
           command: str, load: str, quantizer: str) -> str:
    lines = [
        "## First and later start of a 7B-shape model (the int8 copy in the cache)",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; load "
        f"average {load} (other sessions share the 2 cores and the RAM: wall times stretch against the CPU time the "
        "process itself used).",
        f"- Model: `{model.name}`, the Llama-2-7B shape as a Hugging Face folder with random fp16 weights "
        f"({sum(p.stat().st_size for p in model.iterdir()) / 1e9:.1f} GB), quantized with "
        f"`{quantizer}`{' (the default)' if quantizer == DEFAULT_QUANTIZER else ''}; "
        f"{'`$INT8SERVE_CACHE` empty at the start' if first is not None else 'the int8 copy in the cache already'}. "
        "The int8 copy is stored in the kernel's packed layout and mapped by later starts (no read into fresh "
        "memory, no repacking).",
        "",
        "| start | time | peak RSS | goal |",
        "|---|---|---|---|",
    ]
    if first is not None:
        ratio = first["peak_rss"] / first["copy_bytes"]
        lines.append(
            f"| first: quantize from fp16 and write the int8 copy ({first['copy_bytes'] / 1e9:.2f} GB) | "
            f"{first['seconds']:.0f} s ({first['cpu_seconds']:.0f} s of CPU) | {first['peak_rss'] / 1e9:.2f} GB = "
            f"**{ratio:.2f}x** the int8 copy | <= {GOAL_RSS_RATIO}x: "
            f"{'met' if ratio <= GOAL_RSS_RATIO else 'not met'} |")
    lines += [
        f"| later: `serve` from the spawn to `/readyz` 200 (of which mapping the int8 copy, building the engine and "
        f"warming the default system prompt: {later['load_seconds']:.1f} s, the warming alone "
        f"{later['warm_seconds']:.1f} s) | **{later['seconds']:.1f} s** "
        f"({later['cpu_seconds']:.1f} s of CPU; best of {len(later['all_seconds'])}: "
        f"{' / '.join(f'{seconds:.1f}' for seconds in later['all_seconds'])} s) | "
        f"{later['peak_rss'] / 1e9:.2f} GB, of it "
        f"{later['rss_file'] / 1e9:.2f} GB mapped files (the int8 copy, libraries) | <= {GOAL_READY_S:.0f} s: "
        f"{'met' if later['seconds'] <= GOAL_READY_S else 'not met'} |",
        f"| later, the loading step alone (`load_cached` in a process of its own, a cache hit) | "
        f"{alone['seconds']:.2f} s ({alone['cpu_seconds']:.1f} s of CPU for the whole process, its imports "
        f"included) | {alone['peak_rss'] / 1e9:.2f} GB (pages are mapped as a forward first reads them) | |",
    ]
    filled = False
    if "serving_peak_rss" in later:
        kv = kv_cache_bytes()
        written = min(2048, -(-int(later["served_tokens_per_request"]) // 128) * 128)  # prefill writes whole chunks
        bound = later["serving_peak_rss"] + kv * (1 - written / 2048)
        filled = written >= 2048
        full = ("every slot filled to its context (measured, `--fill`: the first request alone, the others a "
                "second later)" if filled else
                f"with every slot full (computed: + the {(1 - written / 2048) * kv / 1e9:.2f} GB of the "
                f"{kv / 1e9:.2f} GB bf16 KV cache not yet written) {bound / 1e9:.2f} GB")
        lines.append(
            f"| serving: the same server after {later['served_requests']:.0f} concurrent requests of "
            f"{later['served_tokens_per_request']:.0f} tokens each ({later['served_seconds']:.0f} s), 4 slots x 2048 "
            f"KV positions | | **{later['serving_peak_rss'] / 1e9:.2f} GB**; {full} | <= 12 GB: "
            f"{'met' if bound <= 12e9 else 'not met'} |")
    lines += [
        "",
        *(["The first row is the loading step alone (a process that only calls `load_cached`), so that its peak is "
           "the quantization's and not the KV cache's, which `serve` allocates after it."] if first else []),
        "The KV cache is reserved at start and its pages become resident as positions are written"
        + (": with `--fill` every position is written before the serving peak is read." if filled else
           ", hence the computed full-cache figure."),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--make-fp16", type=Path, metavar="DIR", help="only write the fp16 7B-shape folder to DIR")
    parser.add_argument("--model", type=Path, help="the fp16 folder to measure with")
    parser.add_argument("--write", type=Path, metavar="FILE", help="also write the section into FILE")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="the $INT8SERVE_CACHE to use and keep (default: a temporary one); the first start is "
                             "measured only when it holds no copy yet")
    parser.add_argument("--skip-first", action="store_true",
                        help="with a --cache that already holds the copy: measure only the later starts")
    parser.add_argument("--later-runs", type=int, default=2, help="later starts measured (the best is reported)")
    parser.add_argument("--requests", type=int, default=4,
                        help="concurrent requests the last later start then serves, for the serving peak RSS (0: none)")
    parser.add_argument("--quantizer", choices=QUANTIZERS, default=DEFAULT_QUANTIZER,
                        help=f"how the first start quantizes (default: {DEFAULT_QUANTIZER}; it decides the first "
                             "start's time and peak, not the later starts')")
    parser.add_argument("--prompt-words", type=int, default=150, help="words of each request's prompt")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--fill", action="store_true",
                        help="the requests fill their slots: raw prompts of the context less --max-tokens tokens, the "
                             "first sent alone (a prompt alone prefills in the largest forward), so the serving peak "
                             "is measured with every KV position written, not computed")
    args = parser.parse_args()
    if args.make_fp16:
        make_fp16(args.make_fp16)
        return
    if not args.model:
        parser.error("--model DIR (made with --make-fp16) is required")
    with tempfile.TemporaryDirectory(prefix="int8serve-cache-bench-") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        env = {**os.environ, "INT8SERVE_CACHE": str(cache), "INT8SERVE_TOKENS": "", "PYTHONUNBUFFERED": "1",
               "INT8SERVE_QUANTIZER": args.quantizer}
        kernels = Path(os.environ.get("INT8SERVE_CACHE", Path.home() / ".cache" / "int8serve")) / "kernels"
        if kernels.is_dir() and not (cache / "kernels").exists():  # the compiled kernel is not what is measured
            shutil.copytree(kernels, cache / "kernels")
        os.environ["INT8SERVE_CACHE"] = str(cache)
        from int8serve.engine.model_cache import cache_folder

        held = (cache_folder(args.model, quantizer=args.quantizer) / "int8serve.json").is_file()
        if held != args.skip_first:
            parser.error(f"{cache} already holds the int8 copy: the first start cannot be measured with it (add "
                         "--skip-first)" if held else "--skip-first needs a --cache that holds the int8 copy")
        load_before = os.getloadavg()[0]
        first = None if args.skip_first else first_load(args.model, env)
        print(f"first: {first}", file=sys.stderr)
        starts = []
        for run in range(args.later_runs):
            last = run == args.later_runs - 1
            starts.append(later_start(args.model, env, Path(tmp) / f"data{run}", args.requests if last else 0,
                                      args.prompt_words, args.max_tokens, args.fill))
            print(f"later: {starts[-1]}", file=sys.stderr)
        later = {**min(starts, key=lambda start: start["seconds"]),
                 **{k: v for k, v in starts[-1].items() if k.startswith("serv")}}
        later["all_seconds"] = [start["seconds"] for start in starts]
        alone = first_load(args.model, env)  # the copy is there now: the later start's loading step alone
        print(f"later, loading alone: {alone}", file=sys.stderr)
        load = f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    command = "python -m benchmarks.model_cache " + " ".join(sys.argv[1:])
    text = report(args.model, first, later, alone, command, load, args.quantizer)
    print(text)
    if args.write:
        write_section(args.write, text, "model_cache.py")


if __name__ == "__main__":
    main()
