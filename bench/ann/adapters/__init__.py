"""Algorithm adapters and their registry by name.

``get("hnswlib")`` returns the class; an unknown name raises InvalidArgument listing the valid names. Each
module of this package registers its classes with :func:`register` when imported; :func:`names`
imports them all.
"""

from __future__ import annotations

from bench.ann.adapters.base import Algorithm
from retrieval.core.registry import Registry

ALGORITHMS: Registry[type[Algorithm]] = Registry(
    "algorithm",
    modules=("bench.ann.adapters.hnswlib_", "bench.ann.adapters.faiss_", "bench.ann.adapters.exact",
             "bench.ann.adapters.service"),
)
"""Adapter classes by name; the adapter modules register themselves when first asked for."""


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available as ``cls.name``."""
    return ALGORITHMS.register(cls.name, cls)


def names() -> list[str]:
    """All registered algorithm names, sorted."""
    return ALGORITHMS.names()


def get(name: str) -> type[Algorithm]:
    """The adapter class registered as ``name``; InvalidArgument listing the valid ones otherwise."""
    return ALGORITHMS.get(name)


__all__ = ["ALGORITHMS", "Algorithm", "get", "names", "register"]
