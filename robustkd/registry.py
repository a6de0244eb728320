"""Small name → object registries, so the CLI, the app and configs name things alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from robustkd.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from lower-case names to objects, filled with the ``register`` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that stores the decorated object under ``name``."""

        def decorator(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it held (a plug-in or a test undoing its own)."""
        obj = self.get(name)  # an unknown name lists the valid ones
        del self._items[str(name).lower()]
        return obj

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; unknown names list the valid ones."""
        key = str(name).lower()
        if key not in self._items:
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}."
            )
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
