"""Parse a Workers AI catalog entry ("card") into a typed, validated `ModelCard`.

A card is the model's single source of truth: its id and name, its limits, its request/response
JSON Schemas and its serving policy (response cache, requests-per-minute quota, neuron metering).
The format is the one of Cloudflare's catalog (see the built-in card in `cards/`):

* YAML front matter between two `---` lines; anything after the closing line is ignored; YAML aliases (`*name`)
  are refused (nested ones make a "billion laughs");
* `model.properties` is a list of `{property_id, value}` with string values;
* the `constellation_config` property value is itself YAML;
* `json_schema.input` / `json_schema.output` are JSON strings (a YAML mapping is accepted too).

Everything is checked once, at load time, by the pydantic models below. A malformed card raises
`CardError`, naming the source and the field (pydantic's location; a property by its id), e.g. ``card x.txt:
field 'model.properties[context_length_limit]': Input should be a valid integer, got 'abc'``.

Required: `model.name`, `model.task.name`, `model.properties[context_length_limit]`,
`json_schema.input`, `json_schema.output`. Defaults for everything else (a key with no
value counts as absent):

* `model.id`: a UUID5 of the name; `model.source`: 2 for `@hf/` names, else 1;
  `model.description`: ""; `model.task.id` / `.description`: ""; `model.tags`: [];
* `sequence_length_limit`: the context length limit;
* `prompt_template` (the chat template that renders `prompt` and `messages`, as Workers AI's catalog names it in
  `preProcessingArgs.promptTemplate`): `llama2`, the seed's (its card names none). Which names exist is the
  server's business (`int8serve/prompt_templates.py`), not the card's: a card naming another is parsed, and refused
  when it is served;
* `default_context` (the system prompt of a `prompt`-mode request, Workers AI's `preProcessingArgs.defaultContext`):
  None, the template's own (for `llama2`, Workers AI's `chatDefaultContext`); "" means none;
* `default_max_tokens` (the input schema's `max_tokens.default`): min(256, sequence_length_limit);
* no `constellation_config`, or keys missing from it: no response cache, no requests-per-minute
  limit (`rpm_for` returns None), no neuron metering (0 neurons), `max_concurrent_requests` 1;
  `infer_response_cache: off` (YAML false) also means no cache.
* a `constellation_config` key it does not know: a typing mistake of a known one (`max_request_per_min`,
  `neuron`, `defualt`: one or two edits away) is an error that names the known one ("did you mean ..."), since
  ignoring it would turn rate limiting or billing off; any other is ignored with one log warning (it may be a key
  of a newer Cloudflare catalog).

Integers may be written as YAML integers or as strings of digits ("2048"); anything else, and any
zero or negative limit, is an error. Neuron metrics must be one of `KNOWN_NEURON_METRICS`.

The schemas are checked as what requests will meet: every `$ref` resolves within the schema itself (nothing is
ever fetched), every `default` is valid under the schema that declares it, and the default of a sampling parameter
(`sampling.WORKERS_AI_PARAMETERS`: `temperature`, `top_p`, ...) is a value a request may send, within the range
Workers AI's and the card's declarations give together.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import re
import reprlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self, TypeVar, get_args

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, model_validator

from int8serve.catalog.sampling import sampling_parameters, schema_branches

__all__ = ["DEFAULT_PROMPT_TEMPLATE", "KNOWN_NEURON_METRICS", "CardError", "ModelCard", "NeuronCost", "RateLimit",
           "ServingPolicy", "Task", "builtin_cards", "load_card", "parse_card"]

log = logging.getLogger(__name__)

NeuronMetricName = Literal["input_tokens", "output_tokens"]
KNOWN_NEURON_METRICS: tuple[str, ...] = get_args(NeuronMetricName)
DEFAULT_MAX_TOKENS = 256  # Workers AI's documented default when a schema has none
DEFAULT_PROMPT_TEMPLATE = "llama2"  # Workers AI's template for the seed's model, whose card names none


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
        """Σ count × cost over the card's metrics, in decimal arithmetic on the prices as written, rounded half up
        to 6 decimals (2 × 0.1234567 + 1 × 1.7000001 = 1.9469135 → 1.946914, where binary floats and `round` went
        either way); 0.0 when the card meters nothing. The header, the stream's frame, the ledger and `/ai/usage`
        all carry this value."""
        counts = {"input_tokens": input_tokens, "output_tokens": output_tokens}
        for name, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
        exact = sum((counts[c.metric] * _as_written(c.cost) for c in self.neuron_costs), Decimal(0))
        return float(exact.quantize(NEURON_QUANTUM, rounding=ROUND_HALF_UP))


NEURON_QUANTUM = Decimal("0.000001")  # neurons are billed to 6 decimals


def _as_written(price: float) -> Decimal:
    """A price as the card wrote it: the shortest decimal that reads back as the float YAML parsed, which is the
    text itself for any price of up to 15 significant digits (`Decimal(0.1234567)` would be the binary value,
    0.12345670000000000332...)."""
    return Decimal(repr(price))


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
    property_list: tuple[dict[str, Any], ...]  # the list as written, in order
    context_length_limit: int  # prompt tokens + generated tokens
    sequence_length_limit: int  # generated tokens (max_tokens cap)
    max_concurrent_requests: int
    default_max_tokens: int
    prompt_template: str  # the chat template's name, e.g. "llama2", "chatml"
    default_context: str | None  # the system prompt of `prompt` requests; None: the template's own, "": none
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    policy: ServingPolicy
    constellation_config: dict[str, Any]  # the keys the card sets, as validated
    display_name: str
    front_matter: dict[str, Any]  # the whole parsed front matter (title, layout, task_type, ...)

    @property
    def author(self) -> str:
        """The author segment of the name: `@cf/meta/llama-2-7b-chat-int8` → `meta`."""
        parts = self.name.split("/")
        if parts[0].startswith("@") and len(parts) >= 3:
            return parts[1]
        return parts[0] if len(parts) >= 2 else ""

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (the request worker process gets the served cards): the cached validator is made again."""
        return {k: v for k, v in self.__dict__.items() if k != "input_validator"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @cached_property
    def input_validator(self) -> jsonschema.protocols.Validator:
        """A `jsonschema` validator for request bodies (the card's own input schema). Its registry retrieves
        nothing: a `$ref` resolves within the schema (checked at load) or to a bundled meta-schema, never over the
        network (jsonschema's default would fetch a remote `$ref` at every request)."""
        return jsonschema.validators.validator_for(self.input_schema)(self.input_schema, registry=_NO_RETRIEVAL)

    def to_search_result(self) -> dict[str, Any]:
        """One element of `models/search`'s `result` array."""
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
        """The `result` of `models/schema?model=<name>`."""
        return {"input": copy.deepcopy(self.input_schema), "output": copy.deepcopy(self.output_schema)}


# --- YAML ----------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML where mapping keys stay the text written (account `00123` stays "00123", not 83),
    a duplicated key is an error instead of silently keeping the last one, and an alias (`*name`) is an error:
    nested aliases let a 1 KB card expand to gigabytes (a "billion laughs"), and no card needs one."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases are not allowed in a card (*{event.anchor})",
                                              event.start_mark)
        return super().compose_node(parent, index)

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


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split()).replace('in "<unicode string>", ', "at ")
        raise ValueError(f"invalid YAML: {detail}") from None


# --- field types ---------------------------------------------------------------------------------


class _Invalid(ValueError):
    """A problem with part of the value being validated: `at` continues pydantic's location (a list index...)."""

    def __init__(self, problem: str, *at: str | int) -> None:
        super().__init__(problem)
        self.at = at


def _digits_as_int(value: Any) -> Any:
    """Property values are strings: "2048" is the integer 2048."""
    return int(value) if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value) else value


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _one_word(name: str) -> str:
    if re.search(r"\s", name):
        raise ValueError(f"must not contain whitespace, got {name!r}")
    return name


def _yaml_mapping(value: Any) -> Any:
    """The `constellation_config` value is YAML text (a mapping written in place works too); empty = no keys."""
    value = _load_yaml(value) if isinstance(value, str) else value
    return {} if value is None else value


def _json_schema(value: Any) -> Any:
    """A JSON Schema, written as a JSON string (or a YAML mapping); `check_schema` says whether it is one, and every
    `$ref` in it must resolve within it."""
    try:
        value = json.loads(value) if isinstance(value, str) else value
        if isinstance(value, dict):
            jsonschema.validators.validator_for(value).check_schema(value)
            _check_refs(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e}") from None
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"not a valid JSON Schema at {path}: {e.message}") from None
    return value


_NO_RETRIEVAL = referencing.Registry()  # retrieves nothing: an unknown URI is unresolvable, never fetched
_SCHEMA_KEYWORDS = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
                    "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema")
_SCHEMA_LIST_KEYWORDS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "definitions", "$defs", "dependentSchemas",
                        "dependencies")
_REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")


def _children(schema: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], dict[str, Any]]]:
    """The schema objects directly inside `schema`, each with its path from it, found through the keywords that hold
    schemas (so a `default` or an `enum` value that looks like a schema is not one)."""
    for key in _SCHEMA_KEYWORDS:
        if isinstance(schema.get(key), dict):
            yield (key,), schema[key]
    for key in _SCHEMA_LIST_KEYWORDS:
        if isinstance(schema.get(key), list):
            yield from (((key, i), sub) for i, sub in enumerate(schema[key]) if isinstance(sub, dict))
    for key in _SCHEMA_MAP_KEYWORDS:
        if isinstance(schema.get(key), dict):
            yield from (((key, name), sub) for name, sub in schema[key].items() if isinstance(sub, dict))


def _check_refs(schema: dict[str, Any]) -> None:
    """Every `$ref` resolves within `schema` itself: no other document, nothing fetched (a remote `$ref` would
    make the server open a connection per request, an unresolvable one fail every request)."""
    validator = jsonschema.validators.validator_for(schema)
    specification = referencing.jsonschema.specification_with(validator.ID_OF(validator.META_SCHEMA))

    def check(sub: dict[str, Any], path: tuple[str | int, ...], resolver: referencing.Resolver) -> None:
        resolver = resolver.in_subresource(specification.create_resource(sub))  # a nested `$id` moves the base
        for key in _REF_KEYWORDS:
            ref = sub.get(key)
            if not isinstance(ref, str):
                continue
            try:
                resolver.lookup(ref)
            except referencing.exceptions.Unresolvable:
                where = "/".join(str(p) for p in path) or "(root)"
                raise ValueError(f"{key} {ref!r} at {where} does not resolve within the schema (a card's schema "
                                 "may refer only to itself)") from None
        for step, child in _children(sub):
            check(child, (*path, *step), resolver)

    check(schema, (), _NO_RETRIEVAL.resolver_with_root(specification.create_resource(schema)))


def _check_defaults(schema: dict[str, Any]) -> None:
    """Every `default` in `schema` is valid under the schema object that declares it (a request that leaves the
    property out gets the default, which the schema never sees). Raises ValueError, saying where."""
    validator = jsonschema.validators.validator_for(schema)(schema, registry=_NO_RETRIEVAL)

    def check(sub: dict[str, Any], path: tuple[str | int, ...]) -> None:
        if "default" in sub:
            error = jsonschema.exceptions.best_match(validator.evolve(schema=sub).iter_errors(sub["default"]))
            if error is not None:
                where = "/".join(str(p) for p in path) or "(root)"
                raise ValueError(f"default {reprlib.repr(sub['default'])} at {where} is not valid under its own "
                                 f"schema: {error.message}")
        for step, child in _children(sub):
            check(child, (*path, *step))

    check(schema, ())


def _unique(key: str, *below: str) -> AfterValidator:
    """For a list of models: no two items with the same `key` (a repeat is reported at its index, then `below`)."""

    def check(items: list[Any]) -> list[Any]:
        keys = [getattr(item, key) for item in items]
        for i, value in enumerate(keys):
            if value in keys[:i]:
                raise _Invalid(f"duplicate {key} {value!r}", i, *below)
        return items
    return AfterValidator(check)


# A card's rate limits and concurrency at most a billion: the rate limiter in Redis counts in Lua doubles (serve's
# --rpm has the same bound), and a larger value is no limit anyone means.
MAX_CARD_LIMIT = 10**9
Limit = Annotated[int, Field(gt=0, le=MAX_CARD_LIMIT), BeforeValidator(_digits_as_int)]  # a YAML integer or digits
Text = Annotated[str, AfterValidator(_not_blank)]
ModelName = Annotated[Text, AfterValidator(_one_word)]
JsonSchema = Annotated[dict[str, Any], BeforeValidator(_json_schema)]


# --- the card's models ---------------------------------------------------------------------------


class _Section(BaseModel, strict=True):
    """A mapping of the card: strict types (no "1" for 1 unless the type says so); unknown keys are ignored (but see
    `_PolicySection`)."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class TaskSection(_Section):
    id: str = ""
    name: Text
    description: str = ""


class Property(_Section, extra="allow"):
    """One `model.properties` item as written; `CardProperties` types the values the server reads."""

    property_id: Text
    value: Any


class ModelSection(_Section):
    name: ModelName
    id: str | None = None  # default: a UUID5 of the name
    source: int | None = None  # default: 2 for `@hf/` names, else 1
    description: str = ""
    task: TaskSection
    tags: list[str] = []
    properties: Annotated[list[Property], _unique("property_id")] = []

    @model_validator(mode="after")
    def _defaults_from_name(self) -> Self:
        if self.id is None:
            self.id = str(uuid.uuid5(uuid.NAMESPACE_URL, self.name))
        if self.source is None:
            self.source = 2 if self.name.startswith("@hf/") else 1
        return self


class JsonSchemas(_Section):
    input: JsonSchema
    output: JsonSchema


class CardFrontMatter(_Section, protected_namespaces=()):  # `model_display_name` is the card's, not pydantic's
    """The front matter; its other keys (title, layout, task_type, ...) stay in `ModelCard.front_matter`."""

    model: ModelSection
    json_schema: JsonSchemas
    model_display_name: str | None = None  # default: the last segment of the name


class _PolicySection(_Section, extra="allow"):
    """A mapping of `constellation_config`. A key that is one or two typing mistakes away from a known one is
    refused, naming it: ignored, `max_request_per_min` or `neuron` would turn rate limiting or billing off. Other
    unknown keys (a newer catalog's) are kept in `model_extra` and reported by `_warn_unknown_keys`."""

    @model_validator(mode="before")
    @classmethod
    def _no_misspelled_keys(cls, data: Any) -> Any:
        for key in data if isinstance(data, dict) else ():
            if key not in cls.model_fields and isinstance(key, str):
                known = _misspelled(key, cls.model_fields)
                if known is not None:
                    raise _Invalid(f"unknown key; did you mean '{known}'?", key)
        return data


def _misspelled(key: str, known: Iterable[str]) -> str | None:
    """The known key that `key` is a typing mistake of, if any: at most one edit (a letter added, dropped, changed or
    two swapped) for a name of up to 15 characters, two for a longer one. `difflib` ranks the candidates."""
    for name in difflib.get_close_matches(key, list(known), n=3, cutoff=0.6):
        if _edits(key, name) <= (1 if len(name) <= 15 else 2):
            return name
    return None


def _edits(a: str, b: str) -> int:
    """The optimal-string-alignment distance: insertions, deletions, substitutions and adjacent swaps."""
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, start=1):
        row = [i]
        for j, cb in enumerate(b, start=1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


class RequestsPerMinute(_PolicySection):
    default: Limit | None = None  # None: unlimited
    accounts: dict[str, Limit] = {}


class NeuronMetric(_PolicySection):
    name: NeuronMetricName
    neuron_cost: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Neurons(_PolicySection):
    metrics: Annotated[list[NeuronMetric], _unique("name", "name")] = []


class ConstellationConfig(_PolicySection):
    """The YAML inside the `constellation_config` property: the serving policy and the engine's slots."""

    # YAML 1.1 reads `off` / `no` as false: no cache
    infer_response_cache: Annotated[Text | None, BeforeValidator(lambda v: None if v is False else v)] = None
    max_requests_per_min: RequestsPerMinute = RequestsPerMinute()
    neurons: Neurons = Neurons()
    max_concurrent_requests: Limit = 1

    def policy(self) -> ServingPolicy:
        rpm = self.max_requests_per_min
        costs = tuple(NeuronCost(m.name, m.neuron_cost) for m in self.neurons.metrics)
        return ServingPolicy(self.infer_response_cache, RateLimit(rpm.default, dict(rpm.accounts)), costs)


class CardProperties(_Section):
    """The property values the server reads, by property_id."""

    context_length_limit: Limit
    sequence_length_limit: Limit | None = None  # default: the context length limit
    prompt_template: ModelName = DEFAULT_PROMPT_TEMPLATE
    default_context: str | None = None
    constellation_config: Annotated[ConstellationConfig, BeforeValidator(_yaml_mapping)] = ConstellationConfig()

    @model_validator(mode="after")
    def _sequence_within_context(self) -> Self:
        ctx, seq = self.context_length_limit, self.sequence_length_limit
        if seq is None:
            self.sequence_length_limit = ctx
        elif seq > ctx:
            raise _Invalid(f"{seq} exceeds context_length_limit {ctx}", "sequence_length_limit")
        return self


# --- parsing -------------------------------------------------------------------------------------

_M = TypeVar("_M", bound=BaseModel)
_MESSAGES = {"model_type": "Input should be a mapping"}  # pydantic's own names our class, which means nothing in YAML


def _validated(model: type[_M], data: Any, source: str, front_matter: Any, under: tuple[str, ...] = ()) -> _M:
    """`model` validated from `data` (found at `under` in the front matter), else its first error as a `CardError`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
    cause = error.get("ctx", {}).get("error")  # the ValueError one of our validators raised, if any
    if cause is not None:
        problem = str(cause)
    elif error["type"] == "missing":
        problem = error["msg"]
    else:
        problem = f"{_MESSAGES.get(error['type'], error['msg'])}, got {reprlib.repr(error['input'])}"
    loc = (*under, *error["loc"], *getattr(cause, "at", ()))
    raise CardError(source, _field_path(loc, front_matter), problem)


def _field_path(loc: tuple[str | int, ...], front_matter: Any) -> str:
    """pydantic's location as a field path, `a.b[0].c`, naming a property by its id: `model.properties[info].value`."""
    if loc[:2] == ("model", "properties") and len(loc) > 2:
        loc = ("model", f"properties[{_property_id(front_matter, loc[2])}]", *loc[3:])
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).removeprefix(".") or "front matter"


def _property_id(front_matter: Any, key: str | int) -> str | int:
    """The id of the property at index `key` of `model.properties`, if it has one."""
    try:
        property_id = front_matter["model"]["properties"][key]["property_id"]
    except (LookupError, TypeError):
        return key
    return property_id if isinstance(property_id, str) and property_id.strip() else key


def _front_matter(text: str, source: str) -> Any:
    """The YAML between the opening and the closing `---` line, parsed."""
    lines = text.removeprefix("\ufeff").splitlines()
    if not lines or lines[0].rstrip() != "---":
        raise CardError(source, "front matter", "the card must start with a '---' line")
    end = next((i for i, line in enumerate(lines[1:], start=1) if line.rstrip() == "---"), None)
    if end is None:
        raise CardError(source, "front matter", "no closing '---' line")
    try:
        return _load_yaml("\n" + "\n".join(lines[1:end]))  # leading newline: YAML line numbers = file lines
    except ValueError as e:
        raise CardError(source, "front matter", str(e)) from None


def _default_max_tokens(schema: dict[str, Any], seq_limit: int, source: str) -> int:
    """The input schema's `max_tokens.default` (at the top or in direct oneOf/anyOf/allOf branches, the same in
    all), else min(256, `seq_limit`)."""
    fld = "json_schema.input.properties.max_tokens.default"
    branches = (b for key in ("oneOf", "anyOf", "allOf") for b in schema.get(key) or [] if isinstance(b, dict))
    found: set[int] = set()
    for branch in (schema, *branches):
        spec = (branch.get("properties") or {}).get("max_tokens")
        if isinstance(spec, dict) and "default" in spec:
            value = spec["default"]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CardError(source, fld, f"expected a positive integer, got {reprlib.repr(value)}")
            found.add(value)
    if len(found) > 1:
        raise CardError(source, fld, f"branches disagree: {sorted(found)}")
    value = found.pop() if found else min(DEFAULT_MAX_TOKENS, seq_limit)
    if value > seq_limit:
        raise CardError(source, fld, f"{value} exceeds sequence_length_limit {seq_limit}")
    return value


_warned: set[tuple[str, tuple[str, ...]]] = set()


def _warn_unknown_keys(config: ConstellationConfig, source: str) -> None:
    """One log warning per card (once per process) naming the `constellation_config` keys it does not know, which
    are ignored: they may be a newer catalog's, so they do not stop the start."""
    sections: list[tuple[str, BaseModel]] = [("", config), ("max_requests_per_min.", config.max_requests_per_min),
                                             ("neurons.", config.neurons)]
    sections += [(f"neurons.metrics[{i}].", m) for i, m in enumerate(config.neurons.metrics)]
    unknown = tuple(f"{prefix}{key}" for prefix, section in sections for key in section.model_extra or {})
    if unknown and (source, unknown) not in _warned:
        _warned.add((source, unknown))
        log.warning("card %s: field 'model.properties[constellation_config]': unknown key%s ignored (not read by this "
                    "version of int8serve): %s", source, "s" if len(unknown) > 1 else "", ", ".join(unknown))


def _check_sampling_defaults(schema: dict[str, Any], source: str) -> None:
    """A sampling parameter's default, wherever the schema declares one, is what a request may send: a number (an
    integer for an integer parameter) within the range Workers AI's and the card's declarations give together (a
    request that leaves the parameter out gets it unchecked)."""
    merged = sampling_parameters(schema)
    for path, branch in schema_branches(schema):
        properties = branch.get("properties")
        for name, spec in (properties.items() if isinstance(properties, dict) else ()):
            if name not in merged or not isinstance(spec, dict) or "default" not in spec:
                continue
            problem = _out_of_range(spec["default"], merged[name])
            if problem:
                fld = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
                raise CardError(source, f"json_schema.input{fld}.properties.{name}.default", problem)


def _out_of_range(value: Any, spec: dict[str, Any]) -> str | None:
    """Why `value` is not a valid value of the sampling parameter `spec`, as a request's would be refused; None if
    it is one."""
    integer = spec.get("type") == "integer"
    low, high = spec.get("minimum", float("-inf")), spec.get("maximum", float("inf"))
    numeric = not isinstance(value, bool) and isinstance(value, int | float)
    whole = isinstance(value, int) or (numeric and float(value).is_integer())  # (an int of 400 digits has no float)
    if numeric and (not integer or whole) and low <= value <= high:
        return None
    return f"expected {'an integer' if integer else 'a number'} from {low} to {high}, got {reprlib.repr(value)}"


def parse_card(text: str, source: str) -> ModelCard:
    """Parse and validate a card; `source` (usually the file path) is only used in error messages."""
    raw = _front_matter(text, source)
    front = _validated(CardFrontMatter, raw, source, raw)
    model, schemas = front.model, front.json_schema
    values = {p.property_id: p.value for p in model.properties}
    props = _validated(CardProperties, values, source, raw, under=("model", "properties"))
    config = props.constellation_config
    default_max_tokens = _default_max_tokens(schemas.input, props.sequence_length_limit, source)
    _warn_unknown_keys(config, source)
    _check_sampling_defaults(schemas.input, source)
    for name, schema in (("input", schemas.input), ("output", schemas.output)):
        try:
            _check_defaults(schema)
        except ValueError as e:
            raise CardError(source, f"json_schema.{name}", str(e)) from None
    return ModelCard(
        source_path=source,
        id=model.id,
        source=model.source,
        name=model.name,
        description=model.description,
        task=Task(**model.task.model_dump()),
        tags=tuple(model.tags),
        properties=values,
        property_list=tuple(p.model_dump() for p in model.properties),
        context_length_limit=props.context_length_limit,
        sequence_length_limit=props.sequence_length_limit,
        max_concurrent_requests=config.max_concurrent_requests,
        default_max_tokens=default_max_tokens,
        prompt_template=props.prompt_template,
        default_context=props.default_context,
        input_schema=schemas.input,
        output_schema=schemas.output,
        policy=config.policy(),
        constellation_config=config.model_dump(exclude_unset=True),
        display_name=model.name.split("/")[-1] if front.model_display_name is None else front.model_display_name,
        front_matter=raw,
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
