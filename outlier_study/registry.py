"""Named registries: experiments, interventions, methods and architecture families are all looked up here.

One way to add an option (a decorator or a `register` call next to its code) and one way to refuse an
unknown name (a one-line ConfigError that names the config field and lists what is registered).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from outlier_study.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order; `field` is the config key that chooses among them."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind, self.field = kind, field
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str, make: Callable[[Callable[..., object]], T]) -> Callable[..., object]:
        """Decorator form: `make(function)` builds the entry stored under `name`; the function is returned."""

        def decorate(function: Callable[..., object]) -> Callable[..., object]:
            self.add(name, make(function))
            return function

        return decorate

    def get(self, name: object) -> T:
        key = str(name)
        if key not in self._entries:
            raise ConfigError(self.field, f"unknown {self.kind} '{key}'", allowed=self.names())
        return self._entries[key]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return str(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())
