"""The catalog: built-in plus extra cards, lookup by name, search filters, duplicate names."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.catalog.card import CardError, ModelCard, parse_card
from int8serve.catalog.registry import Catalog, UnknownModelError

SHARED = Path(__file__).resolve().parents[3] / "shared"
SEED = SHARED / "seeds" / "000_ef2d276774d6e394.txt"
NAME = "@cf/meta/llama-2-7b-chat-int8"
SMOLLM2 = "@hf/huggingfacetb/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def seed_text() -> str:
    if not SEED.is_file():
        pytest.fail(f"the seed card is missing: {SEED} (tests need ../shared next to the project)")
    return SEED.read_text(encoding="utf-8")


def variant(seed_text: str, name: str, *, source: int = 1, task: str = "Text Generation", tag: str = "meta") -> str:
    """The seed with another name (and display name), source, task name and first tag."""
    return (
        seed_text.replace(NAME, name)
        .replace("llama-2-7b-chat-int8", name.split("/")[-1])
        .replace("  source: 1\n", f"  source: {source}\n")
        .replace('    name: "Text Generation"', f'    name: "{task}"')
        .replace('    - "meta"', f'    - "{tag}"')
    )


@pytest.fixture
def catalog(seed_text: str, tmp_path: Path) -> Catalog:
    (tmp_path / "mistral.txt").write_text(
        variant(seed_text, "@hf/mistral/mistral-7b-instruct-v0.2", source=2, tag="mistral"), encoding="utf-8"
    )
    (tmp_path / "bge.txt").write_text(
        variant(seed_text, "@cf/baai/bge-base-en-v1.5", task="Text Embeddings", tag="baai"), encoding="utf-8"
    )
    # the seed and two variants (without the SmolLM2 card: the searches below are about the seed's fields)
    return Catalog.load([SEED, tmp_path / "mistral.txt", tmp_path / "bge.txt"], include_builtin=False)


def names(cards: list[ModelCard]) -> list[str]:
    return [c.name for c in cards]


def test_builtin_only() -> None:
    catalog = Catalog.load()
    assert catalog.names() == [NAME, SMOLLM2]  # by file name
    assert len(catalog) == 2
    assert NAME in catalog and SMOLLM2 in catalog
    assert catalog.get(NAME).context_length_limit == 2048
    assert catalog.get(SMOLLM2).context_length_limit == 4096
    assert [c.name for c in catalog] == [NAME, SMOLLM2]


def test_extra_cards_are_added_in_order(catalog: Catalog) -> None:
    assert catalog.names() == [NAME, "@hf/mistral/mistral-7b-instruct-v0.2", "@cf/baai/bge-base-en-v1.5"]
    assert catalog.get("@hf/mistral/mistral-7b-instruct-v0.2").source == 2


def test_extra_directory(seed_text: str, tmp_path: Path) -> None:
    folder = tmp_path / "cards"
    folder.mkdir()
    (folder / "b.txt").write_text(variant(seed_text, "@cf/x/b"), encoding="utf-8")
    (folder / "a.txt").write_text(variant(seed_text, "@cf/x/a"), encoding="utf-8")
    (folder / "notes.md").write_text("not a card", encoding="utf-8")
    assert Catalog.load([folder]).names() == [NAME, SMOLLM2, "@cf/x/a", "@cf/x/b"]
    assert Catalog.load([folder], include_builtin=False).names() == ["@cf/x/a", "@cf/x/b"]


def test_unknown_model(catalog: Catalog) -> None:
    with pytest.raises(UnknownModelError) as info:
        catalog.get("@cf/meta/llama-3-8b-instruct")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert message.startswith("unknown model '@cf/meta/llama-3-8b-instruct'; known models: ")
    assert NAME in message
    assert info.value.name == "@cf/meta/llama-3-8b-instruct"
    with pytest.raises(KeyError):
        catalog.get(NAME.upper())  # names are exact


def test_duplicate_name_in_extra_file(seed_text: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy.txt"
    copy.write_text(seed_text, encoding="utf-8")
    with pytest.raises(CardError) as info:
        Catalog.load([copy])
    message = str(info.value)
    assert message.startswith(f"card {copy}: field 'model.name': duplicate model name '{NAME}'")
    assert "llama-2-7b-chat-int8.txt" in message  # the built-in it collides with


def test_duplicate_name_between_extra_files(seed_text: str, tmp_path: Path) -> None:
    for stem in ("one", "two"):
        (tmp_path / f"{stem}.txt").write_text(variant(seed_text, "@cf/x/same"), encoding="utf-8")
    with pytest.raises(CardError, match=r"two\.txt: field 'model\.name': duplicate .* \(also in .*one\.txt\)"):
        Catalog.load([tmp_path / "one.txt", tmp_path / "two.txt"])


def test_duplicate_name_in_constructor(seed_text: str) -> None:
    card = parse_card(seed_text, "a.txt")
    with pytest.raises(CardError, match="duplicate model name"):
        Catalog([card, parse_card(seed_text, "b.txt")])


def test_broken_extra_card_fails_the_load(seed_text: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(seed_text.replace('value: "2048"', 'value: "abc"'), encoding="utf-8")
    with pytest.raises(CardError, match=rf"^card {bad}: field 'model\.properties\[context_length_limit\]'"):
        Catalog.load([bad])


def test_missing_extra_file(tmp_path: Path) -> None:
    with pytest.raises(CardError, match="cannot read"):
        Catalog.load([tmp_path / "missing.txt"])


def test_search_without_filters(catalog: Catalog) -> None:
    assert names(catalog.search()) == catalog.names()
    assert names(catalog.search(task="", search="", author="")) == catalog.names()


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("Text Generation", [NAME, "@hf/mistral/mistral-7b-instruct-v0.2"]),
        ("text generation", [NAME, "@hf/mistral/mistral-7b-instruct-v0.2"]),
        ("text-generation", [NAME, "@hf/mistral/mistral-7b-instruct-v0.2"]),
        ("GENERATION", [NAME, "@hf/mistral/mistral-7b-instruct-v0.2"]),
        ("Text", [NAME, "@hf/mistral/mistral-7b-instruct-v0.2", "@cf/baai/bge-base-en-v1.5"]),
        ("embeddings", ["@cf/baai/bge-base-en-v1.5"]),
        ("Image Classification", []),
    ],
)
def test_search_task(catalog: Catalog, task: str, expected: list[str]) -> None:
    assert names(catalog.search(task=task)) == expected


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("llama", [NAME]),
        ("LLAMA-2", [NAME]),
        ("chat-INT8", [NAME]),
        ("7b", [NAME, "@hf/mistral/mistral-7b-instruct-v0.2"]),
        ("mistral", ["@hf/mistral/mistral-7b-instruct-v0.2"]),
        ("quantized (INT8)", [NAME, "@hf/mistral/mistral-7b-instruct-v0.2", "@cf/baai/bge-base-en-v1.5"]),
        ("baai", ["@cf/baai/bge-base-en-v1.5"]),
        ("no such model", []),
    ],
)
def test_search_free_text(catalog: Catalog, search: str, expected: list[str]) -> None:
    assert names(catalog.search(search=search)) == expected


@pytest.mark.parametrize(
    ("author", "expected"),
    [
        ("meta", [NAME]),
        ("Meta", [NAME]),
        ("mistral", ["@hf/mistral/mistral-7b-instruct-v0.2"]),
        ("baai", ["@cf/baai/bge-base-en-v1.5"]),
        ("met", []),  # an identifier, not a substring
        ("openai", []),
    ],
)
def test_search_author(catalog: Catalog, author: str, expected: list[str]) -> None:
    assert names(catalog.search(author=author)) == expected


def test_search_source_and_combined(catalog: Catalog) -> None:
    assert names(catalog.search(source=1)) == [NAME, "@cf/baai/bge-base-en-v1.5"]
    assert names(catalog.search(source=2)) == ["@hf/mistral/mistral-7b-instruct-v0.2"]
    assert names(catalog.search(source=3)) == []
    assert names(catalog.search(task="Text Generation", source=1)) == [NAME]
    assert names(catalog.search(task="Text Generation", author="meta", search="int8", source=1)) == [NAME]
    assert names(catalog.search(task="Text Embeddings", author="meta")) == []


def test_search_results_serialise(catalog: Catalog) -> None:
    (card,) = catalog.search(author="meta")
    result = card.to_search_result()
    assert result["name"] == NAME and result["source"] == 1 and result["task"]["name"] == "Text Generation"
    assert {"property_id": "context_length_limit", "value": "2048"} in result["properties"]
