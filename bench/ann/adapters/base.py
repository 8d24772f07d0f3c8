"""The interface every benchmarked algorithm implements.

An algorithm is built once per *build setting* (``fit``), then queried under each *query setting*
(``set_query_params``) of the sweep, one query per call (``query``) and in batches (``batch_query``).
Build settings and query settings are separate dicts, as in ann-benchmarks' ``arg_groups`` /
``query_args``: e.g. hnswlib ``{"M": 16, "ef_construction": 200}`` vs ``{"ef": 40}``, faiss IVF
``{"nlist": 100}`` vs ``{"nprobe": 8}``.

A new algorithm is one short module: subclass :class:`Algorithm`, fill the class fields, implement
the abstract methods and decorate the class with :func:`bench.ann.adapters.register`.

Metrics: ``"l2"`` (Euclidean), ``"ip"`` (inner product, larger is closer) and ``"cosine"``. Datasets
with metric ``cosine`` are handed over already L2-normalised, so an adapter may treat cosine as ip.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from retrieval.errors import InvalidArgument


class Algorithm(ABC):
    """One ANN algorithm under test.

    Class fields (capabilities are declared here, never probed):
        name: registry name (``--algorithms``).
        metrics: metrics it supports.
        in_process: True when it runs inside the benchmark process (its RSS growth is its memory).
        default_build: build settings swept when the config names none (list of dicts).
        default_query: query settings swept when the config names none (list of dicts; ``[{}]`` when
            the algorithm has no query parameter).

    Lifecycle: ``__init__(metric, dim, build, threads)`` -> ``fit(xb)`` -> for each query setting
    ``set_query_params(q)`` then ``query`` / ``batch_query`` -> ``close()``.

    Thread-safety: instances are used by one thread at a time.
    """

    name: ClassVar[str]
    metrics: ClassVar[frozenset[str]] = frozenset({"l2", "ip", "cosine"})
    in_process: ClassVar[bool] = True
    default_build: ClassVar[Sequence[Mapping[str, Any]]] = ({},)
    default_query: ClassVar[Sequence[Mapping[str, Any]]] = ({},)

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        if metric not in self.metrics:
            raise InvalidArgument(
                f"algorithm {self.name!r} does not support metric {metric!r}; it supports "
                f"{', '.join(sorted(self.metrics))}"
            )
        self.metric = metric
        self.dim = int(dim)
        self.build = dict(build)
        self.threads = int(threads)

    @abstractmethod
    def fit(self, xb: np.ndarray) -> None:
        """Build the index over ``xb`` float32 ``(n, d)`` (row i gets id i)."""

    @abstractmethod
    def set_query_params(self, params: Mapping[str, Any]) -> None:
        """Apply one query setting (e.g. ``{"ef": 40}``) for the following queries."""

    @abstractmethod
    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        """The ids (int64 ``(<=k,)``, nearest first, ``-1`` for padding) of one query ``q`` float32 ``(d,)``."""

    @abstractmethod
    def batch_query(self, xq: np.ndarray, k: int) -> np.ndarray:
        """Ids int64 ``(nq, k)`` (``-1`` padding) for ``xq`` float32 ``(nq, d)`` in one call."""

    @abstractmethod
    def index_bytes(self) -> int:
        """Size of the built index in bytes as the library reports it (serialized size or equivalent)."""

    def rss_delta_bytes(self) -> int | None:
        """RSS growth over ``fit`` of the process that holds the index, when that is not this process
        (a server); ``None`` for in-process algorithms, whose growth the runner measures itself."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Free the index (and any process or server the adapter started). Idempotent."""

    def describe(self) -> str:
        """A short label for tables and plots, e.g. ``hnswlib(M=16,ef_construction=200)``."""
        args = ",".join(f"{k}={v}" for k, v in self.build.items())
        return f"{self.name}({args})"

    # helpers for subclasses ---------------------------------------------------------------------
    def _param(self, params: Mapping[str, Any], key: str, kind: type = int) -> Any:
        """``params[key]`` cast to ``kind``; InvalidArgument naming the algorithm when missing or bad."""
        if key not in params:
            raise InvalidArgument(
                f"algorithm {self.name!r} needs parameter {key!r}; got {dict(params)}"
            )
        try:
            return kind(params[key])
        except (TypeError, ValueError) as e:
            raise InvalidArgument(
                f"algorithm {self.name!r} parameter {key!r} must be {kind.__name__}, got {params[key]!r}"
            ) from e

    def _unknown(self, params: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
        extra = sorted(set(params) - set(allowed))
        if extra:
            raise InvalidArgument(
                f"algorithm {self.name!r} has no {what} parameter(s) {extra}; valid: {sorted(allowed)}"
            )
