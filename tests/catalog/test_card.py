"""The built-in card is the seed verbatim, parses to the right typed values, and broken cards fail clearly."""

from __future__ import annotations

import dataclasses
import json
import logging
import reprlib
import uuid
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import referencing.exceptions

from int8serve.catalog.card import CardError, ModelCard, builtin_cards, load_card, parse_card

SHARED = Path(__file__).resolve().parents[3] / "shared"
SEED = SHARED / "seeds" / "000_ef2d276774d6e394.txt"
NAME = "@cf/meta/llama-2-7b-chat-int8"


@pytest.fixture(scope="module")
def seed_text() -> str:
    if not SEED.is_file():
        pytest.fail(f"the seed card is missing: {SEED} (tests need ../shared next to the project)")
    return SEED.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def card(seed_text: str) -> ModelCard:
    (seed,) = [card for card in builtin_cards() if card.name == NAME]
    return seed


def test_builtin_card_is_the_seed_byte_for_byte(seed_text: str) -> None:
    shipped = resources.files("int8serve.catalog").joinpath("cards", "llama-2-7b-chat-int8.txt")
    assert shipped.read_bytes() == SEED.read_bytes()


def test_identity_fields(card: ModelCard) -> None:
    assert card.id == "9c95c39d-45b3-4163-9631-22f0c0dc3b14"
    assert card.source == 1
    assert card.name == NAME
    assert card.description == "Quantized (int8) generative text model with 7 billion parameters from Meta"
    assert card.task.id == "c329a1f9-323d-4e91-b2aa-582dd4188d34"
    assert card.task.name == "Text Generation"
    assert card.task.description.startswith("Family of generative text models")
    assert card.tags == ("meta", "text-generation")
    assert card.author == "meta"
    assert card.display_name == "llama-2-7b-chat-int8"
    assert card.front_matter["title"] == "llama-2-7b-chat-int8"
    assert card.front_matter["task_type"] == "text-generation"
    assert card.source_path.endswith("llama-2-7b-chat-int8.txt")


def test_properties_raw(card: ModelCard) -> None:
    assert [p["property_id"] for p in card.property_list] == [
        "terms",
        "info",
        "context_length_limit",
        "sequence_length_limit",
        "constellation_config",
    ]
    assert all(isinstance(p["value"], str) for p in card.property_list)
    assert card.properties["terms"] == "https://ai.meta.com/resources/models-and-libraries/llama-downloads/"
    assert card.properties["info"] == "https://ai.meta.com/llama/"
    assert card.properties["context_length_limit"] == "2048"
    assert card.properties["constellation_config"].startswith("infer_response_cache: in_memory\n")


def test_typed_limits(card: ModelCard) -> None:
    assert card.context_length_limit == 2048
    assert card.sequence_length_limit == 1800
    assert card.max_concurrent_requests == 4
    assert card.default_max_tokens == 256
    for value in (card.context_length_limit, card.sequence_length_limit, card.max_concurrent_requests):
        assert type(value) is int


def test_policy(card: ModelCard) -> None:
    policy = card.policy
    assert policy.response_cache == "in_memory"
    assert policy.rate_limit.default_rpm == 5
    assert policy.rate_limit.accounts == {"32118455": 60, "50147400": 60, "48546443": 1000, "56599770": 1000}
    assert [(c.metric, c.cost) for c in policy.neuron_costs] == [("input_tokens", 0.1836), ("output_tokens", 0.1836)]


@pytest.mark.parametrize(
    ("account", "rpm"),
    [("32118455", 60), ("50147400", 60), ("48546443", 1000), ("56599770", 1000), ("11111111", 5), ("", 5)],
)
def test_rpm_for(card: ModelCard, account: str, rpm: int) -> None:
    assert card.policy.rpm_for(account) == rpm


def test_neurons(card: ModelCard) -> None:
    assert card.policy.neurons(100, 50) == pytest.approx(27.54)
    assert card.policy.neurons(100, 50) == 27.54  # rounded, no float noise
    assert card.policy.neurons(0, 0) == 0.0
    assert card.policy.neurons(1, 0) == pytest.approx(0.1836)
    assert card.policy.neurons(2048, 0) == pytest.approx(376.0128)
    with pytest.raises(ValueError, match="input_tokens"):
        card.policy.neurons(-1, 0)


def test_neurons_with_different_costs(seed_text: str) -> None:
    text = seed_text.replace(
        "name: output_tokens\\n      neuron_cost: 0.1836", "name: output_tokens\\n      neuron_cost: 1.5"
    )
    assert parse_card(text, "x").policy.neurons(10, 3) == pytest.approx(10 * 0.1836 + 3 * 1.5)


@pytest.mark.parametrize(
    ("prices", "tokens", "neurons"),
    [
        (("0.1234567", "1.7000001"), (2, 1), 1.946914),  # 1.9469135: binary floats and round() gave 1.946913
        (("0.1234567", "1.7000001"), (6, 13), 22.840742),  # 22.8407415
        (("0.0000005", "0"), (1, 0), 0.000001),  # half a millionth rounds up
        (("0.0000005", "0"), (3, 0), 0.000002),  # 0.0000015
        (("0.1836", "0.1836"), (100, 50), 27.54),
        (("0.00000049", "0"), (1, 0), 0.0),
    ],
)
def test_neurons_are_decimal_rounded_half_up(seed_text: str, prices: tuple[str, str], tokens: tuple[int, int],
                                             neurons: float) -> None:
    text = seed_text
    for metric, price in zip(("input_tokens", "output_tokens"), prices, strict=True):
        text = text.replace(f"{metric}\\n      neuron_cost: 0.1836", f"{metric}\\n      neuron_cost: {price}")
    policy = parse_card(text, "x").policy
    assert [str(c.cost) for c in policy.neuron_costs] == [str(float(p)) for p in prices]
    assert policy.neurons(*tokens) == neurons
    assert repr(policy.neurons(*tokens)) == repr(neurons)  # no float noise left for the frame's JSON


def test_schemas_are_parsed_and_valid(card: ModelCard) -> None:
    assert card.input_schema["type"] == "object"
    assert len(card.input_schema["oneOf"]) == 2
    assert card.input_schema["oneOf"][0]["properties"]["prompt"]["maxLength"] == 4096
    assert card.output_schema["oneOf"][1]["contentType"] == "text/event-stream"
    for schema in (card.input_schema, card.output_schema):
        jsonschema.validators.validator_for(schema).check_schema(schema)


def _errors(card: ModelCard, body: object) -> list[str]:
    return [e.message for e in card.input_validator.iter_errors(body)]


def test_input_schema_validation(card: ModelCard) -> None:
    assert _errors(card, {"prompt": "Tell me a story"}) == []
    assert _errors(card, {"prompt": "x" * 4096, "max_tokens": 10, "stream": True, "raw": False}) == []
    assert _errors(card, {"messages": [{"role": "user", "content": "hi"}]}) == []
    jsonschema.validate({"prompt": "hi"}, card.input_schema)  # the plain library call agrees

    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate({"prompt": "x" * 4097}, card.input_schema)
    assert info.value.validator == "maxLength"  # best_match picks the prompt branch's error
    assert list(info.value.absolute_path) == ["prompt"]
    (top,) = card.input_validator.iter_errors({"prompt": "x" * 4097})
    assert top.validator == "oneOf"
    assert any("is too long" in sub.message for sub in top.context)
    assert _errors(card, {"messages": [{"role": "user", "content": "x" * 4097}]}) != []

    both = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(both, card.input_schema)
    assert info.value.validator == "oneOf"

    assert _errors(card, {}) != []
    assert _errors(card, {"prompt": "hi", "max_tokens": "ten"}) != []
    assert _errors(card, {"messages": [{"role": "user"}]}) != []


def test_search_result(card: ModelCard) -> None:
    result = card.to_search_result()
    assert result == {
        "id": "9c95c39d-45b3-4163-9631-22f0c0dc3b14",
        "source": 1,
        "name": NAME,
        "description": card.description,
        "task": {
            "id": "c329a1f9-323d-4e91-b2aa-582dd4188d34",
            "name": "Text Generation",
            "description": card.task.description,
        },
        "tags": ["meta", "text-generation"],
        "properties": [dict(p) for p in card.property_list],
    }
    assert isinstance(result["properties"], list)
    result["properties"].clear()  # a copy: the card is untouched
    assert len(card.property_list) == 5


def test_schema_result(card: ModelCard) -> None:
    result = card.to_schema_result()
    assert result == {"input": card.input_schema, "output": card.output_schema}
    result["input"]["type"] = "array"
    assert card.input_schema["type"] == "object"


def test_parse_matches_load(seed_text: str, card: ModelCard) -> None:
    assert parse_card(seed_text, str(SEED)).to_search_result() == card.to_search_result()
    assert load_card(SEED).to_schema_result() == card.to_schema_result()


# --- defaults -----------------------------------------------------------------------------------

MINIMAL = """---
model:
  name: "@hf/someone/tiny-model"
  task:
    name: "Text Generation"
  properties:
    - property_id: "context_length_limit"
      value: "512"
json_schema:
  input: "{\\"type\\": \\"object\\"}"
  output: "{}"
---
"""


def test_minimal_card_defaults() -> None:
    card = parse_card(MINIMAL, "minimal.txt")
    assert card.id == str(uuid.uuid5(uuid.NAMESPACE_URL, "@hf/someone/tiny-model"))
    assert card.source == 2
    assert card.description == ""
    assert card.task == ("", "Text Generation", "")
    assert card.tags == ()
    assert card.author == "someone"
    assert card.display_name == "tiny-model"
    assert card.context_length_limit == 512
    assert card.sequence_length_limit == 512
    assert card.default_max_tokens == 256
    assert card.max_concurrent_requests == 1
    assert card.constellation_config == {}
    assert card.policy.response_cache is None
    assert card.policy.rpm_for("32118455") is None
    assert card.policy.neuron_costs == ()
    assert card.policy.neurons(1000, 1000) == 0.0


def test_default_max_tokens_is_capped_by_sequence_limit() -> None:
    text = MINIMAL.replace(
        'value: "512"', 'value: "512"\n    - property_id: "sequence_length_limit"\n      value: "100"'
    )
    assert parse_card(text, "x").default_max_tokens == 100


def test_account_ids_keep_their_text(seed_text: str) -> None:
    text = seed_text.replace("32118455: 60", "00123: 7").replace("50147400: 60", "'777': 8")
    card = parse_card(text, "x")
    assert card.policy.rpm_for("00123") == 7
    assert card.policy.rpm_for("777") == 8
    assert card.policy.rpm_for("83") == 5  # not the octal reading of 00123


def test_response_cache_off(seed_text: str) -> None:
    text = seed_text.replace("infer_response_cache: in_memory\\n", "")
    assert parse_card(text, "x").policy.response_cache is None
    text = seed_text.replace("infer_response_cache: in_memory", "infer_response_cache: off")
    assert parse_card(text, "x").policy.response_cache is None


def test_unquoted_integer_property_values_are_accepted(seed_text: str) -> None:
    assert parse_card(seed_text.replace('value: "2048"', "value: 2048"), "x").context_length_limit == 2048


# --- malformed cards -------------------------------------------------------------------------------

CONTEXT_PROP = '    - property_id: "context_length_limit"\n      value: "2048"\n'
CFG = "model.properties[constellation_config]"
METRICS = (
    "neurons:\\n  metrics:\\n    - name: input_tokens\\n      neuron_cost: 0.1836\\n"
    "    - name: output_tokens\\n      neuron_cost: 0.1836\\n"
)

BROKEN = [
    # (case id, old, new, field named in the message, another word the message must contain)
    ("no-front-matter", "---\nmodel:", "model:", "front matter", "---"),
    ("no-closing-line", '}"\n\n---\n', '}"\n\n', "front matter", "closing"),
    ("invalid-yaml", "  source: 1\n", "  source: [1\n", "front matter", "invalid YAML"),
    ("duplicate-yaml-key", "  source: 1\n", "  source: 1\n  source: 2\n", "front matter", "duplicate key"),
    ("missing-name", '  name: "@cf/meta/llama-2-7b-chat-int8"\n', "", "model.name", "required"),
    ("empty-name", '  name: "@cf/meta/llama-2-7b-chat-int8"', '  name: ""', "model.name", "empty"),
    ("name-not-string", '  name: "@cf/meta/llama-2-7b-chat-int8"', "  name: [1]", "model.name", "string"),
    ("source-not-int", "  source: 1\n", '  source: "one"\n', "model.source", "integer"),
    ("missing-task-name", '    name: "Text Generation"\n', "", "model.task.name", "required"),
    ("tags-not-list", '  tags:\n    - "meta"\n    - "text-generation"\n', '  tags: "meta"\n', "model.tags", "list"),
    ("properties-not-list", "  properties:\n", "  properties: 3\n  old_properties:\n", "model.properties", "list"),
    ("context-not-int", 'value: "2048"', 'value: "abc"', "model.properties[context_length_limit]", "'abc'"),
    ("context-float", 'value: "2048"', 'value: "2048.5"', "model.properties[context_length_limit]", "integer"),
    ("context-zero", 'value: "2048"', 'value: "0"', "model.properties[context_length_limit]", "greater than 0"),
    ("context-negative", 'value: "2048"', 'value: "-5"', "model.properties[context_length_limit]", "'-5'"),
    ("context-missing", CONTEXT_PROP, "", "model.properties[context_length_limit]", "required"),
    ("sequence-not-int", 'value: "1800"', 'value: "lots"', "model.properties[sequence_length_limit]", "'lots'"),
    ("sequence-zero", 'value: "1800"', 'value: "0"', "model.properties[sequence_length_limit]", "greater than 0"),
    ("sequence-over-context", 'value: "1800"', 'value: "4000"', "model.properties[sequence_length_limit]", "exceeds"),
    ("duplicate-property", CONTEXT_PROP, CONTEXT_PROP * 2, "model.properties[context_length_limit]", "duplicate"),
    ("property-without-id", '- property_id: "info"\n', "- info: x\n", "model.properties[1].property_id", "required"),
    ("config-bad-yaml", "infer_response_cache: in_memory", "infer_response_cache: [in_memory", CFG, "invalid YAML"),
    (
        "config-dup-key",
        "max_concurrent_requests: 4",
        "max_concurrent_requests: 4\\nmax_concurrent_requests: 5",
        CFG,
        "duplicate",
    ),
    (
        "config-cache-not-str",
        "infer_response_cache: in_memory",
        "infer_response_cache: [1]",
        CFG + ".infer_response_cache",
        "string",
    ),
    ("rpm-default-word", "default: 5", "default: five", CFG + ".max_requests_per_min.default", "'five'"),
    ("rpm-default-zero", "default: 5", "default: 0", CFG + ".max_requests_per_min.default", "greater than 0"),
    ("rpm-account-bad", "48546443: 1000", "48546443: many", CFG + ".max_requests_per_min.accounts.48546443", "'many'"),
    # beyond what the rate limiter counts in Redis (Lua doubles): 400 digits, then one above the bound
    ("rpm-default-400-digits", "default: 5", "default: 1" + "0" * 400, CFG + ".max_requests_per_min.default",
     "less than or equal to 1000000000"),
    ("rpm-account-huge", "48546443: 1000", "48546443: 1000000001", CFG + ".max_requests_per_min.accounts.48546443",
     "less than or equal to 1000000000"),
    ("concurrency-huge", "max_concurrent_requests: 4", "max_concurrent_requests: 99999999999",
     CFG + ".max_concurrent_requests", "less than or equal to 1000000000"),
    (
        "rpm-account-negative",
        "48546443: 1000",
        "48546443: -1",
        CFG + ".max_requests_per_min.accounts.48546443",
        "greater than 0, got -1",
    ),
    (
        "rpm-not-mapping",
        "max_requests_per_min:\\n  default: 5\\n  accounts:",
        "max_requests_per_min: 5\\nx:\\n  a:",
        CFG + ".max_requests_per_min",
        "mapping",
    ),
    ("unknown-metric", "name: output_tokens", "name: gpu_seconds", CFG + ".neurons.metrics[1].name", "gpu_seconds"),
    ("duplicate-metric", "name: output_tokens", "name: input_tokens", CFG + ".neurons.metrics[1].name", "duplicate"),
    (
        "negative-cost",
        "neuron_cost: 0.1836\\nmax",
        "neuron_cost: -0.1\\nmax",
        CFG + ".neurons.metrics[1].neuron_cost",
        "greater than or equal to 0",
    ),
    (
        "cost-not-number",
        "neuron_cost: 0.1836\\nmax",
        "neuron_cost: cheap\\nmax",
        CFG + ".neurons.metrics[1].neuron_cost",
        "'cheap'",
    ),
    ("metrics-not-list", METRICS, "neurons:\\n  metrics: 7\\n", CFG + ".neurons.metrics", "list"),
    (
        "concurrency-zero",
        "max_concurrent_requests: 4",
        "max_concurrent_requests: 0",
        CFG + ".max_concurrent_requests",
        "greater than 0",
    ),
    (
        "concurrency-word",
        "max_concurrent_requests: 4",
        "max_concurrent_requests: four",
        CFG + ".max_concurrent_requests",
        "'four'",
    ),
    ("input-bad-json", 'input: "{\\n', 'input: "{,\\n', "json_schema.input", "invalid JSON"),
    ("output-bad-json", 'output: "{\\n', 'output: "{,\\n', "json_schema.output", "invalid JSON"),
    ("input-bad-schema", '\\"type\\": \\"object\\"', '\\"type\\": \\"objekt\\"', "json_schema.input", "JSON Schema"),
    ("output-bad-schema", '\\"format\\": \\"binary\\"', '\\"format\\": 7', "json_schema.output", "JSON Schema"),
    ("input-missing", "  input: ", "  not_input: ", "json_schema.input", "required"),
    ("no-json-schema", "json_schema:\n", "not_json_schema:\n", "json_schema", "required"),
    (
        "max-tokens-default-str",
        '\\"default\\": 256',
        '\\"default\\": \\"256\\"',
        "json_schema.input.properties.max_tokens.default",
        "positive integer",
    ),
    (
        "max-tokens-over-sequence",
        '\\"default\\": 256',
        '\\"default\\": 1900',
        "json_schema.input.properties.max_tokens.default",
        "exceeds",
    ),
]


@pytest.mark.parametrize(("old", "new", "field", "word"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_malformed_card(seed_text: str, tmp_path: Path, old: str, new: str, field: str, word: str) -> None:
    assert old in seed_text, "the test edit no longer applies to the seed"
    path = tmp_path / "broken.txt"
    path.write_text(seed_text.replace(old, new), encoding="utf-8")
    with pytest.raises(CardError) as info:
        load_card(path)
    message = str(info.value)
    assert message.startswith(f"card {path}: field '{field}': "), message
    assert word in info.value.problem, message  # the problem itself, not the path (tmp_path holds the case id)
    assert info.value.source == str(path)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


PROMPT_SPEC = '\\"prompt\\": {\\n'


def _prompt_ref(seed_text: str, ref: str) -> str:
    """The seed with `"$ref": ref` beside the prompt's type (and a `definitions` the refs may point into)."""
    text = seed_text.replace(PROMPT_SPEC, PROMPT_SPEC.replace("{", f'{{\\"$ref\\": \\"{ref}\\", '), 1)
    return text.replace('\\"type\\": \\"object\\",', '\\"type\\": \\"object\\", \\"definitions\\": '
                        '{\\"short\\": {\\"maxLength\\": 10}},', 1)


@pytest.mark.parametrize(
    "ref",
    ["#/definitions/nope", "http://127.0.0.1:9/schema.json", "other.json#/definitions/short",
     "https://json-schema.org/draft/2020-12/schema"],
)
def test_a_ref_must_resolve_within_the_schema(seed_text: str, monkeypatch: pytest.MonkeyPatch, ref: str) -> None:
    """An unresolvable or remote `$ref` stops the start (it answered 500 to every request, the remote one after an
    outbound connection); nothing is fetched to find out."""
    fetched = _no_network(monkeypatch)
    with pytest.raises(CardError) as info:
        parse_card(_prompt_ref(seed_text, ref), "ref.txt")
    assert info.value.field == "json_schema.input"
    assert info.value.problem == (f"$ref {ref!r} at oneOf/0/properties/prompt does not resolve within the schema "
                                  "(a card's schema may refer only to itself)")
    assert fetched == []


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What jsonschema would fetch (`urllib.request.urlopen`), recorded instead (and not fetched)."""
    fetched: list[object] = []

    def urlopen(request: object, *args: object, **kwargs: object) -> None:
        fetched.append(request)
        raise OSError("no network in this test")
    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    return fetched


def test_a_ref_within_the_schema_is_served(seed_text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    card = parse_card(_prompt_ref(seed_text, "#/definitions/short"), "ref.txt")
    assert _errors(card, {"prompt": "Tell me"}) == []
    (error,) = card.input_validator.iter_errors({"prompt": "Tell me a story"})
    assert any(sub.message == "'Tell me a story' is too long" for sub in error.context)  # the definition applies
    nested = '{"type": "object", "properties": {"a": {"$id": "urn:x:a", "$defs": {"n": {"type": "integer"}}, ' \
             '"$ref": "#/$defs/n"}}}'
    card = parse_card(MINIMAL.replace('input: "{\\"type\\": \\"object\\"}"', f"input: '{nested}'"), "m.txt")
    assert _errors(card, {"a": 1}) == [] and _errors(card, {"a": "x"}) == ["'x' is not of type 'integer'"]
    # a remote $ref that reached the request validator (it cannot, the card is refused) is not fetched either
    fetched = _no_network(monkeypatch)
    remote = dataclasses.replace(card, input_schema={"properties": {"a": {"$ref": "http://127.0.0.1:9/s.json"}}})
    with pytest.raises(referencing.exceptions.Unresolvable):
        _errors(remote, {"a": 1})
    assert fetched == []


MAX_TOKENS_SPEC = '\\"max_tokens\\": {'


def _with_property(seed_text: str, name: str, spec: str) -> str:
    """The seed with the property `name` (`spec`, JSON) added to both branches of its input schema."""
    escaped = spec.replace('"', '\\"')
    return seed_text.replace(MAX_TOKENS_SPEC, f'\\"{name}\\": {escaped}, {MAX_TOKENS_SPEC}')


@pytest.mark.parametrize(
    ("name", "spec", "problem"),
    [
        ("temperature", '{"type": "number", "default": "hot"}', "expected a number from 0 to 5, got 'hot'"),
        ("top_p", '{"type": "number", "default": "x"}', "expected a number from 0.001 to 1, got 'x'"),
        ("seed", '{"type": "integer", "default": "abc"}', "expected an integer from 1 to 9999999999, got 'abc'"),
        ("temperature", '{"type": "number", "default": 99}', "expected a number from 0 to 5, got 99"),
        ("temperature", '{"type": "number", "maximum": 2, "default": 3}', "expected a number from 0 to 2, got 3"),
        ("top_k", '{"type": "integer", "default": 2.5}', "expected an integer from 1 to 50, got 2.5"),
        ("presence_penalty", '{"type": "number", "default": true}', "expected a number from -2 to 2, got True"),
        ("top_p", '{"type": "string", "default": "0.5"}', "expected a number from 0.001 to 1, got '0.5'"),
        # a whole number beyond any float (it ended the start in an OverflowError traceback)
        ("seed", '{"type": "integer", "default": 1' + "0" * 400 + "}",
         f"expected an integer from 1 to 9999999999, got {reprlib.repr(10 ** 400)}"),
        ("temperature", '{"type": "number", "default": -1' + "0" * 400 + "}",
         f"expected a number from 0 to 5, got {reprlib.repr(-10 ** 400)}"),
    ],
)
def test_a_sampling_default_must_be_a_value_a_request_may_send(seed_text: str, name: str, spec: str,
                                                               problem: str) -> None:
    """A default of the wrong type answered 500 to every request; one out of range was used for requests that
    left the parameter out, while a request sending it was refused."""
    with pytest.raises(CardError) as info:
        parse_card(_with_property(seed_text, name, spec), "x.txt")
    assert str(info.value) == f"card x.txt: field 'json_schema.input.oneOf[0].properties.{name}.default': {problem}"


@pytest.mark.parametrize(
    ("name", "spec"),
    [("temperature", '{"type": "number", "minimum": 0, "maximum": 100, "default": 99}'),
     ("temperature", '{"type": "number", "default": 0}'), ("top_k", '{"type": "integer", "default": 5.0}'),
     ("seed", '{"type": "integer", "default": 42}'), ("top_p", '{"type": "number", "default": 1}')],
)
def test_a_sampling_default_within_its_range_is_taken(seed_text: str, name: str, spec: str) -> None:
    card = parse_card(_with_property(seed_text, name, spec), "x.txt")
    assert card.input_schema["oneOf"][1]["properties"][name] == json.loads(spec)


@pytest.mark.parametrize(
    ("which", "old", "new", "problem"),
    [
        ("input", '\\"type\\": \\"boolean\\",\\n          \\"default\\": false',
         '\\"type\\": \\"boolean\\",\\n          \\"default\\": \\"no\\"',
         "default 'no' at oneOf/0/properties/raw is not valid under its own schema: 'no' is not of type 'boolean'"),
        ("input", '\\"maxLength\\": 4096\\n        }', '\\"maxLength\\": 4, \\"default\\": \\"Hello\\"}',
         "default 'Hello' at oneOf/0/properties/prompt is not valid under its own schema: 'Hello' is too long"),
        ("output", '\\"type\\": \\"string\\"\\n        }', '\\"type\\": \\"string\\", \\"default\\": 1}',
         "default 1 at oneOf/0/properties/response is not valid under its own schema: 1 is not of type 'string'"),
    ],
)
def test_every_default_must_be_valid_under_its_own_schema(seed_text: str, which: str, old: str, new: str,
                                                          problem: str) -> None:
    assert old in seed_text
    with pytest.raises(CardError) as info:
        parse_card(seed_text.replace(old, new, 1), "x.txt")
    assert (info.value.field, info.value.problem) == (f"json_schema.{which}", problem)


def test_max_tokens_branches_must_agree(seed_text: str) -> None:
    text = seed_text.replace('\\"default\\": 256', '\\"default\\": 100', 1)
    with pytest.raises(CardError, match=r"field 'json_schema\.input\.properties\.max_tokens\.default'.*disagree"):
        parse_card(text, "x.txt")


LAUGHS = "".join(f"{a}: &{a} [{', '.join([f'*{b}'] * 9)}]\n" for b, a in zip("abcd", "bcde", strict=True))
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + LAUGHS  # 9**5 strings expanded


def test_yaml_aliases_are_refused(seed_text: str) -> None:
    """A "billion laughs" card is refused at once, naming the alias, instead of expanding (four more levels of
    nine aliases, still under 1 KB, take minutes and gigabytes)."""
    bomb = seed_text.replace("---\nmodel:", "---\n" + BOMB + "model:", 1)
    bomb = bomb.replace('value: "https://ai.meta.com/llama/"', "value: *e")
    assert len(bomb) < len(seed_text) + 1024
    with pytest.raises(CardError) as info:
        parse_card(bomb, "bomb.txt")
    assert info.value.field == "front matter"
    assert "YAML aliases are not allowed in a card (*a)" in info.value.problem
    assert "line 3" in info.value.problem  # where the first alias is
    config = seed_text.replace("max_concurrent_requests: 4", "max_concurrent_requests: &n 4\\nx: *n")
    with pytest.raises(CardError, match=r"field 'model\.properties\[constellation_config\]': invalid YAML: .*\(\*n\)"):
        parse_card(config, "x.txt")


@pytest.mark.parametrize(
    ("old", "new", "field", "word"),
    [
        (
            'value: "512"',
            'value: "512"\n    - property_id: "constellation_config"\n      value: "- a\\n- b"',
            CFG,
            "Input should be a mapping, got ['a', 'b']",
        ),
        ('input: "{\\"type\\": \\"object\\"}"', 'input: "[1]"', "json_schema.input", "valid dictionary, got [1]"),
        ('output: "{}"', "output: 5", "json_schema.output", "valid dictionary, got 5"),
        ('name: "Text Generation"', "name: 5", "model.task.name", "valid string, got 5"),
        ("  task:\n", "  task: 3\n  other:\n", "model.task", "Input should be a mapping, got 3"),
        ("model:\n", "model: 1\nother:\n", "model", "Input should be a mapping, got 1"),
        ('"@hf/someone/tiny-model"', '"@hf/some one/tiny"', "model.name", "whitespace"),
        # a property named by its id once it has one, by its index before
        (
            'value: "512"',
            'value: "512"\n    - property_id: "beta"',
            "model.properties[beta].value",
            "Field required",
        ),
        (
            '    - property_id: "context_length_limit"',
            '    - "context_length_limit"\n    - property_id: "x"',
            "model.properties[0]",
            "Input should be a mapping, got 'context_length_limit'",
        ),
        # strict types: a bool is not an integer, "1" only counts where the card writes numbers as strings
        ('value: "512"', "value: true", "model.properties[context_length_limit]", "valid integer, got True"),
        ('  name: "@hf', '  source: "2"\n  name: "@hf', "model.source", "valid integer, got '2'"),
        # an empty value is no value: the property must have one
        ('value: "512"', "value:", "model.properties[context_length_limit].value", "Field required"),
    ],
)
def test_malformed_minimal_card(old: str, new: str, field: str, word: str) -> None:
    assert old in MINIMAL
    with pytest.raises(CardError) as info:
        parse_card(MINIMAL.replace(old, new), "m.txt")
    assert str(info.value).startswith(f"card m.txt: field '{field}': "), str(info.value)
    assert word in info.value.problem


CONFIG_PROP = '    - property_id: "constellation_config"\n      value: |\n'
METRIC = "neurons:\n  metrics:\n    - name: input_tokens"


def _with_config(config: str) -> str:
    """MINIMAL with a `constellation_config` property (a YAML block)."""
    block = "".join(f"        {line}\n" for line in config.splitlines())
    return MINIMAL.replace('      value: "512"\n', '      value: "512"\n' + CONFIG_PROP + block)


@pytest.mark.parametrize(
    ("config", "field", "word"),
    [
        (METRIC + "\n      neuron_cost: .inf", "neurons.metrics[0].neuron_cost", "finite number"),
        (METRIC, "neurons.metrics[0].neuron_cost", "Field required"),
        (METRIC + "\n      neuron_cost: true", "neurons.metrics[0].neuron_cost", "valid number, got True"),
        ("infer_response_cache: ' '", "infer_response_cache", "must not be empty"),
        ("max_concurrent_requests: true", "max_concurrent_requests", "valid integer, got True"),
        ("max_concurrent_requests: 2.0", "max_concurrent_requests", "valid integer, got 2.0"),
        ("max_requests_per_min:\n  accounts: [1, 2]", "max_requests_per_min.accounts", "valid dictionary"),
        ("neurons: 5", "neurons", "Input should be a mapping, got 5"),
    ],
)
def test_malformed_constellation_config(config: str, field: str, word: str) -> None:
    with pytest.raises(CardError) as info:
        parse_card(_with_config(config), "m.txt")
    assert info.value.field == f"{CFG}.{field}", str(info.value)
    assert word in info.value.problem, str(info.value)


@pytest.mark.parametrize(
    ("config", "field", "known"),
    [
        ("max_request_per_min:\n  default: 2", "max_request_per_min", "max_requests_per_min"),
        (METRIC.replace("neurons:", "neuron:") + "\n      neuron_cost: 0.18", "neuron", "neurons"),
        ("max_concurrent_request: 4", "max_concurrent_request", "max_concurrent_requests"),
        ("infer_respones_cache: in_memory", "infer_respones_cache", "infer_response_cache"),
        ("max_requests_per_min:\n  defualt: 2", "max_requests_per_min.defualt", "default"),
        ("max_requests_per_min:\n  account:\n    '1': 2", "max_requests_per_min.account", "accounts"),
        ("neurons:\n  metric: []", "neurons.metric", "metrics"),
        (METRIC + "\n      neuron_costs: 0.18", "neurons.metrics[0].neuron_costs", "neuron_cost"),
    ],
)
def test_a_misspelled_constellation_key_is_refused(config: str, field: str, known: str) -> None:
    """Ignored, a misspelled key silently turned rate limiting or billing off."""
    with pytest.raises(CardError) as info:
        parse_card(_with_config(config), "m.txt")
    assert str(info.value) == f"card m.txt: field '{CFG}.{field}': unknown key; did you mean '{known}'?"


def test_other_unknown_constellation_keys_are_ignored_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Keys that are no typo of a known one may be a newer catalog's: kept, said once in the log."""
    config = ("max_requests_per_min:\n  default: 3\n  per_day: 9\nmax_requests_per_day: 100\n"
              "infer_response_cache_ttl: 60\n" + METRIC + "\n      neuron_cost: 0.5\n      unit: token")
    text = _with_config(config)
    with caplog.at_level(logging.WARNING, logger="int8serve.catalog.card"):
        card = parse_card(text, "new.txt")
        parse_card(text, "new.txt")  # the same card again: no second warning
    assert card.policy.rpm_for("a") == 3 and card.policy.neurons(2, 0) == 1.0
    assert [r.getMessage() for r in caplog.records] == [
        "card new.txt: field 'model.properties[constellation_config]': unknown keys ignored (not read by this "
        "version of int8serve): max_requests_per_day, infer_response_cache_ttl, max_requests_per_min.per_day, "
        "neurons.metrics[0].unit"]


def test_constellation_config_is_the_mapping_validated(card: ModelCard) -> None:
    accounts = {"32118455": 60, "50147400": 60, "48546443": 1000, "56599770": 1000}
    metrics = [{"name": "input_tokens", "neuron_cost": 0.1836}, {"name": "output_tokens", "neuron_cost": 0.1836}]
    assert card.constellation_config == {
        "infer_response_cache": "in_memory",
        "max_requests_per_min": {"default": 5, "accounts": accounts},
        "neurons": {"metrics": metrics},
        "max_concurrent_requests": 4,
    }
    other = parse_card(_with_config("max_concurrent_requests: '3'\nsomething_new: [1, 2]"), "m.txt")
    assert other.constellation_config == {"max_concurrent_requests": 3, "something_new": [1, 2]}  # unknown keys kept
    assert other.max_concurrent_requests == 3


def test_a_key_without_value_means_the_default() -> None:
    plain = parse_card(MINIMAL, "m.txt")
    text = MINIMAL.replace("  task:\n", "  id:\n  source:\n  description:\n  tags:\n  task:\n    id:\n")
    card = parse_card(text.replace("json_schema:\n", "model_display_name:\njson_schema:\n"), "m.txt")
    assert card.to_search_result() == plain.to_search_result()
    assert card.display_name == "tiny-model"
    config = _with_config("infer_response_cache:\nmax_requests_per_min:\nneurons:\n  metrics:")
    assert parse_card(config, "m.txt").policy == plain.policy
    with pytest.raises(CardError, match=r"^card m\.txt: field 'model\.name': Field required$"):
        parse_card(MINIMAL.replace('"@hf/someone/tiny-model"', ""), "m.txt")  # a required key stays required


def test_display_name_as_written() -> None:
    text = MINIMAL.replace("json_schema:\n", "model_display_name: Tiny\njson_schema:\n")
    assert parse_card(text, "m.txt").display_name == "Tiny"


def test_property_items_keep_their_keys() -> None:
    card = parse_card(MINIMAL.replace('value: "512"', 'value: "512"\n      note: "kept"'), "m.txt")
    assert card.property_list == ({"property_id": "context_length_limit", "value": "512", "note": "kept"},)
    assert card.to_search_result()["properties"] == [dict(card.property_list[0])]


def test_the_first_error_is_reported(seed_text: str) -> None:
    text = seed_text.replace('value: "2048"', 'value: "abc"').replace('value: "1800"', 'value: "lots"')
    with pytest.raises(CardError) as info:
        parse_card(text, "x.txt")
    assert info.value.field == "model.properties[context_length_limit]"
    assert info.value.__context__ is None  # no pydantic traceback behind it


def test_front_matter_must_be_a_mapping() -> None:
    with pytest.raises(CardError, match=r"^card x\.txt: field 'front matter': Input should be a mapping"):
        parse_card("---\n- a\n- b\n---\n", "x.txt")


def test_empty_text() -> None:
    with pytest.raises(CardError, match=r"^card empty\.txt: field 'front matter'"):
        parse_card("", "empty.txt")


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(CardError, match=f"^card {missing}: cannot read"):
        load_card(missing)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"---\n\xff\xfe\n---\n")
    with pytest.raises(CardError, match="cannot read"):
        load_card(binary)


SMOLLM2 = "@hf/huggingfacetb/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2() -> ModelCard:
    (found,) = [card for card in builtin_cards() if card.name == SMOLLM2]
    return found


def test_the_seed_card_keeps_the_llama2_template(card: ModelCard) -> None:
    assert "prompt_template" not in card.properties and card.prompt_template == "llama2"
    assert card.default_context is None  # the template's own: Workers AI's chatDefaultContext


def test_smollm2_card_is_ours_with_its_own_limits_template_and_neurons(smollm2: ModelCard) -> None:
    assert (smollm2.source, smollm2.author, smollm2.display_name) == (2, "huggingfacetb", "smollm2-135m-instruct")
    assert smollm2.id == str(uuid.uuid5(uuid.NAMESPACE_URL, SMOLLM2))  # what the parser would have made
    assert "not a Workers AI catalog entry" in smollm2.description
    assert (smollm2.context_length_limit, smollm2.sequence_length_limit, smollm2.default_max_tokens) == (4096, 2048,
                                                                                                         256)
    assert smollm2.prompt_template == "chatml" and smollm2.properties["prompt_template"] == "chatml"
    assert smollm2.max_concurrent_requests == 4 and smollm2.policy.response_cache == "in_memory"
    assert smollm2.policy.rpm_for("any-account") == 300
    assert smollm2.policy.neurons(1000, 1000) == pytest.approx(7.4)  # 0.0037 per token, ours
    assert smollm2.to_search_result()["properties"][4] == {"property_id": "prompt_template", "value": "chatml"}
    assert smollm2.default_context == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    messages = smollm2.input_schema["oneOf"][1]["properties"]
    assert messages["temperature"]["default"] == 0.2 and messages["top_p"]["default"] == 0.9


def test_prompt_template_is_one_word(seed_text: str) -> None:
    named = seed_text.replace('      value: "1800"\n', '      value: "1800"\n    - property_id: "prompt_template"\n'
                                                      '      value: "chatml"\n')
    assert parse_card(named, "x").prompt_template == "chatml"
    with pytest.raises(CardError, match=r"field 'model\.properties\[prompt_template\]': must not contain whitespace"):
        parse_card(named.replace('value: "chatml"', 'value: "chat ml"'), "x")


def test_a_default_context_replaces_the_templates_system_prompt(card: ModelCard) -> None:
    """`prompt`-mode rendering with the card's default_context: None the template's own, "" none."""
    from int8serve.engine.chat_template import DEFAULT_SYSTEM_PROMPT, Control
    from int8serve.prompt_templates import render_prompt, template_named

    llama2 = template_named(card.prompt_template)
    assert render_prompt(llama2, "Hi") == llama2.render_prompt("Hi", False)
    assert DEFAULT_SYSTEM_PROMPT in render_prompt(llama2, "Hi")[0]
    assert render_prompt(llama2, "Hi", system="Be brief.") == ["[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"]
    assert render_prompt(llama2, "Hi", system="") == [Control.BOS, "[INST] Hi [/INST]"]
    assert render_prompt(llama2, "Hi", raw=True, system="Be brief.") == ["Hi"]
