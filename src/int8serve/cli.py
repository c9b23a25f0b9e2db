"""The `int8serve` command: serve, generate, quantize, eval-ppl.

Every command takes `--model PATH` (a Hugging Face folder, a Meta folder or an int8 checkpoint written by
`int8serve quantize`); without it, the built-in demo model is used and says so loudly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .engine.chat_template import render_prompt
from .engine.config import ConfigError
from .engine.demo import DEMO_WARNING, demo_model_dir
from .engine.generate import GenerationStats, generate
from .engine.loader import LoadedModel, load_model, save_int8_checkpoint
from .engine.perplexity import evaluate
from .engine.sampling import SamplingParams
from .engine.sources import CheckpointError
from .engine.tokenizer import Tokenizer

DEFAULT_SERVED_MODEL = "@cf/meta/llama-2-7b-chat-int8"
# = service.policy.settings.DEFAULT_CACHE_TTL_SECONDS / DEFAULT_DAILY_NEURONS, repeated here so that building the
# parser does not import the HTTP stack (tests/test_server.py checks they agree)
DEFAULT_CACHE_TTL = 300
DEFAULT_DAILY_NEURONS = 10_000


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _add_model_args(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint folder: Hugging Face (config.json), Meta (params.json) or an int8 "
                             "checkpoint from 'int8serve quantize'. Default: the built-in demo model "
                             "(random weights, meaningless output)")
    if dtype:
        parser.add_argument("--dtype", choices=["int8", "fp32"], default="int8",
                            help="int8: weight-only int8 (the served path); fp32: full-precision reference "
                                 "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int8serve", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text from a prompt, streamed to the terminal",
                              description="Generate text for one prompt. Without --raw the prompt goes through "
                                          "the Llama 2 chat template exactly as Workers AI applies it (with its "
                                          "default system prompt); with --raw it is fed to the model as is.")
    _add_model_args(gen)
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--raw", action="store_true", help="no chat template: feed the prompt as is")
    gen.add_argument("--system", default=None, help="system prompt instead of Workers AI's default")
    gen.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    gen.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: 0.6)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (default: 0 = off)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="multiplicative, HF style (1.0 = off)")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="additive, OpenAI style (0 = off)")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="additive, OpenAI style (0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="same seed, same output (default: random)")

    quant = commands.add_parser("quantize", help="write a pre-quantized int8 checkpoint that loads fast",
                                description="Quantize SRC (Hugging Face or Meta folder) to weight-only int8, "
                                            "per output channel, and write it to DST (int8serve.json + "
                                            "model.safetensors + tokenizer.model).")
    quant.add_argument("src", type=Path, help="source checkpoint folder")
    quant.add_argument("dst", type=Path, help="destination folder (created)")
    quant.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")

    _add_serve_parser(commands)

    ppl = commands.add_parser("eval-ppl", help="perplexity over a text file, optionally against fp32",
                              description="Perplexity over non-overlapping windows of a text file. With "
                                          "--compare-to fp32, also the PPL ratio, mean KL divergence (KLD) and "
                                          "top-1 agreement of the model against the fp32 reference.")
    _add_model_args(ppl)
    ppl.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    ppl.add_argument("--window", type=int, default=256, help="tokens per window (default: 256)")
    ppl.add_argument("--compare-to", choices=["fp32"], default=None, help="reference to compare against")
    ppl.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    return parser


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve the Workers AI HTTP API (and health, readiness) over one model",
        description="Serve the Workers AI HTTP API for the model of a catalog card (default: the built-in "
                    f"{DEFAULT_SERVED_MODEL} card) with the weights given by --model. Clients use the base URL "
                    "http://HOST:PORT/client/v4 and an API token mapped to an account id.")
    _add_model_args(serve)
    serve.add_argument("--card", type=Path, action="append", default=[],
                       help="an extra catalog card file (or a folder of *.txt cards); repeatable")
    serve.add_argument("--served-model-name", default=DEFAULT_SERVED_MODEL,
                       help="the catalog name the weights are served under (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8787, help="port to listen on (default: %(default)s)")
    serve.add_argument("--token", action="append", default=[], metavar="TOKEN=ACCOUNT_ID",
                       help="an API token and the account it belongs to; repeatable. Also read from the "
                            "INT8SERVE_TOKENS variable (comma-separated) and --tokens-file. With none, a token is "
                            "made at start-up and printed: auth is never off")
    serve.add_argument("--tokens-file", type=Path, default=None,
                       help="a file of TOKEN=ACCOUNT_ID lines (# comments allowed)")
    serve.add_argument("--max-queue", type=int, default=32,
                       help="requests that may wait for a free slot; beyond it 429 code 3040 (default: 32)")
    serve.add_argument("--prefill-chunk", type=int, default=128,
                       help="prompt tokens per prefill step, so running streams keep flowing (default: 128)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="server log level (default: %(default)s)")
    serve.add_argument("--log-format", default="text", choices=["text", "json"],
                       help="log lines as readable text or as one JSON object each; either way one line per "
                            "request on the int8serve.request logger (default: %(default)s)")
    serve.add_argument("--log-prompts", action="store_true",
                       help="also log each request's prompt and response text (default: never logged)")
    policy = serve.add_argument_group(
        "serving policy", "The card's rate limits, response cache and neuron metering, with the operator's "
                          "overrides and where their state lives (see docs/policy.md).")
    policy.add_argument("--redis-url", default=None, metavar="URL",
                        help="share rate limits and the response cache with every replica using this Redis "
                             "(redis://host:6379/0; add ?key_prefix=NAME to namespace the keys, default int8serve). "
                             "Default: in this process")
    policy.add_argument("--database-url", default=None, metavar="URL",
                        help="the usage ledger's database, a SQLAlchemy URL such as "
                             "postgresql+psycopg://user@host:5432/db (default: a SQLite file in --data-dir)")
    policy.add_argument("--data-dir", type=Path, default=Path(os.environ.get("INT8SERVE_DATA") or "data"),
                        metavar="DIR",
                        help="where this server keeps its ledger (without --database-url) and the ledger's spool; "
                             "one per server (default: $INT8SERVE_DATA, else ./data)")
    policy.add_argument("--rpm", type=_non_negative_int, default=None, metavar="N",
                        help="requests per minute per account and model, instead of the card's default "
                             "(0 = unlimited; the card's per-account values still apply)")
    policy.add_argument("--account-rpm", action="append", default=[], metavar="ACCOUNT=N",
                        help="requests per minute for one account, over the card; repeatable (0 = unlimited)")
    policy.add_argument("--no-cache", dest="cache", action="store_false",
                        help="no response cache, whatever the card says")
    policy.add_argument("--cache-ttl", type=_positive_int, default=DEFAULT_CACHE_TTL, metavar="SECONDS",
                        help="how long a cached answer is served (default: %(default)s; a request's "
                             "cf-aig-cache-ttl header overrides it)")
    policy.add_argument("--daily-neurons", type=_positive_float, nargs="?", const=float(DEFAULT_DAILY_NEURONS),
                        default=None, metavar="N",
                        help=f"a daily neuron allocation per account, reset 00:00 UTC, beyond which requests get "
                             f"429 code 3036 (off by default; the flag alone: {DEFAULT_DAILY_NEURONS:,})")


def _non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def parse_account_rpm(pairs: Sequence[str]) -> dict[str, int]:
    """ACCOUNT=N pairs of --account-rpm."""
    limits: dict[str, int] = {}
    for pair in pairs:
        account, sep, number = pair.partition("=")
        account, number = account.strip(), number.strip()
        if not sep or not account or not number.isdigit():
            raise UsageError(f"--account-rpm {pair}: expected ACCOUNT=N with N a whole number >= 0")
        limits[account] = int(number)
    return limits


def resolve_model(path: Path | None) -> Path:
    if path is None:
        print(f"int8serve: WARNING: {DEMO_WARNING}", file=sys.stderr)
        return demo_model_dir()
    return path


def open_model(path: Path | None, dtype: str) -> tuple[LoadedModel, Tokenizer]:
    loaded = load_model(resolve_model(path), dtype, progress=sys.stderr.isatty())
    if loaded.tokenizer_path is None:
        raise UsageError(f"{loaded.path}: no tokenizer.model in the folder or its parent")
    return loaded, Tokenizer(loaded.tokenizer_path)


def cmd_generate(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                repetition_penalty=args.repetition_penalty, seed=args.seed,
                                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)
    except ValueError as err:
        raise UsageError(str(err)) from err
    loaded, tokenizer = open_model(args.model, args.dtype)
    if args.raw:
        segments = render_prompt(args.prompt, raw=True)
    else:
        segments = render_prompt(args.prompt) if args.system is None else _with_system(args.system, args.prompt)
    prompt_ids = tokenizer.encode_segments(segments)
    context = loaded.config.max_seq_len
    if len(prompt_ids) >= context:
        raise UsageError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}")
    max_tokens = min(args.max_tokens, context - len(prompt_ids))
    stats = GenerationStats()
    detok = tokenizer.detokenizer()
    for token in generate(loaded.model, prompt_ids, params, max_tokens, tokenizer.eos_id, stats=stats):
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    print(f"prompt tokens {stats.prompt_tokens}, generated tokens {stats.generated_tokens}, "
          f"prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.1f} tok/s, "
          f"finish {stats.finish_reason}", file=sys.stderr)


def _with_system(system: str, prompt: str) -> list:
    from .engine.chat_template import render_messages

    return render_messages([{"role": "system", "content": system}, {"role": "user", "content": prompt}])


def cmd_quantize(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    loaded = load_model(args.src, "int8", progress=sys.stderr.isatty())
    folder = save_int8_checkpoint(loaded, args.dst)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    print(f"wrote {folder} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s", file=sys.stderr)


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    if not args.text.is_file():
        raise UsageError(f"{args.text}: no such file")
    loaded, tokenizer = open_model(args.model, args.dtype)
    reference = None
    if args.compare_to == "fp32":
        reference = load_model(loaded.path, "fp32").model
    ids = tokenizer.encode(args.text.read_text(encoding="utf-8"))
    if args.max_windows:
        ids = ids[: args.max_windows * args.window]
    try:
        report = evaluate(loaded.model, ids, args.window, tokenizer.bos_id, reference, progress=sys.stderr.isatty())
    except ValueError as err:
        raise UsageError(str(err)) from err
    for line in report.lines(label=args.dtype):
        print(line)


def cmd_serve(args: argparse.Namespace) -> None:
    from .server import ServeOptions, run_server  # the HTTP stack is only imported to serve

    options = ServeOptions(
        model=args.model, dtype=args.dtype, cards=args.card, served_model_name=args.served_model_name,
        host=args.host, port=args.port, tokens=parse_tokens(args.token, args.tokens_file),
        max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, log_level=args.log_level,
        log_format=args.log_format, log_prompts=args.log_prompts,
        redis_url=args.redis_url, database_url=args.database_url, data_dir=args.data_dir, rpm=args.rpm,
        account_rpm=parse_account_rpm(args.account_rpm), cache=args.cache, cache_ttl=args.cache_ttl,
        daily_neurons=args.daily_neurons)
    run_server(options)


def parse_tokens(pairs: Sequence[str], tokens_file: Path | None) -> dict[str, str]:
    """TOKEN=ACCOUNT_ID pairs from flags, INT8SERVE_TOKENS and a tokens file."""
    entries = [(f"--token {p}", p) for p in pairs]
    env = os.environ.get("INT8SERVE_TOKENS", "")
    entries += [("INT8SERVE_TOKENS", p.strip()) for p in env.split(",") if p.strip()]
    if tokens_file is not None:
        if not tokens_file.is_file():
            raise UsageError(f"{tokens_file}: no such tokens file")
        for number, line in enumerate(tokens_file.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append((f"{tokens_file}:{number}", line))
    from .service.auth import is_valid_token

    tokens: dict[str, str] = {}
    for where, entry in entries:
        token, sep, account = entry.partition("=")
        token, account = token.strip(), account.strip()
        if not sep or not is_valid_token(token) or not account:
            raise UsageError(f"{where}: expected TOKEN=ACCOUNT_ID with a token of visible ASCII characters, "
                             f"got {entry!r}")
        if tokens.get(token, account) != account:
            raise UsageError(f"{where}: token is already mapped to account {tokens[token]}")
        tokens[token] = account
    return tokens


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "quantize": cmd_quantize, "eval-ppl": cmd_eval_ppl}


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        COMMANDS[args.command](args)
    except (UsageError, CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"int8serve {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
