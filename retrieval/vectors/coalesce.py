"""Unfiltered searches off the event loop, with concurrent small queries coalesced into one batch.

A gRPC server in Python does its request handling (parsing, the servicer, the reply) on one
event-loop thread. The native search itself (hnswlib, faiss, torch) releases the GIL, so it can run
on other cores while the loop goes on with the next requests. Two techniques, both measured in
``bench/results/concurrency`` (docs/operations.md, "Serving core"):

* **A bounded search pool** (:func:`search_pool`): one process-wide thread pool sized to the cores
  (``indexing.search_threads``, 0 = all cores). Native searches run there, under the shard's lock
  (:attr:`retrieval.vectors.shard.Shard.lock`), which the event-loop thread takes for the short
  in-memory updates (hiding replaced points, the delta, the indexer's adds).
* **Coalescing** (:class:`Coalescer`): small queries (``nq <= coalesce_max_queries``) of one
  collection with the same ``k`` and query parameters that wait at the same time are stacked into
  one native batch call. There is no timer: a query waits only while an earlier batch of its
  collection is still searching, or until the end of the current event-loop iteration (the other
  requests parsed in that iteration join it). One client alone sees the same path as before
  (the batch holds one query and runs inline when nothing else is in flight: no thread hop); under
  load the batch grows with the number of concurrent queries, up to ``max_batch`` queries.

Thread-safety: a :class:`Coalescer` is used from its event-loop thread only; ``run`` is called on a
pool thread (or inline on the loop) and must be safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from retrieval.indexes.base import QueryParams

logger = logging.getLogger(__name__)

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def search_pool(threads: int = 0) -> ThreadPoolExecutor:
    """The process-wide search pool (created on first use with ``threads`` workers, 0 = all cores)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            n = threads if threads > 0 else (os.cpu_count() or 1)
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="search")
        return _POOL


Run = Callable[[np.ndarray, int, QueryParams], tuple[np.ndarray, np.ndarray]]


class Coalescer:
    """Stack concurrent small searches of one collection into native batch calls (module docstring).

    ``run(xq, k, params) -> (D, I)`` searches a batch (it is the collection's local search);
    ``max_batch``: most queries in one call; ``inline_max``: a batch this small runs inline on the
    event loop when no other batch is in flight (cheaper than a thread hop for one query);
    ``max_in_flight``: batches searching at once (each native call already uses several threads)."""

    def __init__(self, run: Run, pool: ThreadPoolExecutor, max_batch: int = 256, inline_max: int = 1,
                 max_in_flight: int = 1) -> None:
        self.run = run
        self.pool = pool
        self.max_batch = max(1, max_batch)
        self.inline_max = inline_max
        self.max_in_flight = max(1, max_in_flight)
        self._waiting: list[tuple[tuple, np.ndarray, asyncio.Future]] = []
        self._in_flight = 0
        self._scheduled = False
        # counters for metrics and the benchmark: native calls made and queries they answered
        self.calls = 0
        self.queries = 0

    async def search(self, xq: np.ndarray, k: int, params: QueryParams) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of ``xq`` (nq, d), answered as part of a batch; cancellation leaves the batch alone."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting.append(((k, params), xq, fut))
        if not self._scheduled and self._in_flight < self.max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _take(self) -> tuple[tuple, list[tuple[np.ndarray, asyncio.Future]]]:
        """The oldest waiting query's group (same k and params), up to ``max_batch`` queries."""
        key = self._waiting[0][0]
        batch, rest, n = [], [], 0
        for item in self._waiting:
            if item[0] == key and (not batch or n + len(item[1]) <= self.max_batch) and not item[2].done():
                batch.append((item[1], item[2]))
                n += len(item[1])
            elif not item[2].done():
                rest.append(item)
        self._waiting = rest
        return key, batch

    def _flush(self) -> None:
        self._scheduled = False
        while self._waiting and self._in_flight < self.max_in_flight:
            self._waiting = [w for w in self._waiting if not w[2].done()]  # cancelled callers
            if not self._waiting:
                return
            (k, params), batch = self._take()
            xq = batch[0][0] if len(batch) == 1 else np.vstack([x for x, _ in batch])
            self.calls += 1
            self.queries += len(xq)
            if len(xq) <= self.inline_max and self._in_flight == 0:
                try:
                    D, I = self.run(xq, k, params)
                except BaseException as e:  # noqa: BLE001 - handed to every caller of the batch
                    self._fail(batch, e)
                else:
                    self._deliver(batch, D, I)
                continue
            self._in_flight += 1
            work = asyncio.get_running_loop().run_in_executor(self.pool, self.run, xq, k, params)
            work.add_done_callback(lambda w, batch=batch: self._done(w, batch))

    def _done(self, work: asyncio.Future, batch) -> None:
        self._in_flight -= 1
        try:
            D, I = work.result()
        except BaseException as e:  # noqa: BLE001
            self._fail(batch, e)
        else:
            self._deliver(batch, D, I)
        if self._waiting and not self._scheduled:
            self._flush()  # queries that arrived while this batch searched go now, as one batch

    @staticmethod
    def _deliver(batch, D: np.ndarray, I: np.ndarray) -> None:
        i = 0
        for x, fut in batch:
            n = len(x)
            if not fut.done():
                fut.set_result((D[i : i + n], I[i : i + n]))
            i += n

    @staticmethod
    def _fail(batch, e: BaseException) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(e)
