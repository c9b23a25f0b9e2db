"""The set of models this server knows: the built-in cards plus any card files the operator adds.

Routes look models up by name (`get`) and the `models/search` endpoint filters them (`search`);
pagination is the endpoint's business. Names are unique: the same name in two cards is a `CardError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from int8serve.catalog.card import CardError, ModelCard, builtin_cards, load_card

__all__ = ["Catalog", "UnknownModelError"]


class UnknownModelError(KeyError):
    """No card has this name. `str()` is the plain message (a bare KeyError would repr-quote it)."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown model {name!r}; known models: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:
        return str(self.args[0])


def _norm(text: str) -> str:
    """Case-folded, with `-` and `_` read as spaces: `text-generation` matches `Text Generation`."""
    return text.casefold().replace("-", " ").replace("_", " ")


class Catalog:
    """Cards by name, in insertion order (built-ins first, then extra files in the order given)."""

    def __init__(self, cards: Iterable[ModelCard] = ()) -> None:
        self._cards: dict[str, ModelCard] = {}
        for card in cards:
            other = self._cards.get(card.name)
            if other is not None:
                problem = f"duplicate model name {card.name!r} (also in {other.source_path})"
                raise CardError(card.source_path, "model.name", problem)
            self._cards[card.name] = card

    @classmethod
    def load(cls, extra_paths: Sequence[Path] = (), *, include_builtin: bool = True) -> Catalog:
        """Built-in cards plus `extra_paths`: card files, or directories whose `*.txt` files are cards."""
        cards = builtin_cards() if include_builtin else []
        for path in map(Path, extra_paths):
            files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
            cards.extend(load_card(f) for f in files)
        return cls(cards)

    def get(self, name: str) -> ModelCard:
        """The card called `name` (exact match), else `UnknownModelError`."""
        try:
            return self._cards[name]
        except KeyError:
            raise UnknownModelError(name, self._cards) from None

    def search(
        self,
        task: str | None = None,
        search: str | None = None,
        author: str | None = None,
        source: int | None = None,
    ) -> list[ModelCard]:
        """Cards passing every given filter (None or "" = no filter), in catalog order.

        * `task`: case-insensitive substring of the task name (`-`/`_` count as spaces, so
          `text-generation` finds "Text Generation");
        * `search`: case-insensitive substring of the name, display name, description or a tag;
        * `author`: case-insensitive equality with the author segment of the name
          (`@cf/meta/...` → `meta`); an identifier, so no substring match;
        * `source`: equality with `model.source` (1 = `@cf`, 2 = `@hf`).
        """
        out = []
        for card in self._cards.values():
            if task and _norm(task) not in _norm(card.task.name):
                continue
            if search:
                needle = search.casefold()
                fields = (card.name, card.display_name, card.description, *card.tags)
                if not any(needle in f.casefold() for f in fields):
                    continue
            if author and author.casefold() != card.author.casefold():
                continue
            if source is not None and source != card.source:
                continue
            out.append(card)
        return out

    def names(self) -> list[str]:
        return list(self._cards)

    def __contains__(self, name: object) -> bool:
        return name in self._cards

    def __iter__(self) -> Iterator[ModelCard]:
        return iter(self._cards.values())

    def __len__(self) -> int:
        return len(self._cards)
