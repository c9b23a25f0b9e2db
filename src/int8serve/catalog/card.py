"""Parse a Workers AI catalog entry ("card") into a typed, validated `ModelCard`.

A card is the model's single source of truth: its id and name, its limits, its request/response
JSON Schemas and its serving policy (response cache, requests-per-minute quota, neuron metering).
The format is the one of Cloudflare's catalog (see the built-in card in `cards/`):

* YAML front matter between two `---` lines; anything after the closing line is ignored;
* `model.properties` is a list of `{property_id, value}` with string values;
* the `constellation_config` property value is itself YAML;
* `json_schema.input` / `json_schema.output` are JSON strings (a YAML mapping is accepted too).

Everything is checked once, at load time. A malformed card raises `CardError`, whose message names the
source and the field, e.g. ``card x.txt: field 'model.properties[context_length_limit]': expected a
positive integer, got 'abc'``.

Required: `model.name`, `model.task.name`, `model.properties[context_length_limit]`,
`json_schema.input`, `json_schema.output`. Defaults for everything else:

* `model.id`: a UUID5 of the name; `model.source`: 2 for `@hf/` names, else 1;
  `model.description`: ""; `model.task.id` / `.description`: ""; `model.tags`: [];
* `sequence_length_limit`: the context length limit;
* `default_max_tokens` (the input schema's `max_tokens.default`): min(256, sequence_length_limit);
* no `constellation_config`, or keys missing from it: no response cache, no requests-per-minute
  limit (`rpm_for` returns None), no neuron metering (0 neurons), `max_concurrent_requests` 1;
  `infer_response_cache: off` (YAML false) also means no cache.

Integers may be written as YAML integers or as strings of digits ("2048"); anything else, and any
zero or negative limit, is an error. Neuron metrics must be one of `KNOWN_NEURON_METRICS`.
"""

from __future__ import annotations

import copy
import json
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import yaml

__all__ = [
    "KNOWN_NEURON_METRICS",
    "CardError",
    "ModelCard",
    "NeuronCost",
    "RateLimit",
    "ServingPolicy",
    "Task",
    "builtin_cards",
    "load_card",
    "parse_card",
]

KNOWN_NEURON_METRICS = ("input_tokens", "output_tokens")
DEFAULT_MAX_TOKENS = 256  # Workers AI's documented default when a schema has none
DEFAULT_MAX_CONCURRENT_REQUESTS = 1


class CardError(ValueError):
    """A card that cannot be served. `source` and `field` say where; `problem` says what."""

    def __init__(self, source: str, field: str | None, problem: str) -> None:
        self.source, self.field, self.problem = source, field, problem
        where = f"card {source}: field '{field}'" if field else f"card {source}"
        super().__init__(f"{where}: {problem}")


class Task(NamedTuple):
    id: str
    name: str
    description: str


class NeuronCost(NamedTuple):
    """Neurons charged per unit of `metric` (one of `KNOWN_NEURON_METRICS`)."""

    metric: str
    cost: float


@dataclass(frozen=True)
class RateLimit:
    """Requests per minute, per account and model. `default_rpm` None means unlimited."""

    default_rpm: int | None = None
    accounts: dict[str, int] = field(default_factory=dict)

    def rpm_for(self, account_id: str) -> int | None:
        return self.accounts.get(str(account_id), self.default_rpm)


@dataclass(frozen=True)
class ServingPolicy:
    """What `constellation_config` asks of the server, beyond the token limits."""

    response_cache: str | None = None  # e.g. "in_memory"; None = no response cache
    rate_limit: RateLimit = field(default_factory=RateLimit)
    neuron_costs: tuple[NeuronCost, ...] = ()

    def rpm_for(self, account_id: str) -> int | None:
        """Requests per minute allowed to `account_id` (its override, else the default); None = unlimited."""
        return self.rate_limit.rpm_for(account_id)

    def neurons(self, input_tokens: int, output_tokens: int) -> float:
        """Σ count × cost over the card's metrics, rounded to 6 decimals (float noise off the ledger);
        0.0 when the card meters nothing."""
        counts = {"input_tokens": input_tokens, "output_tokens": output_tokens}
        for name, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
        return round(sum((counts[c.metric] * c.cost for c in self.neuron_costs), 0.0), 6)


@dataclass(frozen=True, eq=False)
class ModelCard:
    """A validated catalog entry. Treat the dicts as read-only; the `to_*` methods return copies."""

    source_path: str
    id: str
    source: int
    name: str
    description: str
    task: Task
    tags: tuple[str, ...]
    properties: dict[str, Any]  # property_id -> value
    property_list: tuple[dict[str, Any], ...]  # the original list, in order
    context_length_limit: int  # prompt tokens + generated tokens
    sequence_length_limit: int  # generated tokens (max_tokens cap)
    max_concurrent_requests: int
    default_max_tokens: int
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    policy: ServingPolicy
    constellation_config: dict[str, Any]
    display_name: str
    front_matter: dict[str, Any]  # the whole parsed front matter (title, layout, task_type, ...)

    @property
    def author(self) -> str:
        """The author segment of the name: `@cf/meta/llama-2-7b-chat-int8` → `meta`."""
        parts = self.name.split("/")
        if parts[0].startswith("@") and len(parts) >= 3:
            return parts[1]
        return parts[0] if len(parts) >= 2 else ""

    @cached_property
    def input_validator(self) -> jsonschema.protocols.Validator:
        """A `jsonschema` validator for request bodies (the card's own input schema)."""
        return jsonschema.validators.validator_for(self.input_schema)(self.input_schema)

    def to_search_result(self) -> dict[str, Any]:
        """One element of `models/search`'s `result` array (contract §4.1)."""
        out: dict[str, Any] = {
            "id": self.id,
            "source": self.source,
            "name": self.name,
            "description": self.description,
            "task": self.task._asdict(),
            "tags": list(self.tags),
            "properties": copy.deepcopy(list(self.property_list)),
        }
        created_at = self.front_matter["model"].get("created_at")
        if created_at is not None:
            out["created_at"] = str(created_at)
        return out

    def to_schema_result(self) -> dict[str, Any]:
        """The `result` of `models/schema?model=<name>` (contract §4.2)."""
        return {"input": copy.deepcopy(self.input_schema), "output": copy.deepcopy(self.output_schema)}


# --- YAML ----------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML where mapping keys stay the text written (account `00123` stays "00123", not 83)
    and a duplicated key is an error instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(None, None, "mapping keys must be scalars", key_node.start_mark)
            key = key_node.value
            if key in mapping:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def _load_yaml(text: str, err: _Err, fld: str | None) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split()).replace('in "<unicode string>", ', "at ")
        raise err(fld, "invalid YAML: " + detail) from None


# --- field checks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Err:
    source: str

    def __call__(self, fld: str | None, problem: str) -> CardError:
        return CardError(self.source, fld, problem)


def _mapping(value: Any, err: _Err, fld: str, *, optional: bool = False) -> dict[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise err(fld, f"expected a mapping, got {_show(value)}")
    return value


def _string(value: Any, err: _Err, fld: str, *, default: str | None = None, nonempty: bool = False) -> str:
    if value is None:
        if default is None:
            raise err(fld, "missing")
        return default
    if not isinstance(value, str):
        raise err(fld, f"expected a string, got {_show(value)}")
    if nonempty and not value.strip():
        raise err(fld, "must not be empty")
    return value


def _positive_int(value: Any, err: _Err, fld: str) -> int:
    """An int > 0, written as a YAML integer or a string of decimal digits (property values are strings)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise err(fld, f"expected a positive integer, got {_show(value)}")
    if value <= 0:
        raise err(fld, f"expected a positive integer, got {value}")
    return value


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- parsing -------------------------------------------------------------------------------------


def _split_front_matter(text: str, err: _Err) -> str:
    lines = text.removeprefix("\ufeff").splitlines()
    if not lines or lines[0].rstrip() != "---":
        raise err("front matter", "the card must start with a '---' line")
    for i, line in enumerate(lines[1:], start=1):
        if line.rstrip() == "---":
            return "\n" + "\n".join(lines[1:i])  # leading newline: YAML line numbers = file lines
    raise err("front matter", "no closing '---' line")


def _properties(raw: Any, err: _Err) -> tuple[dict[str, Any], tuple[dict[str, Any], ...]]:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise err("model.properties", f"expected a list, got {_show(raw)}")
    props: dict[str, Any] = {}
    for i, item in enumerate(raw):
        fld = f"model.properties[{i}]"
        item = _mapping(item, err, fld)
        pid = _string(item.get("property_id"), err, fld + ".property_id", nonempty=True)
        if "value" not in item:
            raise err(f"model.properties[{pid}]", "missing 'value'")
        if pid in props:
            raise err(f"model.properties[{pid}]", "duplicate property_id")
        props[pid] = item["value"]
    return props, tuple(copy.deepcopy(raw))


def _policy(cfg: dict[str, Any], err: _Err) -> ServingPolicy:
    base = "model.properties[constellation_config]"

    cache = cfg.get("infer_response_cache")
    if cache is False:  # YAML 1.1 reads `off` / `no` as false
        cache = None
    if cache is not None:
        cache = _string(cache, err, base + ".infer_response_cache", nonempty=True).strip()

    rpm = _mapping(cfg.get("max_requests_per_min"), err, base + ".max_requests_per_min", optional=True)
    rpm_fld = base + ".max_requests_per_min"
    default_rpm = None
    if rpm.get("default") is not None:
        default_rpm = _positive_int(rpm["default"], err, rpm_fld + ".default")
    accounts_raw = _mapping(rpm.get("accounts"), err, rpm_fld + ".accounts", optional=True)
    accounts = {str(acct): _positive_int(n, err, f"{rpm_fld}.accounts.{acct}") for acct, n in accounts_raw.items()}

    neurons = _mapping(cfg.get("neurons"), err, base + ".neurons", optional=True)
    metrics = neurons.get("metrics") or []
    if not isinstance(metrics, list):
        raise err(base + ".neurons.metrics", f"expected a list, got {_show(metrics)}")
    costs: list[NeuronCost] = []
    for i, m in enumerate(metrics):
        fld = f"{base}.neurons.metrics[{i}]"
        m = _mapping(m, err, fld)
        name = _string(m.get("name"), err, fld + ".name", nonempty=True)
        if name not in KNOWN_NEURON_METRICS:
            known = ", ".join(KNOWN_NEURON_METRICS)
            raise err(fld + ".name", f"unknown neuron metric {name!r} (known: {known})")
        if any(c.metric == name for c in costs):
            raise err(fld + ".name", f"duplicate neuron metric {name!r}")
        cost = m.get("neuron_cost")
        if isinstance(cost, bool) or not isinstance(cost, int | float) or not math.isfinite(cost) or cost < 0:
            raise err(fld + ".neuron_cost", f"expected a non-negative number, got {_show(cost)}")
        costs.append(NeuronCost(name, float(cost)))

    return ServingPolicy(cache, RateLimit(default_rpm, accounts), tuple(costs))


def _schema(raw: Any, err: _Err, fld: str) -> dict[str, Any]:
    if raw is None:
        raise err(fld, "missing")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise err(fld, f"invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise err(fld, f"expected a JSON object, got {_show(raw)}")
    try:
        jsonschema.validators.validator_for(raw).check_schema(raw)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise err(fld, f"not a valid JSON Schema at {path}: {e.message}") from None
    return raw


def _schema_branches(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The schema and its direct oneOf/anyOf/allOf branches (where `max_tokens` is declared)."""
    yield schema
    for key in ("oneOf", "anyOf", "allOf"):
        for branch in schema.get(key) or []:
            if isinstance(branch, dict):
                yield branch


def _default_max_tokens(schema: dict[str, Any], seq_limit: int, err: _Err) -> int:
    fld = "json_schema.input.properties.max_tokens.default"
    found: set[int] = set()
    for branch in _schema_branches(schema):
        spec = (branch.get("properties") or {}).get("max_tokens")
        if isinstance(spec, dict) and "default" in spec:
            value = spec["default"]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise err(fld, f"expected a positive integer, got {_show(value)}")
            found.add(value)
    if len(found) > 1:
        raise err(fld, f"branches disagree: {sorted(found)}")
    if not found:
        return min(DEFAULT_MAX_TOKENS, seq_limit)
    value = found.pop()
    if value > seq_limit:
        raise err(fld, f"{value} exceeds sequence_length_limit {seq_limit}")
    return value


def parse_card(text: str, source: str) -> ModelCard:
    """Parse and validate a card; `source` (usually the file path) is only used in error messages."""
    err = _Err(source)
    fm = _mapping(_load_yaml(_split_front_matter(text, err), err, "front matter"), err, "front matter")
    model = _mapping(fm.get("model"), err, "model")

    name = _string(model.get("name"), err, "model.name", nonempty=True)
    if re.search(r"\s", name):
        raise err("model.name", f"must not contain whitespace, got {name!r}")
    src = model.get("source", 2 if name.startswith("@hf/") else 1)
    if isinstance(src, bool) or not isinstance(src, int):
        raise err("model.source", f"expected an integer, got {_show(src)}")
    task_raw = _mapping(model.get("task"), err, "model.task")
    task = Task(
        id=_string(task_raw.get("id"), err, "model.task.id", default=""),
        name=_string(task_raw.get("name"), err, "model.task.name", nonempty=True),
        description=_string(task_raw.get("description"), err, "model.task.description", default=""),
    )
    tags = model.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise err("model.tags", f"expected a list of strings, got {_show(tags)}")

    props, prop_list = _properties(model.get("properties"), err)
    ctx_fld, seq_fld = "model.properties[context_length_limit]", "model.properties[sequence_length_limit]"
    if "context_length_limit" not in props:
        raise err(ctx_fld, "missing")
    ctx = _positive_int(props["context_length_limit"], err, ctx_fld)
    seq = _positive_int(props.get("sequence_length_limit", ctx), err, seq_fld)
    if seq > ctx:
        raise err(seq_fld, f"{seq} exceeds context_length_limit {ctx}")

    cfg_fld = "model.properties[constellation_config]"
    cfg_raw = props.get("constellation_config")
    if isinstance(cfg_raw, str):
        cfg_raw = _load_yaml(cfg_raw, err, cfg_fld)
    cfg = _mapping(cfg_raw, err, cfg_fld, optional=True)
    policy = _policy(cfg, err)
    mcr = cfg.get("max_concurrent_requests")
    if mcr is None:
        mcr = DEFAULT_MAX_CONCURRENT_REQUESTS
    mcr = _positive_int(mcr, err, cfg_fld + ".max_concurrent_requests")

    schemas = _mapping(fm.get("json_schema"), err, "json_schema")
    input_schema = _schema(schemas.get("input"), err, "json_schema.input")
    output_schema = _schema(schemas.get("output"), err, "json_schema.output")

    return ModelCard(
        source_path=source,
        id=_string(model.get("id"), err, "model.id", default=str(uuid.uuid5(uuid.NAMESPACE_URL, name))),
        source=src,
        name=name,
        description=_string(model.get("description"), err, "model.description", default=""),
        task=task,
        tags=tuple(tags),
        properties=props,
        property_list=prop_list,
        context_length_limit=ctx,
        sequence_length_limit=seq,
        max_concurrent_requests=mcr,
        default_max_tokens=_default_max_tokens(input_schema, seq, err),
        input_schema=input_schema,
        output_schema=output_schema,
        policy=policy,
        constellation_config=cfg,
        display_name=_string(fm.get("model_display_name"), err, "model_display_name", default=name.split("/")[-1]),
        front_matter=fm,
    )


def load_card(path: Path) -> ModelCard:
    """Read (UTF-8) and parse a card file; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(str(path), None, f"cannot read: {e}") from None
    return parse_card(text, str(path))


def builtin_cards() -> list[ModelCard]:
    """The cards shipped in `int8serve/catalog/cards/*.txt`, sorted by file name."""
    folder = resources.files(__package__).joinpath("cards")
    entries = sorted((e for e in folder.iterdir() if e.name.endswith(".txt")), key=lambda e: e.name)
    return [parse_card(e.read_text(encoding="utf-8"), str(e)) for e in entries]
