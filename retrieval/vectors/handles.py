"""Shard handles: what a collection needs from one of its shards, wherever the shard lives.

Two implementations:

* :class:`retrieval.vectors.shard.Shard` itself, in the server process (``is_local = True``). The
  collection calls its synchronous ``search`` directly, so an unfiltered search of an in-process
  collection costs no ``await`` and no thread hop.
* :class:`retrieval.vectors.ray_shards.RayShard` (``is_local = False``), a proxy to a Ray actor that owns
  a ``Shard`` (``retrieval serve --ray ADDRESS``). Every call is an actor method call; the collection
  fans them out with ``asyncio.gather`` and merges the top-k.

A :data:`ShardFactory` makes the handles of a collection; the collection manager takes one (default:
in-process shards), so nothing else changes between the two placements.

Thread-safety: handles are used from the server's event-loop thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from retrieval.indexes.base import IndexSpec, QueryParams


@runtime_checkable
class ShardHandle(Protocol):
    """One shard of a collection. Vectors passed to the search methods are index-ready (see
    :meth:`prepare`); results are ``(D float32 (nq, k), ids uint64 (nq, k))``, ``2**64-1`` padded."""

    name: str
    #: capability: ``search`` may be called synchronously (the shard lives in this process)
    is_local: bool

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Stored vectors -> index-ready vectors (L2-normalised for cosine). Runs in the caller."""

    async def open(self) -> None:
        """Load the newest snapshot and replay the point store's later writes."""

    async def close(self, snapshot: bool = True) -> None:
        """Stop background work, optionally write a final snapshot, release files."""

    def search(self, xq: np.ndarray, k: int, params: QueryParams) -> tuple[np.ndarray, np.ndarray]:
        """Synchronous k-NN; only for ``is_local`` handles."""

    async def asearch(self, xq: np.ndarray, k: int, params: QueryParams) -> tuple[np.ndarray, np.ndarray]:
        """k-NN (any handle)."""

    async def search_filtered(self, xq: np.ndarray, k: int, params: QueryParams,
                              where: tuple[str, list]) -> tuple[np.ndarray, np.ndarray]:
        """k-NN among the points whose payload matches the filter SQL ``where``."""

    async def upsert(self, ids: np.ndarray, vectors: np.ndarray, payloads: list[str | None] | None) -> int:
        """Durably upsert validated points; returns the batch's write sequence number."""

    async def delete(self, ids: np.ndarray | None = None, where: tuple[str, list] | None = None) -> int:
        """Durably delete by ids or by filter SQL; returns how many points were deleted."""

    async def read(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(point_store)`` where the store lives (``fn`` must be picklable for remote shards)."""

    async def ainfo(self) -> dict:
        """Counts, sequence numbers, memory, state and ``location`` of the shard."""

    async def wait_indexed(self, timeout: float) -> bool:
        """Wait until every acknowledged write is in the index."""

    async def snapshot(self) -> int:
        """Write an index snapshot now; returns the write sequence it includes."""


#: ``factory(folder, d, metric, spec, settings, name) -> ShardHandle``
ShardFactory = Callable[[Path, int, str, IndexSpec, Any, str], ShardHandle]


def local_shard(folder: Path, d: int, metric: str, spec: IndexSpec, settings: Any, name: str) -> ShardHandle:
    """The default factory: an in-process :class:`retrieval.vectors.shard.Shard`."""
    from retrieval.vectors.shard import Shard

    return Shard(folder, d, metric, spec, settings, name=name)
