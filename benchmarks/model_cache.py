"""The first start quantizes once (issue 14): what the first and a later start of a 7B-shape model cost.

    .venv/bin/python -m benchmarks.model_cache --make-fp16 data/llama2-7b-shape-fp16   # once: 13.5 GB, random
    .venv/bin/python -m benchmarks.model_cache --model data/llama2-7b-shape-fp16 --write docs/benchmarks.md

The model is a Hugging Face folder of the Llama-2-7B shape with random fp16 weights (the bytes, not the values,
decide the cost). With an empty `$INT8SERVE_CACHE` (a temporary folder):
1. the first start's load, alone in a process: quantize from fp16 and write the int8 copy; its time and the
   process's peak resident size (VmHWM) against the size of the int8 copy (goal: <= 1.3x);
2. a later start: `int8serve serve --model DIR`, from the spawn to `/readyz` 200 (goal: <= 15 s), and its peak RSS.
Only one 7B process runs at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import free_port, stop_process, write_section
from benchmarks.engine import LLAMA2_7B
from benchmarks.machine import machine_description

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "models" / "llama2-tokenizer" / "tokenizer.model"
GOAL_READY_S, GOAL_RSS_RATIO = 15.0, 1.3


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
load_cached(Path(sys.argv[1]))
seconds = time.perf_counter() - started
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
size = sum(p.stat().st_size for p in cache_folder(Path(sys.argv[1])).iterdir())
import os
cpu = sum(os.times()[:2])
print(json.dumps({"seconds": seconds, "peak_rss": int(status["VmHWM"].split()[0]) * 1024, "copy_bytes": size,
                  "cpu_seconds": cpu}))
"""


def first_load(model: Path, env: dict[str, str]) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", _FIRST_LOAD, str(model)], capture_output=True, text=True,
                            env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def later_start(model: Path, env: dict[str, str], data: Path) -> dict[str, float]:
    import httpx

    port = free_port()
    started = time.perf_counter()
    log = data.with_name("server.log")
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "int8serve", "serve", "--model", str(model), "--port",
                                    str(port), "--data-dir", str(data), "--token", "bench=bench"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=output, text=True)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        status = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines())
        loaded = re.search(r"loaded in ([\d.]+) s", log.read_text())
        ticks = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]  # utime, stime
        return {"seconds": seconds, "peak_rss": int(status["VmHWM"].split()[0]) * 1024,
                "load_seconds": float(loaded.group(1)) if loaded else float("nan"),
                "cpu_seconds": sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")}
    finally:
        stop_process(process)
        print(log.read_text()[-3000:], file=sys.stderr)


def report(model: Path, first: dict[str, float], later: dict[str, float], alone: dict[str, float], command: str,
           load: str) -> str:
    ratio = first["peak_rss"] / first["copy_bytes"]
    return "\n".join([
        "## First and later start of a 7B-shape model (the int8 copy in the cache)",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; other "
        f"sessions shared the 2 cores and the RAM while it ran (load average {load}), so wall times are long "
        "against the CPU time the process itself used.",
        f"- Model: `{model.name}`, the Llama-2-7B shape as a Hugging Face folder with random fp16 weights "
        f"({sum(p.stat().st_size for p in model.iterdir()) / 1e9:.1f} GB); `$INT8SERVE_CACHE` empty at the start.",
        "",
        "| start | time | peak RSS | goal |",
        "|---|---|---|---|",
        f"| first: quantize from fp16 and write the int8 copy ({first['copy_bytes'] / 1e9:.2f} GB) | "
        f"{first['seconds']:.0f} s ({first['cpu_seconds']:.0f} s of CPU) | {first['peak_rss'] / 1e9:.2f} GB = "
        f"**{ratio:.2f}x** the int8 copy | "
        f"<= {GOAL_RSS_RATIO}x: {'met' if ratio <= GOAL_RSS_RATIO else 'not met'} |",
        f"| later: `serve` from the spawn to `/readyz` 200 (of which loading the int8 copy: "
        f"{later['load_seconds']:.1f} s, with warming the default system prompt) | **{later['seconds']:.1f} s** "
        f"({later['cpu_seconds']:.1f} s of CPU) | "
        f"{later['peak_rss'] / 1e9:.2f} GB (with the 4-slot KV cache) | <= {GOAL_READY_S:.0f} s: "
        f"{'met' if later['seconds'] <= GOAL_READY_S else 'not met'} |",
        f"| later, the loading step alone (`load_cached` in a process of its own, a cache hit) | "
        f"{alone['seconds']:.1f} s ({alone['cpu_seconds']:.1f} s of CPU for the whole process, its imports "
        f"included) | {alone['peak_rss'] / 1e9:.2f} GB | |",
        "",
        "The first row is the loading step alone (a process that only calls `load_cached`), so that its peak is the "
        "quantization's and not the KV cache's, which `serve` allocates after it.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--make-fp16", type=Path, metavar="DIR", help="only write the fp16 7B-shape folder to DIR")
    parser.add_argument("--model", type=Path, help="the fp16 folder to measure with")
    parser.add_argument("--write", type=Path, metavar="FILE", help="also write the section into FILE")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="the $INT8SERVE_CACHE to use and keep (default: a temporary one); the first start is "
                             "measured only when it holds no copy yet")
    args = parser.parse_args()
    if args.make_fp16:
        make_fp16(args.make_fp16)
        return
    if not args.model:
        parser.error("--model DIR (made with --make-fp16) is required")
    with tempfile.TemporaryDirectory(prefix="int8serve-cache-bench-") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        env = {**os.environ, "INT8SERVE_CACHE": str(cache), "INT8SERVE_TOKENS": "", "PYTHONUNBUFFERED": "1"}
        kernels = Path(os.environ.get("INT8SERVE_CACHE", Path.home() / ".cache" / "int8serve")) / "kernels"
        if kernels.is_dir() and not (cache / "kernels").exists():  # the compiled kernel is not what is measured
            shutil.copytree(kernels, cache / "kernels")
        os.environ["INT8SERVE_CACHE"] = str(cache)
        from int8serve.engine.model_cache import cache_folder

        if (cache_folder(args.model) / "int8serve.json").is_file():
            parser.error(f"{cache} already holds the int8 copy: the first start cannot be measured with it")
        load_before = os.getloadavg()[0]
        first = first_load(args.model, env)
        print(f"first: {first}", file=sys.stderr)
        later = later_start(args.model, env, Path(tmp) / "data")
        print(f"later: {later}", file=sys.stderr)
        alone = first_load(args.model, env)  # the copy is there now: the later start's loading step alone
        print(f"later, loading alone: {alone}", file=sys.stderr)
        load = f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    command = "python -m benchmarks.model_cache --model " + str(args.model) + (
        f" --write {args.write}" if args.write else "")
    text = report(args.model, first, later, alone, command, load)
    print(text)
    if args.write:
        write_section(args.write, text, "model_cache.py")


if __name__ == "__main__":
    main()
