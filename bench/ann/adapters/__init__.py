"""Algorithm adapters and their registry by name.

``get("hnswlib")`` returns the class; an unknown name raises NotFound listing the valid names. Each
module of this package registers its classes with :func:`register` when imported; :func:`names`
imports them all.
"""

from __future__ import annotations

import importlib

from bench.ann.adapters.base import Algorithm
from retrieval.errors import InvalidArgument, NotFound

_REGISTRY: dict[str, type[Algorithm]] = {}
_MODULES = ("bench.ann.adapters.hnswlib_", "bench.ann.adapters.faiss_", "bench.ann.adapters.exact",
            "bench.ann.adapters.service")
_loaded = False


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available as ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise InvalidArgument(f"algorithm name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if not _loaded:
        for m in _MODULES:
            importlib.import_module(m)
        _loaded = True


def names() -> list[str]:
    """All registered algorithm names, sorted."""
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> type[Algorithm]:
    """The adapter class registered as ``name``."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NotFound(f"unknown algorithm {name!r}; valid algorithms: {', '.join(sorted(_REGISTRY))}") from None


__all__ = ["Algorithm", "get", "names", "register"]
