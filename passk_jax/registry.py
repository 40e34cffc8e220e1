"""The one extension idiom: a `Registry` of named entries of one kind (advantage estimators, loss
aggregations, KL estimators, tasks). Each entry carries what the code needs to use and check it (an
estimator its options, rules and checks; an aggregation its numerator and denominator; a task its factory),
and an unknown name is one sentence listing the valid ones, with the closest as a hint."""
from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one ``kind`` ("advantage estimator", "loss aggregation", ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``name``; a name already taken is an error unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}.")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered.")
        self._entries[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry of ``name``; an unknown name is a ValueError naming the valid ones."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}{hint}.")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """Sorted names of the entries."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
