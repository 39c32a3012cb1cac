"""`Registry`: items by name, what the branch, threshold-rule and metric registries share.

Each registry keeps its own look-up error (it names the config key a user got wrong); this class keeps the
bookkeeping: registration order, duplicate names refused, removal (tests that add a toy item), and built-ins
loaded on the first use where importing them eagerly would be an import-time side effect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named items in registration order.

    Args:
        what: what an item is, for error messages ("branch", "threshold rule", "metric").
        name_of: an item's name.
        builtins: called once, on the first use, to register the built-in items (e.g. by importing the
            modules that register themselves); None when the built-ins are registered at construction.
    """

    def __init__(self, what: str, name_of: Callable[[T], str], builtins: Callable[[], None] | None = None) -> None:
        self.what = what
        self._name_of = name_of
        self._items: dict[str, T] = {}
        self._builtins = builtins

    def _loaded(self) -> dict[str, T]:
        if self._builtins is not None:
            load, self._builtins = self._builtins, None  # before loading: built-ins register through `register`
            load()
        return self._items

    def register(self, item: T) -> T:
        """Add `item`; returns it. Another item of the same name is a `ValueError` (the same one again is not)."""
        name = self._name_of(item)
        items = self._loaded()
        if name in items and items[name] != item:
            raise ValueError(f"{self.what} {name!r} is registered already")
        items[name] = item
        return item

    def register_all(self, items: Iterable[T]) -> None:
        for item in items:
            self.register(item)

    def unregister(self, name: str) -> None:
        """Remove `name` (no error when it is not there)."""
        self._loaded().pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order (built-ins first)."""
        return tuple(self._loaded())

    def items(self) -> tuple[T, ...]:
        return tuple(self._loaded().values())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def find(self, name: str) -> T | None:
        """The item `name`, or None (each registry raises its own one-line error for an unknown name)."""
        return self._loaded().get(name)
