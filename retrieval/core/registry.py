"""A registry of named things, the one every engine uses (after PyG's ``resolver``).

    SCORERS: Registry[Callable[..., Scorer]] = Registry("scorer backend")

    @SCORERS.register("minilm")
    def minilm(...): ...

    SCORERS.get("minilm")      # the factory
    SCORERS.get("annoy")       # InvalidArgument: unknown scorer backend 'annoy'; valid: minilm, ...

Entries can be registered lazily by import path (``"package.module:attr"``), so a registry of
backends does not import every backend (faiss, torch) when it is itself imported; and a registry may
be given ``modules`` to import on first use, whose import registers their entries (plugins).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from retrieval.errors import InvalidArgument

T = TypeVar("T")


class Registry(Generic[T]):
    """Things of one kind by name. ``what`` names the kind in error messages ("index type")."""

    def __init__(self, what: str, *, modules: tuple[str, ...] = (), case_insensitive: bool = False) -> None:
        self.what = what
        self._entries: dict[str, T | str] = {}
        self._modules = modules
        self._loaded = not modules
        self._fold = case_insensitive
        self._lock = threading.Lock()

    def _key(self, name: str) -> str:
        return name.lower() if self._fold else name

    # -- registering ------------------------------------------------------------------------------
    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name, obj=None):
        """``register(name, obj)``, or ``@register(name)`` as a decorator. A name registered twice
        (with another object) is a programming error: ValueError."""
        if obj is None:
            return lambda o: self.register(name, o)
        key = self._key(name)
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old is not obj:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[key] = obj
        return obj

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"package.module:attr"``, imported on the first :meth:`get` of ``name``."""
        if ":" not in target:
            raise ValueError(f"lazy target must be 'module:attr', got {target!r}")
        self.register(name, target)  # type: ignore[arg-type]

    def unregister(self, name: str) -> None:
        with self._lock:
            self._entries.pop(self._key(name), None)

    # -- looking up -------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self._loaded:
            for m in self._modules:
                importlib.import_module(m)
            self._loaded = True

    def get(self, name: str) -> T:
        """The entry registered as ``name``; InvalidArgument naming the valid ones otherwise."""
        self._load()
        key = self._key(name) if isinstance(name, str) else name
        try:
            obj = self._entries[key]
        except (KeyError, TypeError):
            raise InvalidArgument(f"unknown {self.what} {name!r}; valid: {self.choices()}") from None
        if isinstance(obj, str):  # lazy: import it now, once
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            with self._lock:
                self._entries[key] = obj
        return obj  # type: ignore[return-value]

    def find(self, name: str) -> T | None:
        """Like :meth:`get`, None for an unknown name."""
        return self.get(name) if name in self else None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def choices(self) -> str:
        """The valid names, comma separated ("none" when empty), for error messages."""
        return ", ".join(self.names()) or "none"

    def values(self) -> list[T]:
        return [self.get(n) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and self._key(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.names()})"
