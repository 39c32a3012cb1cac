"""The registry the branches, threshold rules and metrics share."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hybridad.registry import Registry


@dataclass(frozen=True)
class _Item:
    name: str
    value: int = 0


def test_order_duplicates_removal_and_lookup() -> None:
    reg: Registry[_Item] = Registry("item", lambda i: i.name)
    reg.register_all([_Item("b"), _Item("a")])
    assert reg.names() == ("b", "a") and "a" in reg and "c" not in reg
    assert reg.register(_Item("a")) == _Item("a")  # an equal item again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="item 'a' is registered already"):
        reg.register(_Item("a", 1))
    reg.unregister("b")
    reg.unregister("missing")  # no error
    assert reg.items() == (_Item("a"),) and reg.find("b") is None and reg.find("a") == _Item("a")


def test_builtins_load_once_on_first_use_and_register_through_the_registry() -> None:
    calls = []

    def load() -> None:
        calls.append(1)
        reg.register(_Item("builtin"))  # as a built-in module does when it is imported

    reg: Registry[_Item] = Registry("item", lambda i: i.name, load)
    assert calls == []  # nothing loaded at construction (no import-time side effects)
    reg.register(_Item("mine"))
    assert reg.names() == ("builtin", "mine") and calls == [1]
    reg.names()
    assert calls == [1]
