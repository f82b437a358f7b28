"""One small generic registry: explicit names, duplicates and unknown names are errors."""
from __future__ import annotations

import inspect
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownEntryError(KeyError):
    """An id that is not registered; the message lists the known ids."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps kebab-case ids to entries (factories, recipes, checks)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """Register `entry` under `name`; without `entry`, works as a decorator."""
        if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name:
            raise ValueError(f"{self.kind} id must be a non-empty lower-case kebab-case string, got {name!r}")

        def add(item: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = item
            return item

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownEntryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())


def check_keywords(function: Callable, options: dict, what: str) -> None:
    """Raise ValueError unless every key of `options` is a keyword `function` takes; the message lists them."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    allowed = [name for name, p in parameters.items() if name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option {', '.join(map(repr, unknown))} for {what}; allowed: {', '.join(allowed) or '(none)'}")


ATTACKS: Registry[Callable] = Registry("attack")
DEFENSES: Registry[Callable] = Registry("defense recipe")
MODELS: Registry[Callable] = Registry("model")
DATASETS: Registry[Callable] = Registry("dataset")
CHECKS: Registry[Callable] = Registry("check")
