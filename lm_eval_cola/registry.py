"""Named plug-ins, in the style of lm-eval's registry: one decorator, one name.

The package has three kinds: search methods (``--method``), chain sources (``chains=NAME:...``)
and predictors (``cola predict train --kinds``). Each has one :class:`Registry`, which the
command lines read for their choices. Built-ins are listed as ``"module:Class"`` and imported
when first used, so listing names never imports torch or Optuna.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to classes of one kind."""

    def __init__(self, kind: str, builtins: dict[str, str]) -> None:
        self.kind = kind
        self._entries: dict[str, type[T] | str] = dict(builtins)

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make ``name`` refer to the class."""

        def decorate(cls: type[T]) -> type[T]:
            self._entries[name] = cls
            return cls

        return decorate

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; an unknown name is an error that lists them all."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} '{name}': choose one of {', '.join(self)}")
        found = self._entries[name]
        if isinstance(found, str):
            module, _, attribute = found.partition(":")
            found = self._entries[name] = getattr(importlib.import_module(module), attribute)
        return found

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
