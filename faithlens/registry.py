"""Registries: the one owned place for "which methods exist". Each holds named entries (saliency methods,
credit strategies) and is filled by the modules that define them, plus plugins.

A registry fills itself on first use: it imports its built-in modules, then every plugin module named in
``FAITHLENS_PLUGINS`` (comma-separated module paths) and every ``faithlens.plugins`` entry point, the way
vLLM loads its general plugins. So a method defined in a plugin is known to the server, the workers and
both CLIs without a line changed elsewhere. Registration is idempotent for the same entry and an error
for a different entry under a taken name.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Generic, Protocol, TypeVar

ENTRY_POINT_GROUP = "faithlens.plugins"


class Named(Protocol):
    name: str
    description: str


E = TypeVar("E", bound=Named)


def plugin_modules() -> list[str]:
    """The plugin modules named in ``FAITHLENS_PLUGINS``, in order."""
    from faithlens.settings import get_core_settings

    return [m.strip() for m in get_core_settings().plugins.split(",") if m.strip()]


class Registry(Generic[E]):
    """Named entries of one kind. Thread-safe; lists come out in registration order."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._builtins = builtins
        self._entries: dict[str, E] = {}
        self._lock = threading.RLock()
        self._loaded = False

    def register(self, entry: E) -> E:
        with self._lock:
            known = self._entries.get(entry.name)
            if known is not None and known is not entry:
                raise ValueError(f"a {self.kind} named {entry.name!r} is already registered")
            self._entries[entry.name] = entry
        return entry

    def get(self, name: str) -> E:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}") from None

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __iter__(self) -> Iterator[E]:
        self._load()
        return iter(list(self._entries.values()))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True  # set first: the modules imported below register into this registry
            for module in self._builtins:
                importlib.import_module(module)
            load_plugins()


def load_plugins() -> None:
    """Import every plugin module: the environment's first, then entry points. Imports are idempotent,
    so each registry may call this on its first use."""
    for module in plugin_modules():
        importlib.import_module(module)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        point.load()
